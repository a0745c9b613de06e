"""The MuSiCa cascade: iterations unrolled over stacked parameters, early exit by masking.

Everything is in level-0 pixels of the face crop. Paper Eq. 1 (S <- 2 S + dx, with dx in
the pixels of the current level) is the same as adding 2^level * dx in level-0 pixels:
S1 = S0 + 4 d0, S2 = S1 + 2 d1, S3 = S2 + d2 for levels (2, 1, 0).

Early exit ("knowing when to quit"): the cascade always runs the full chain (the per-
iteration outputs are those of the full cascade, which the threshold analysis needs) and
carries a second, frozen copy of (landmarks, hidden, error): once a face's estimated
error drops below Ts, its frozen copy stops changing. Static shapes, so it jits and
batches; it does not save time (see `musica_jax.fast_inference` for the paths that do).

Speed (2-core CPU): `run_cascade` unrolls the 3 iterations (each reads its own pyramid
level, a static shape: no atlas) and runs the per-patch network in chunks of face groups
(`stage_features`), ~2x faster than the first implementation, a `lax.scan` over an atlas
(kept as `stage_inputs` / `stage_step` / `run_cascade_unrolled`, the reference loop used
by the tests). Slicing one stage out of the stacked parameters copies it (XLA); at batch 1
that copy (11-36 MB per iteration) dominates, hence `fast_inference.unstack_params`.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from musica_jax import pyramid
from musica_jax import stage_net
from musica_jax.config import ModelConfig


@flax.struct.dataclass
class CascadeOutput:
  shapes: jax.Array            # [S, B, N, 2] landmarks after every iteration (full run)
  errors: jax.Array            # [S, B] estimated error after every iteration
  attention: jax.Array         # [S, B, P] mean local patch attention per patch
  landmarks: jax.Array         # [B, N, 2] early-exit result
  estimated_error: jax.Array   # [B] estimated error of the early-exit result
  hidden: jax.Array            # [B, H] hidden state of the early-exit result
  iterations: jax.Array        # [B] int32 iterations computed before quitting
  valid: jax.Array             # [B] bool, estimated_error < Tf


def stage_inputs(config: ModelConfig):
  """Per-iteration static facts as arrays, scanned alongside the stacked parameters."""
  layout = pyramid.AtlasLayout(config.image_size, max(config.levels) + 1)
  levels = np.asarray(config.levels, np.int32)
  return layout, dict(
      level=jnp.asarray(levels),
      origin=jnp.asarray(np.asarray(layout.origins, np.int32)[levels]),
      level_size=jnp.asarray(np.asarray(layout.level_sizes, np.int32)[levels]),
      step_scale=jnp.asarray(np.exp2(levels).astype(np.float32)),
  )


def _broadcast_init(init_shape, batch, config):
  init_shape = jnp.asarray(init_shape, jnp.float32)
  if init_shape.shape[-2:] != (config.num_landmarks, 2):
    raise ValueError(f"init_shape must end in ({config.num_landmarks}, 2), got {init_shape.shape}")
  return jnp.broadcast_to(init_shape, (batch, config.num_landmarks, 2))


def stage_step(config: ModelConfig, params, atlas, shape, hidden, xs):
  """One iteration on the full chain: returns (new_shape, new_hidden, error, attention)."""
  centres = jax.lax.stop_gradient(shape[:, list(config.patch_indices), :])
  patches = pyramid.sample_patches(atlas, centres, xs["level"], xs["origin"],
                                   xs["level_size"], config.patch_size)
  hidden, disp, err, att = stage_net.apply_stage(config, params, patches, hidden)
  return shape + xs["step_scale"] * disp, hidden, err, att


# Patches per chunk of the per-patch network (conv, pool, attention). Measured on the 2-core
# CPU at batch 64 (68/68, one iteration): 96-192 patches per chunk is 2.5-3x faster than
# one pass over all 4352 patches, whose intermediates (hundreds of MB) miss every cache
# and are fresh page-faulting mmaps on every call.
TARGET_CHUNK_PATCHES = 160


def face_group_size(batch: int, num_patches: int, target: int | None = None) -> int:
  """Faces per chunk: the largest divisor of `batch` with at most `target` patches."""
  target = TARGET_CHUNK_PATCHES if target is None else target
  k = max(1, min(batch, target // max(num_patches, 1)))
  while batch % k:
    k -= 1
  return k


def stage_features(config: ModelConfig, params, level_images: jax.Array, centres: jax.Array,
                   level: int, remat: bool = False):
  """Per-patch part of one iteration for a batch, chunked over groups of faces.

  Args:
    params: one stage's parameters.
    level_images: [B, s, s, C] the pyramid level this iteration reads (unpadded).
    centres: [B, P, 2] patch centres in level-0 pixels (no gradient flows through them).
    level: static pyramid level.
    remat: recompute each chunk's forward in the backward pass instead of storing its
      intermediates (training: they would be ~60 kB per patch).
  Returns (descriptors [B, P*D], mean attention [B, P]).
  """
  b, p = centres.shape[:2]
  s = level_images.shape[1]
  ps = config.patch_size
  start, frac = pyramid.window_starts(centres, level, s, ps)
  k = face_group_size(b, p)
  face = jnp.repeat(jnp.arange(k, dtype=jnp.int32), p)

  def chunk(xs):
    imgs, st, fr = xs
    patches = pyramid.gather_patches_cm(pyramid.pad_level(imgs), face, st.reshape(-1, 2),
                                        fr.reshape(-1, 2), ps)
    desc, att = stage_net.patch_features(params, patches, config.use_attention)
    return desc.reshape(k, -1), att.reshape(k, p)

  if remat:
    chunk = jax.checkpoint(chunk)
  if k == b:
    return chunk((level_images, start, frac))
  g = b // k
  split = lambda x: x.reshape(g, k, *x.shape[1:])
  desc, att = jax.lax.map(chunk, (split(level_images), split(start), split(frac)))
  return desc.reshape(b, -1), att.reshape(b, p)


def stage_forward(config: ModelConfig, params, level_images, shape, hidden, level: int,
                  step_scale: float, remat: bool = False):
  """One iteration at a static level: returns (new_shape, new_hidden, error, attention)."""
  centres = jax.lax.stop_gradient(shape[:, list(config.patch_indices), :])
  desc, att = stage_features(config, params, level_images, centres, level, remat)
  hidden, disp, err = stage_net.recurrent_head(config, params, desc, hidden)
  return shape + step_scale * disp, hidden, err, att


def stage_params(params, i: int):
  return jax.tree.map(lambda x: x[i], params)


def run_cascade(params: Any, images: jax.Array, init_shape: jax.Array,
                config: ModelConfig, ts=-jnp.inf, tf=jnp.inf) -> CascadeOutput:
  """The whole cascade for a batch of level-0 face crops.

  Args:
    params: stage parameters stacked on a leading axis of length config.num_stages.
    images: [B, S, S, 3] level-0 face crops (S = config.image_size), standardised.
    init_shape: [N, 2] or [B, N, 2] initial landmarks (the mean shape) in crop pixels.
    config: static model configuration.
    ts: success threshold; a face stops after the first iteration with error < ts.
      -inf: every face runs every iteration.
    tf: failure threshold; valid = final estimated error < tf.

  The iterations are unrolled in Python (there are 3; the level of each is static), each
  reading its own pyramid level; the per-patch network runs chunked over face groups
  (`stage_features`). Same function as the scanned atlas version this replaced (tested
  against a frozen copy in tests/test_fast_inference.py), about 3x faster on CPU.
  """
  b = images.shape[0]
  if images.shape[1:3] != (config.image_size, config.image_size):
    raise ValueError(f"images must be [B, {config.image_size}, {config.image_size}, C], "
                     f"got {images.shape}")
  levels = pyramid.build_levels(images.astype(jnp.float32), max(config.levels) + 1)
  shape = _broadcast_init(init_shape, b, config)
  hidden = jnp.zeros((b, config.hidden_size), jnp.float32)
  remat = _remat_default(b, config.num_patches)
  frozen = dict(shape=shape, hidden=hidden, error=jnp.full((b,), jnp.inf),
                iterations=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool))
  shapes, errors, atts = [], [], []
  for i, level in enumerate(config.levels):
    shape, hidden, err, att = stage_forward(config, stage_params(params, i), levels[level],
                                            shape, hidden, level, float(2 ** level), remat)
    active = ~frozen["done"]
    keep = lambda new, old: jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    frozen = dict(
        shape=keep(shape, frozen["shape"]),
        hidden=keep(hidden, frozen["hidden"]),
        error=keep(err, frozen["error"]),
        iterations=frozen["iterations"] + active.astype(jnp.int32),
        done=frozen["done"] | (active & (err < ts)),
    )
    shapes.append(shape); errors.append(err); atts.append(att)
  return CascadeOutput(shapes=jnp.stack(shapes), errors=jnp.stack(errors),
                       attention=jnp.stack(atts), landmarks=frozen["shape"],
                       estimated_error=frozen["error"], hidden=frozen["hidden"],
                       iterations=frozen["iterations"], valid=frozen["error"] < tf)


# Rematerialise the per-patch network in the backward pass once its stored intermediates
# (~60 kB per patch and iteration) would pass this many patches per iteration. Below it,
# storing them is ~9% faster (68/68, batch 128, 2-core CPU: ~1.5 GB of residuals).
REMAT_ABOVE_PATCHES = 16384


def _remat_default(batch: int, num_patches: int) -> bool:
  return batch * num_patches > REMAT_ABOVE_PATCHES


def run_cascade_unrolled(params, images, init_shape, config: ModelConfig, ts=-np.inf,
                         tf=np.inf) -> CascadeOutput:
  """Reference: a plain Python loop over the same stacked parameters (for tests)."""
  b = images.shape[0]
  layout, xs = stage_inputs(config)
  atlas = pyramid.build_atlas(jnp.asarray(images, jnp.float32), layout)
  shape = _broadcast_init(init_shape, b, config)
  hidden = jnp.zeros((b, config.hidden_size), jnp.float32)
  shapes, errors, atts = [], [], []
  out_shape, out_hidden = shape, hidden
  out_err = np.full((b,), np.inf, np.float32)
  iters = np.zeros((b,), np.int32)
  done = np.zeros((b,), bool)
  for i in range(config.num_stages):
    p_i = jax.tree.map(lambda x: x[i], params)
    xs_i = jax.tree.map(lambda x: x[i], xs)
    shape, hidden, err, att = stage_step(config, p_i, atlas, shape, hidden, xs_i)
    shapes.append(shape); errors.append(err); atts.append(att)
    for f in range(b):
      if not done[f]:
        out_shape = out_shape.at[f].set(shape[f])
        out_hidden = out_hidden.at[f].set(hidden[f])
        out_err[f] = err[f]
        iters[f] += 1
        done[f] = err[f] < ts
  return CascadeOutput(shapes=jnp.stack(shapes), errors=jnp.stack(errors),
                       attention=jnp.stack(atts), landmarks=out_shape,
                       estimated_error=jnp.asarray(out_err), hidden=out_hidden,
                       iterations=jnp.asarray(iters), valid=jnp.asarray(out_err < tf))


@functools.partial(jax.jit, static_argnames=("config",))
def run_cascade_jit(params, images, init_shape, config: ModelConfig, ts=-jnp.inf, tf=jnp.inf):
  """Jitted `run_cascade`; thresholds are traced, so sweeping them never recompiles."""
  return run_cascade(params, images, init_shape, config, ts, tf)
