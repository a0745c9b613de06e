"""A portable artifact: the cascade as a serialized `jax.export` (StableHLO) program.

    blob = portable.export_stablehlo(params, config, mean_shape)        # bytes
    # elsewhere, with jax only (no musica_jax, no model code):
    exp = jax.export.deserialize(blob)
    landmarks, estimated_error = exp.call(crops)   # crops: [B, 228, 228, 3] float32

Input: standardised face crops [B, S, S, 3] float32 (S = config.image_size; the crop of
`crop.face_crops`: the box -> (scale, offset) of `face_frame.crop_transform`, a
bilinear warp, per-image standardisation; the side-car JSON spells it out). B is symbolic:
any batch size runs without re-exporting. Outputs: landmarks [B, N, 2] in crop pixels
(image pixels: (crop - offset) / scale), then the estimated error [B] (the model's
estimate of its inter-ocular NME), after the full cascade (every iteration; the early
exit is the predictor's). A crop holding any NaN or infinite value gets NaN landmarks and
a NaN estimated error (invalid under any failure threshold: NaN < t_fail is false), never
finite numbers made up from it.

The weights are constants inside the program. Stored in bfloat16 when every weight is
exactly a bfloat16 number (a model exported with --dtype=bfloat16, as the shipped default)
and widened to float32 inside the program, so the result is bit-identical to the
predictor's full cascade and the file half the size.

The program is `cascade.run_cascade` on one face, vmapped over the batch: the library's
batching code chooses chunk sizes by comparing the batch size with constants, which a
symbolic batch cannot answer; one face at a time has no such choice and gives exactly the
predictor's numbers (tested).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from musica_jax import cascade
from musica_jax import face_frame
from musica_jax import strict_json
from musica_jax.config import ModelConfig

FORMAT = "musica-jax-stablehlo"
VERSION = 1


def _storage(params):
  """The weights as bfloat16 numpy arrays when that loses nothing, else float32."""
  f32 = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  as_bf16 = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), f32)
  exact = all(np.array_equal(a.astype(np.float32), b) for a, b in
              zip(jax.tree.leaves(as_bf16), jax.tree.leaves(f32)))
  return (as_bf16, "bfloat16") if exact else (f32, "float32")


def cascade_function(params: Any, config: ModelConfig, mean_shape):
  """crops [B, S, S, 3] -> (landmarks [B, N, 2] crop px, estimated error [B]): the full
  cascade, one face at a time under vmap (see the module docstring); the weights are
  closed over (constants when exported)."""
  stored, _ = _storage(params)
  init = np.asarray(mean_shape, np.float32)

  def one(crop):
    p = jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.float32), stored)
    out = cascade.run_cascade(p, crop[None], jnp.asarray(init), config)
    # NaN in, NaN out: for a crop with a NaN or inf the cascade alone returns finite
    # landmarks and an estimated error of 0 (issue #27), i.e. a confident made-up answer.
    finite = jnp.all(jnp.isfinite(crop))
    return (jnp.where(finite, out.landmarks[0], jnp.nan),
            jnp.where(finite, out.estimated_error[0], jnp.nan))

  return jax.vmap(one)


def export_stablehlo(params: Any, config: ModelConfig, mean_shape,
                     platforms: Sequence[str] | None = None) -> bytes:
  """The serialized `jax.export.Exported` of `cascade_function` with a symbolic batch.

  platforms: lowering targets (e.g. ("cpu", "cuda")); None: the current backend.
  """
  (b,) = jax.export.symbolic_shape("b")
  spec = jax.ShapeDtypeStruct((b, config.image_size, config.image_size, 3), jnp.float32)
  fn = jax.jit(cascade_function(params, config, mean_shape))
  kwargs = {} if platforms is None else {"platforms": tuple(platforms)}
  return bytes(jax.export.export(fn, **kwargs)(spec).serialize())


def describe(config: ModelConfig, mean_shape, platforms: Sequence[str],
             weight_dtype: str, metadata: dict | None = None) -> dict:
  """The side-car JSON: what goes in, what comes out, how to make the crops."""
  s = config.image_size
  return {
      "format": FORMAT, "version": VERSION,
      "load": "jax.export.deserialize(open(PATH, 'rb').read()).call(crops)",
      "input": {"name": "crops", "shape": ["B", s, s, 3], "dtype": "float32",
                "batch": "symbolic (any B >= 1)",
                "non_finite": "a crop with any NaN or inf value gets NaN landmarks and a "
                              "NaN estimated error (invalid)"},
      "outputs": [{"name": "landmarks", "shape": ["B", config.num_landmarks, 2],
                   "dtype": "float32", "frame": "crop pixels (x, y), pixel centres at "
                   "integers; image = (crop - offset) / scale"},
                  {"name": "estimated_error", "shape": ["B"], "dtype": "float32",
                   "meaning": "the model's estimate of its inter-ocular NME"}],
      "crop": {"size": s, "box_side_px": face_frame.BOX_SIZE,
               "rule": "box (x0, y0, x1, y1, image pixels) -> scale = box_side_px / "
                       "max(x1 - x0, y1 - y0); offset = (size - 1) / 2 - centre * scale; "
                       "crop[y, x] = bilinear(image, ((x, y) - offset) / scale), pixels "
                       "outside the image read 0; then per crop (x - mean) / "
                       "max(std, 1 / sqrt(size * size * 3))",
               "box": "tight box of the landmarks (the training convention)"},
      "iterations": config.num_stages, "num_landmarks": config.num_landmarks,
      "num_patches": config.num_patches, "platforms": list(platforms),
      "weight_dtype": weight_dtype,
      "mean_shape": np.round(np.asarray(mean_shape, np.float64), 4).tolist(),
      "metadata": metadata or {}}


def weight_dtype(params) -> str:
  return _storage(params)[1]


def dumps(info: dict) -> str:
  return strict_json.dumps(info, indent=1)
