"""Inference paths whose early exit really saves time (paper: "knowing when to quit").

`cascade.run_cascade` exits early by masking: static shapes, every face pays for every
iteration. `run_selective` computes the same early-exit result (landmarks, estimated
error, hidden state, iterations, valid; tested against the masked cascade for the same
assignment in tests/test_fast_inference.py) but runs iteration i+1 only on the faces that
go on, in ONE jitted program with static shapes and no host round trip between stages:

- iteration 0 runs on the whole batch;
- before iteration i >= 1, `lax.top_k` picks the faces that go on (their images are not
  copied: the stage reads their patches from its pyramid level by index), the stage runs
  on [k, ...] and its results are scattered back (`cascade.early_exit_update`, the rule
  the masked cascade uses);
- how many faces k an iteration gets:
  * budget (`capacities`, static per compiled program, like a mixture-of-experts
    capacity): exactly capacities[i-1] faces, those of HIGHEST quitting score among the
    faces that ran iteration i-1 (score: the quit head's predicted gain, or the
    estimated error without a head). A batch then costs a fixed, known amount;
  * threshold (Ts, `capacities=None`): the faces whose score is still >= Ts; their count
    is only known on the device, so each iteration is a `lax.switch` over power-of-two
    buckets (each branch a static k; only the branch taken runs). At batch 1 the buckets
    are {0, 1}: the iteration runs or it does not.
  Both can combine (a capacity and a Ts: at most k faces, and only those above Ts).

The stages are unrolled in Python inside the jitted function (each stage has its own k;
a scan needs one shape per step), over per-stage parameter buffers (`unstack_params`):
slicing a stacked [S, K, 512] kernel inside a jitted function makes XLA copy the slice
(11-36 MB per iteration), which at batch 1 costs more than the product itself.

Optional bf16 storage of the recurrent and head kernels (`weight_dtype=jnp.bfloat16`;
products accumulate in f32) halves the weight bytes that bound batch-1 latency; it changes
the function slightly, so it is off by default.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from musica_jax import cascade
from musica_jax import crop as crop_lib
from musica_jax import pyramid
from musica_jax import quit_head as quit_head_lib
from musica_jax.config import ModelConfig


@flax.struct.dataclass
class EarlyExitOutput:
  landmarks: jax.Array         # [B, N, 2] landmarks after the quitting iteration
  estimated_error: jax.Array   # [B] estimated error of that iteration
  hidden: jax.Array            # [B, H] hidden state after that iteration
  iterations: jax.Array        # [B] int32 iterations computed
  valid: jax.Array             # [B] bool, estimated_error < t_fail


def unstack_params(params, weight_dtype=None, config: ModelConfig | None = None) -> tuple:
  """Stacked [S, ...] parameters -> tuple of S per-stage trees (separate buffers).

  weight_dtype: optional storage dtype (e.g. jnp.bfloat16) of the recurrent and head
  kernels, the bulk of the bytes (a factored recurrent layer: both factors u and v);
  everything else stays f32.
  config: with `stage_patches`, a stage that reads k < P patches keeps only the rows of
  its recurrent kernel (dense "kernel" or factor "u") that those patches and the hidden
  state multiply: its product then skips the unread patches' zeros (fewer multiply-adds,
  and fewer weight bytes, which bound batch-1 latency).
  """
  s = jax.tree.leaves(params)[0].shape[0]
  out = []
  for i in range(s):
    p = jax.tree.map(lambda x: jnp.array(x[i]), params)
    if config is not None and config.patches_per_stage[i] < config.num_patches:
      rows = np.asarray(recurrent_rows(config, i))
      rec = dict(p["recurrent"])
      name = "u" if "u" in rec else "kernel"
      rec[name] = jnp.asarray(np.asarray(rec[name])[rows])
      p["recurrent"] = rec
    if weight_dtype is not None:
      for name in ("recurrent", "head"):
        p[name] = {k: v if k == "bias" else v.astype(weight_dtype) for k, v in p[name].items()}
    out.append(p)
  return tuple(out)


def recurrent_rows(config: ModelConfig, stage: int) -> list[int]:
  """Rows of the recurrent kernel [P*D + H, .] that iteration `stage` multiplies: its read
  patches' descriptors, then the hidden state."""
  d, p = config.descriptor_size, config.num_patches
  rows = [j for q in config.stage_patch_positions(stage) for j in range(q * d, (q + 1) * d)]
  return rows + list(range(p * d, p * d + config.hidden_size))


