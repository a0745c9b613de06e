"""The MuSiCa cascade: iterations composed with `lax.scan`, early exit by masking.

Everything is in level-0 pixels of the face crop. Paper Eq. 1 (S <- 2 S + dx, with dx in
the pixels of the current level) is the same as adding 2^level * dx in level-0 pixels:
S1 = S0 + 4 d0, S2 = S1 + 2 d1, S3 = S2 + d2 for levels (2, 1, 0).

Early exit ("knowing when to quit"): the scan always runs the full chain (the per-
iteration outputs are those of the full cascade, which the threshold analysis needs) and
carries a second, frozen copy of (landmarks, hidden, error): once a face's estimated
error drops below Ts, its frozen copy stops changing. Static shapes, so it jits and
batches; it does not save time (see `musica_jax.fast_inference` for the paths that do).
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
  """
  b = images.shape[0]
  if images.shape[1:3] != (config.image_size, config.image_size):
    raise ValueError(f"images must be [B, {config.image_size}, {config.image_size}, C], "
                     f"got {images.shape}")
  layout, xs = stage_inputs(config)
  atlas = pyramid.build_atlas(images.astype(jnp.float32), layout)
  shape0 = _broadcast_init(init_shape, b, config)
  hidden0 = jnp.zeros((b, config.hidden_size), jnp.float32)

  def body(carry, inputs):
    params_i, xs_i = inputs
    shape, hidden, frozen = carry
    shape, hidden, err, att = stage_step(config, params_i, atlas, shape, hidden, xs_i)
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
