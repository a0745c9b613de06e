"""Inference paths whose early exit really saves time (reference notes: "knowing when to quit").

`cascade.run_cascade` exits early by masking: static shapes, every face pays for every
iteration. The two paths here compute the same early-exit result (landmarks, estimated
error, hidden state, iterations, valid; tested against the masked cascade in
tests/test_fast_inference.py) but stop computing:

- `run_streaming` (batch 1 or small batches, one jitted call): a `lax.while_loop` over the
  iterations; each trip runs the current iteration through `lax.switch` (each branch is one
  stage with its own parameters, reading its level of the atlas) and the loop ends as soon as every face of the batch has
  quit. The per-stage parameters are separate buffers (`unstack_params`): slicing a
  stacked [S, K, 512] kernel inside a jitted function makes XLA copy the slice (11-36 MB
  per iteration), which at batch 1 costs more than the product itself.
- `run_compacted` (batches): iteration 0 runs on the whole batch; after each iteration
  the faces still running are gathered into the smallest power-of-two bucket that holds
  them (static shapes per bucket, so each (iteration, bucket) compiles once), the next
  iteration runs on that bucket only, and the results are scattered back. The host reads
  the estimated errors between iterations (one small device-to-host copy per iteration).

`FastCascade` bundles both with the prepared parameters. Optional bf16 storage of the
recurrent and head kernels (`weight_dtype=jnp.bfloat16`; products accumulate in f32)
halves the weight bytes that bound batch-1 latency; it changes the function slightly, so
it is off by default and the benchmark reports its landmark deviation.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from musica_jax import cascade
from musica_jax import pyramid
from musica_jax.config import ModelConfig


@flax.struct.dataclass
class EarlyExitOutput:
  landmarks: jax.Array         # [B, N, 2] landmarks after the quitting iteration
  estimated_error: jax.Array   # [B] estimated error of that iteration
  hidden: jax.Array            # [B, H] hidden state after that iteration
  iterations: jax.Array        # [B] int32 iterations computed
  valid: jax.Array             # [B] bool, estimated_error < tf


def unstack_params(params, weight_dtype=None) -> tuple:
  """Stacked [S, ...] parameters -> tuple of S per-stage trees (separate buffers).

  weight_dtype: optional storage dtype (e.g. jnp.bfloat16) of the recurrent and head
  kernels, the bulk of the bytes; everything else stays f32.
  """
  s = jax.tree.leaves(params)[0].shape[0]
  out = []
  for i in range(s):
    p = jax.tree.map(lambda x: jnp.array(x[i]), params)
    if weight_dtype is not None:
      for name in ("recurrent", "head"):
        p[name] = dict(p[name], kernel=p[name]["kernel"].astype(weight_dtype))
    out.append(p)
  return tuple(out)


def _atlas(config: ModelConfig, images):
  layout, _ = cascade.stage_inputs(config)
  return pyramid.build_atlas(images.astype(jnp.float32), layout)


@functools.partial(jax.jit, static_argnames=("config",))
def run_streaming(stage_params: tuple, images, init_shape, config: ModelConfig,
                  ts=-jnp.inf, tf=jnp.inf) -> EarlyExitOutput:
  """Early exit by control flow: stops after the iteration where every face has quit.

  Args: as `cascade.run_cascade`, with `stage_params` from `unstack_params`.
  """
  b = images.shape[0]
  if images.shape[1:3] != (config.image_size, config.image_size):
    raise ValueError(f"images must be [B, {config.image_size}, {config.image_size}, C], "
                     f"got {images.shape}")
  atlas = _atlas(config, images)
  shape0 = cascade._broadcast_init(init_shape, b, config)
  hidden0 = jnp.zeros((b, config.hidden_size), jnp.float32)

  def branch(i):
    def run(operands):
      params, atl, shape, hidden = operands
      shape, hidden, err, _ = cascade.stage_forward(
          config, params[i], atl, shape, hidden, cascade.stage_xs(config, i))
      return shape, hidden, err
    return run

  branches = [branch(i) for i in range(config.num_stages)]

  def cond(carry):
    i, state = carry
    return (i < config.num_stages) & ~jnp.all(state["done"])

  def body(carry):
    i, st = carry
    shape, hidden, err = jax.lax.switch(i, branches, (stage_params, atlas, st["shape"],
                                                      st["hidden"]))
    active = ~st["done"]
    keep = lambda new, old: jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    st = dict(shape=keep(shape, st["shape"]), hidden=keep(hidden, st["hidden"]),
              error=keep(err, st["error"]),
              iterations=st["iterations"] + active.astype(jnp.int32),
              done=st["done"] | (active & (err < ts)))
    return i + 1, st

  st0 = dict(shape=shape0, hidden=hidden0, error=jnp.full((b,), jnp.inf, jnp.float32),
             iterations=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool))
  _, st = jax.lax.while_loop(cond, body, (jnp.int32(0), st0))
  return EarlyExitOutput(landmarks=st["shape"], estimated_error=st["error"],
                         hidden=st["hidden"], iterations=st["iterations"],
                         valid=st["error"] < tf)


# --- batched: compaction into power-of-two buckets ----------------------------------------

@functools.partial(jax.jit, static_argnames=("config",))
def _first_stage(params0, images, init_shape, config: ModelConfig):
  b = images.shape[0]
  atlas = _atlas(config, images)
  shape = cascade._broadcast_init(init_shape, b, config)
  hidden = jnp.zeros((b, config.hidden_size), jnp.float32)
  shape, hidden, err, _ = cascade.stage_forward(config, params0, atlas, shape, hidden,
                                                cascade.stage_xs(config, 0))
  return atlas, shape, hidden, err


@functools.partial(jax.jit, static_argnames=("config", "stage"), donate_argnums=(3, 4))
def _bucket_stage(params_i, atlas, idx, shape, hidden, config: ModelConfig, stage: int):
  """Runs `stage` on the faces `idx` (a bucket; padding repeats a real index) and writes
  their new shape / hidden back into the full-batch arrays. Returns (shape, hidden, err)."""
  s, h, err, _ = cascade.stage_forward(config, params_i, jnp.take(atlas, idx, axis=0),
                                       shape[idx], hidden[idx], cascade.stage_xs(config, stage))
  return shape.at[idx].set(s), hidden.at[idx].set(h), err


def bucket_size(n: int, batch: int, min_bucket: int = 4) -> int:
  """Smallest power of two >= n (at least min_bucket), capped at the batch size."""
  size = max(min_bucket, 1 << max(0, int(n - 1).bit_length()))
  return min(size, batch)


def run_compacted(stage_params: tuple, images, init_shape, config: ModelConfig,
                  ts=-np.inf, tf=np.inf, min_bucket: int = 4,
                  stats: dict | None = None) -> EarlyExitOutput:
  """Batched early exit that skips finished faces (compaction into static buckets).

  stats: optional dict; receives "faces_per_stage" (faces computed per iteration,
  bucket padding included).
  """
  images = jnp.asarray(images)
  b = images.shape[0]
  atlas, shape, hidden, err = _first_stage(stage_params[0], images, init_shape, config)
  err_h = np.asarray(err)
  out_err = err_h.copy()
  iterations = np.ones((b,), np.int32)
  done = err_h < ts
  faces = [b]
  # Full-batch early-exit state: rows of faces that have quit are never written again.
  for stage in range(1, config.num_stages):
    active = np.flatnonzero(~done)
    if active.size == 0:
      break
    size = bucket_size(active.size, b, min_bucket)
    idx = np.full((size,), active[0], np.int32)
    idx[:active.size] = active
    shape, hidden, err = _bucket_stage(stage_params[stage], atlas, jnp.asarray(idx), shape,
                                       hidden, config=config, stage=stage)
    err_h = np.asarray(err)[:active.size]
    out_err[active] = err_h
    iterations[active] += 1
    done[active] = err_h < ts
    faces.append(size)
  if stats is not None:
    stats["faces_per_stage"] = faces
  out_err = jnp.asarray(out_err)
  return EarlyExitOutput(landmarks=shape, estimated_error=out_err, hidden=hidden,
                         iterations=jnp.asarray(iterations), valid=out_err < tf)


class FastCascade:
  """Prepared parameters + the two early-exit paths.

    fc = FastCascade(params, config)               # params stacked, as trained
    out = fc.streaming(image[None], mean_shape, ts, tf)   # batch 1 / small batches
    out = fc.batched(images, mean_shape, ts, tf)          # large batches
  """

  def __init__(self, params: Any, config: ModelConfig, weight_dtype=None):
    self.config = config
    self.stage_params = unstack_params(params, weight_dtype)

  def streaming(self, images, init_shape, ts=-np.inf, tf=np.inf) -> EarlyExitOutput:
    return run_streaming(self.stage_params, images, init_shape, self.config, ts, tf)

  def batched(self, images, init_shape, ts=-np.inf, tf=np.inf, min_bucket: int = 4,
              stats: dict | None = None) -> EarlyExitOutput:
    return run_compacted(self.stage_params, images, init_shape, self.config, ts, tf,
                         min_bucket, stats)