def bucket_sizes(batch: int, min_bucket: int = 1) -> tuple[int, ...]:
  """Powers of two from min_bucket up to the batch size (the batch size included)."""
  sizes, k = [], max(1, min_bucket)
  while k < batch:
    sizes.append(k)
    k *= 2
  return tuple(sizes) + (batch,)


def _run_all(stage_params, levels, init_shape, config, t_fail, quit_params=None, ts=None,
             mask=None) -> EarlyExitOutput:
  """Every iteration on every face: the stages on the whole batch. ts None: no face quits.
  Else the masked early exit (the rule of `cascade.run_cascade`: a face's result freezes
  after the first iteration whose score is < ts; it still computes the rest), the same
  result as the selective program without its top-k, buckets and scatters."""
  b = levels[0].shape[0]
  shape = cascade.broadcast_init(init_shape, b, config)
  hidden = jnp.zeros((b, config.hidden_size), jnp.float32)
  state = None if ts is None else cascade.initial_state(shape, hidden)
  for stage in range(config.num_stages):
    xs = {k: v for k, v in cascade.stage_xs(config, stage).items() if k != "origin"}
    new, hidden, err, _ = cascade.stage_forward(
        config, stage_params[stage], levels[config.levels[stage]], shape, hidden, xs)
    if ts is not None:
      score = quit_head_lib.score(quit_head_lib.stage_slice(quit_params, stage), hidden, err,
                                  quit_head_lib.step_length(new, shape))
      state = cascade.early_exit_update(state, ~state["done"], new, hidden, err, score < ts)
      if stage == 0 and mask is not None:     # padding faces: the first iteration only
        state["done"] = state["done"] | ~jnp.asarray(mask, bool)
    shape = new
  if ts is not None:
    return EarlyExitOutput(landmarks=state["shape"], estimated_error=state["error"],
                           hidden=state["hidden"], iterations=state["iterations"],
                           valid=state["error"] < t_fail)
  return EarlyExitOutput(landmarks=shape, estimated_error=err, hidden=hidden,
                         iterations=jnp.full((b,), config.num_stages, jnp.int32),
                         valid=err < t_fail)


def _run_subset(config, params_i, quit_i, stage, levels, state, idx, go, ts):
  """Iteration `stage` on the faces `idx` [k] of the batch state; `go` [k] says which of
  them really run it (padding slots of a bucket do not). Returns the new batch state.
  `idx` comes from top_k: distinct and in range, so gather and scatter skip bounds
  handling (mode="promise_in_bounds")."""
  sub = jax.tree.map(lambda x: x.at[idx].get(mode="promise_in_bounds"), state)
  xs = {k: v for k, v in cascade.stage_xs(config, stage).items() if k != "origin"}
  shape, hidden, err, _ = cascade.stage_forward(
      config, params_i, levels[config.levels[stage]], sub["shape"], sub["hidden"], xs,
      face_index=idx)
  score = quit_head_lib.score(quit_i, hidden, err, quit_head_lib.step_length(shape, sub["shape"]))
  sub = {**cascade.early_exit_update(sub, go, shape, hidden, err, score < ts),
         "score": jnp.where(go, score, sub["score"])}
  return jax.tree.map(lambda full, part: full.at[idx].set(part, mode="promise_in_bounds",
                                                         unique_indices=True), state, sub)


_STATIC = ("config", "capacities", "min_bucket", "selective", "masked")


