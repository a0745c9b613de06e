"""The MuSiCa cascade: iterations unrolled over stacked parameters, early exit by masking.

Everything is in level-0 pixels of the face crop. Paper Eq. 1 (S <- 2 S + dx, with dx in
the pixels of the current level) is the same as adding 2^level * dx in level-0 pixels:
S1 = S0 + 4 d0, S2 = S1 + 2 d1, S3 = S2 + d2 for levels (2, 1, 0).

Early exit ("knowing when to quit"): the cascade always runs the full chain (the per-
iteration outputs are those of the full cascade, which the threshold analysis needs) and
carries a second, frozen copy of (landmarks, hidden, error): once a face's estimated
error drops below Ts, its frozen copy stops changing. Static shapes, so it jits and
batches; it does not save time (see `musica_jax.fast_inference` for the paths that do).

Shape (fixed by the project): the iterations are one pure stage function composed with
`jax.lax.scan`, parameters stacked on a leading stage axis. The pyramid levels (228 /
114 / 57 px) differ in size, so they are packed into one zero-bordered atlas
(`pyramid.AtlasLayout`) and each iteration reads its level through scanned (level,
origin, level size, step scale) arrays: no Python branch per stage.

Speed (2-core CPU): the per-patch network runs in a channel-major layout, chunked over
groups of faces (`stage_features`): intermediates stay in cache instead of being
hundreds of MB of fresh allocations. `stage_step` / `run_cascade_unrolled` are the
straightforward reference (one gather into [B, P, 14, 14, 3], the Flax module) used by
the tests.
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


def stage_xs(config: ModelConfig, i: int) -> dict:
  """The scanned inputs of stage `i` alone (for paths that run one stage at a time)."""
  _, xs = stage_inputs(config)
  return {k: v[i] for k, v in xs.items()}


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


def stage_features(config: ModelConfig, params, atlas: jax.Array, centres: jax.Array, xs,
                   remat: bool = False):
  """Per-patch part of one iteration for a batch, chunked over groups of faces.

  Args:
    params: one stage's parameters.
    atlas: [B, H, W, C] every pyramid level of each face (`pyramid.build_atlas`).
    centres: [B, P, 2] patch centres in level-0 pixels (no gradient flows through them).
    xs: this iteration's scanned inputs (level, origin, level_size).
    remat: recompute each chunk's forward in the backward pass instead of storing its
      intermediates (training: they would be ~60 kB per patch).
  Returns (descriptors [B, P*D], mean attention [B, P]).
  """
  b, p = centres.shape[:2]
  ps = config.patch_size
  start, frac = pyramid.window_starts(centres, xs["level"], xs["level_size"], ps)
  k = face_group_size(b, p)
  face = jnp.repeat(jnp.arange(k, dtype=jnp.int32), p)

  def chunk(inputs):
    imgs, st, fr = inputs
    patches = pyramid.gather_patches_cm(imgs, face, st.reshape(-1, 2), fr.reshape(-1, 2), ps,
                                        origin=xs["origin"])
    desc, att = stage_net.patch_features(params, patches, config.use_attention)
    return desc.reshape(k, -1), att.reshape(k, p)

  if remat:
    chunk = jax.checkpoint(chunk)
  if k == b:
    return chunk((atlas, start, frac))
  g = b // k
  split = lambda x: x.reshape(g, k, *x.shape[1:])
  desc, att = jax.lax.map(chunk, (split(atlas), split(start), split(frac)))
  return desc.reshape(b, -1), att.reshape(b, p)


def stage_forward(config: ModelConfig, params, atlas, shape, hidden, xs, remat: bool = False):
  """One iteration (the scanned stage function): returns (shape, hidden, error, attention)."""
  centres = jax.lax.stop_gradient(shape[:, list(config.patch_indices), :])
  desc, att = stage_features(config, params, atlas, centres, xs, remat)
  hidden, disp, err = stage_net.recurrent_head(config, params, desc, hidden)
  return shape + xs["step_scale"] * disp, hidden, err, att


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

  The iterations are `stage_forward` composed with `lax.scan` over the stacked
  parameters and the scanned per-stage inputs of `stage_inputs`.
  """
  b = images.shape[0]
  if images.shape[1:3] != (config.image_size, config.image_size):
    raise ValueError(f"images must be [B, {config.image_size}, {config.image_size}, C], "
                     f"got {images.shape}")
  layout, xs = stage_inputs(config)
  atlas = pyramid.build_atlas(images.astype(jnp.float32), layout)
  shape0 = _broadcast_init(init_shape, b, config)
  hidden0 = jnp.zeros((b, config.hidden_size), jnp.float32)
  remat = _remat_default(b, config.num_patches)

  def body(carry, inputs):
    params_i, xs_i = inputs
    shape, hidden, frozen = carry
    shape, hidden, err, att = stage_forward(config, params_i, atlas, shape, hidden, xs_i, remat)
    active = ~frozen["done"]
    keep = lambda new, old: jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    frozen = dict(
        shape=keep(shape, frozen["shape"]),
        hidden=keep(hidden, frozen["hidden"]),
        error=keep(err, frozen["error"]),
        iterations=frozen["iterations"] + active.astype(jnp.int32),
        done=frozen["done"] | (active & (err < ts)),
    )
    return (shape, hidden, frozen), (shape, err, att)

  frozen0 = dict(shape=shape0, hidden=hidden0, error=jnp.full((b,), jnp.inf),
                 iterations=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool))
  (_, _, frozen), (shapes, errors, att) = jax.lax.scan(
      body, (shape0, hidden0, frozen0), (params, xs))
  return CascadeOutput(shapes=shapes, errors=errors, attention=att,
                       landmarks=frozen["shape"], estimated_error=frozen["error"],
                       hidden=frozen["hidden"], iterations=frozen["iterations"],
                       valid=frozen["error"] < tf)


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