@functools.partial(jax.jit, static_argnames=_STATIC)
def run_selective(stage_params: tuple, quit_params, images, init_shape, config: ModelConfig,
                  ts=-jnp.inf, t_fail=jnp.inf, capacities: tuple[int, ...] | None = None,
                  min_bucket: int = 1, mask=None, selective: bool = True,
                  masked: bool = False) -> EarlyExitOutput:
  """Early exit that skips the computation of the faces that quit (one jitted program).

  Args:
    stage_params: per-stage parameters (`unstack_params`).
    quit_params: quit head stacked per stage (`quit_head`), or None (score = estimated
      error, the paper's rule).
    images, init_shape, config, ts, t_fail: as `cascade.run_cascade`.
    capacities: None (Ts decides; power-of-two buckets from min_bucket) or one static
      int per iteration after the first: at most that many faces run it, those of highest
      score among the faces that ran the previous iteration (and whose score is >= ts).
    mask: optional [B] bool; False rows (padding) run the first iteration only and never
      take a slot of a later one.
    selective: False when no face may quit (ts = -inf, no capacities): every iteration
      runs on the whole batch, without the selection (top-k, buckets, scatters), which
      only costs time then (`FastCascade.run` decides).
    masked: with a threshold (no capacities), compute every iteration for every face and
      freeze each face's result where it quits (`_run_all`): the same result, no
      selection machinery; for small batches on accelerators (`FastCascade`).
  """
  if images.shape[1:3] != (config.image_size, config.image_size):
    raise ValueError(f"images must be [B, {config.image_size}, {config.image_size}, C], "
                     f"got {images.shape}")
  # Each level in its own array, no zero-bordered atlas: the atlas copy of every face
  # (1.2 MB at 228 px) costs as much as an iteration at batch 64 on a 2-core CPU.
  levels = pyramid.build_levels(images.astype(jnp.float32), max(config.levels) + 1)
  return _run_levels(stage_params, quit_params, levels, init_shape, config, ts, t_fail,
                     capacities, min_bucket, mask, selective, masked)


@functools.partial(jax.jit, static_argnames=_STATIC)
def run_selective_sources(stage_params: tuple, quit_params, sources: tuple, init_shape,
                          config: ModelConfig, ts=-jnp.inf, t_fail=jnp.inf,
                          capacities: tuple[int, ...] | None = None, min_bucket: int = 1,
                          mask=None, selective: bool = True,
                          masked: bool = False) -> EarlyExitOutput:
  """`run_selective` from photos: the crop (`musica_jax.crop.crop_levels`: blend, zero
  fill, standardisation, pyramid) runs in the same program as the cascade. sources: the
  arrays of a `crop.CropSources` (`CropSources.arrays()`); the rest as `run_selective`."""
  if sources[1].shape[1] != 2 * config.image_size:
    raise ValueError(f"crop sources are for {sources[1].shape[1] // 2}-px crops, the model "
                     f"reads {config.image_size}")
  levels = crop_lib.crop_levels(tuple(sources), max(config.levels) + 1)
  return _run_levels(stage_params, quit_params, levels, init_shape, config, ts, t_fail,
                     capacities, min_bucket, mask, selective, masked)


def _run_levels(stage_params, quit_params, levels, init_shape, config, ts, t_fail, capacities,
                min_bucket, mask, selective=True, masked=False) -> EarlyExitOutput:
  """The selective cascade on the pyramid levels [level 0 [B, S, S, C], level 1, ...]."""
  b = levels[0].shape[0]
  s = config.num_stages
  if not selective and capacities is None:
    return _run_all(stage_params, levels, init_shape, config, t_fail)
  if masked and capacities is None:
    return _run_all(stage_params, levels, init_shape, config, t_fail, quit_params, ts, mask)
  if capacities is not None:
    capacities = tuple(int(k) for k in capacities)
    if len(capacities) != s - 1 or any(not 0 <= k <= b for k in capacities) or any(
        capacities[j] > capacities[j - 1] for j in range(1, len(capacities))):
      raise ValueError(f"capacities must be {s - 1} non-increasing ints in [0, {b}], got "
                       f"{capacities}")
  shape0 = cascade.broadcast_init(init_shape, b, config)
  state = cascade.initial_state(shape0, jnp.zeros((b, config.hidden_size), jnp.float32))
  state["score"] = jnp.full((b,), jnp.inf, jnp.float32)
  every = jnp.arange(b, dtype=jnp.int32)
  state = _run_subset(config, stage_params[0], quit_head_lib.stage_slice(quit_params, 0), 0,
                      levels, state, every, jnp.ones((b,), bool), ts)
  if mask is not None:
    state["done"] = state["done"] | ~jnp.asarray(mask, bool)
  for stage in range(1, s):
    quit_i = quit_head_lib.stage_slice(quit_params, stage)
    # Faces that ran every iteration so far and have not quit; the next iteration goes to
    # the k of them with the highest score (all of them when k >= their number).
    going = (state["iterations"] == stage) & ~state["done"]
    priority = jnp.where(going, state["score"], -jnp.inf)

    def run_k(st, k, stage=stage, quit_i=quit_i, going=going, priority=priority):
      _, idx = jax.lax.top_k(priority, k)
      return _run_subset(config, stage_params[stage], quit_i, stage, levels, st, idx,
                         going[idx], ts)

    if capacities is not None:
      if capacities[stage - 1] == 0:
        break
      state = run_k(state, capacities[stage - 1])
    else:
      sizes = bucket_sizes(b, min_bucket)
      n = going.sum()
      branches = [lambda st: st] + [functools.partial(run_k, k=k) for k in sizes]
      which = jnp.where(n == 0, 0, 1 + jnp.searchsorted(jnp.asarray(sizes), n))
      state = jax.lax.switch(which, branches, state)
  return EarlyExitOutput(landmarks=state["shape"], estimated_error=state["error"],
                         hidden=state["hidden"], iterations=state["iterations"],
                         valid=state["error"] < t_fail)


def _selective(ts, capacities) -> bool:
  """Whether to run the selective program: only when a face may quit (a finite ts or
  capacities). Without a dial every iteration runs on the whole batch (`_run_all`: no
  top-k, bucket switch or scatters). Measured on the shipped model (68/34, rank-128
  recurrent layer), 2-core CPU, photos to landmarks at batch 1: 2.43 against 2.57 ms
  (median of 60 interleaved calls) and 1.04 against 1.35 s to compile; batch 64 equal.
  (With the full-rank recurrent layer the selective program was faster at batch 1 on the
  CPU: 5.2 against 5.9 ms.) On accelerators the launches and syncs of the selection are
  what a batch-1 call costs."""
  return capacities is not None or float(ts) > -np.inf


# Batches up to this many faces with a threshold (no capacities) run the masked program on
# accelerators (`_masked`). Measured on one H200 (2026-12-04, issue #24, the full-rank
# default): batch 1, the threshold path 0.96 ms against 0.39 ms for the masked cascade;
# each iteration's selection there is a launch and a sync, dearer than the iteration
# itself. Not yet measured with this program (experiments/launch/gpu_check.sh times both).
MASKED_MAX_BATCH_ACCELERATOR = 4


def _masked(batch: int, capacities, backend: str | None = None) -> bool:
  """Whether a threshold dial runs masked (every iteration, results frozen where a face
  quits) instead of selective: small batches on accelerators; never on the CPU, where
  skipping an iteration saves its time."""
  backend = backend or jax.default_backend()
  return capacities is None and backend != "cpu" and batch <= MASKED_MAX_BATCH_ACCELERATOR


class FastCascade:
  """Prepared parameters (+ optional quit head) and the selective early-exit path.

    fc = FastCascade(params, config, quit_params=head)   # params stacked, as trained
    out = fc.run(images, mean_shape, ts=0.01)            # threshold dial
    out = fc.run(images, mean_shape, capacities=(48, 16))   # budget dial (static caps)
  """

  def __init__(self, params: Any, config: ModelConfig, weight_dtype=None, quit_params=None):
    self.config = config
    self.stage_params = unstack_params(params, weight_dtype, config)
    self.quit_params = None if quit_params is None else jax.tree.map(jnp.asarray, quit_params)

  def run(self, images, init_shape, ts=-np.inf, t_fail=np.inf,
          capacities: Sequence[int] | None = None, min_bucket: int = 1,
          mask=None) -> EarlyExitOutput:
    caps = None if capacities is None else tuple(int(k) for k in capacities)
    return run_selective(self.stage_params, self.quit_params, images, init_shape,
                         self.config, np.float32(ts), np.float32(t_fail), caps, min_bucket,
                         mask, _selective(ts, caps), _masked(images.shape[0], caps))

  def run_sources(self, sources: tuple, init_shape, ts=-np.inf, t_fail=np.inf,
                  capacities: Sequence[int] | None = None, min_bucket: int = 1,
                  mask=None) -> EarlyExitOutput:
    """`run` from the host part of the crops (`crop.CropSources.arrays()`): the crop
    runs in the cascade's program (`run_selective_sources`)."""
    caps = None if capacities is None else tuple(int(k) for k in capacities)
    return run_selective_sources(self.stage_params, self.quit_params, tuple(sources),
                                 init_shape, self.config, np.float32(ts),
                                 np.float32(t_fail), caps, min_bucket, mask,
                                 _selective(ts, caps), _masked(sources[0].shape[0], caps))
