"""The MuSiCa cascade: one stage function scanned over stacked parameters, early exit by masking.

Everything is in level-0 pixels of the face crop. Paper Eq. 1 (S <- 2 S + dx, with dx in
the pixels of the current level) is the same as adding 2^level * dx in level-0 pixels:
S1 = S0 + 4 d0, S2 = S1 + 2 d1, S3 = S2 + d2 for levels (2, 1, 0).

Early exit ("knowing when to quit"): the cascade always runs the full chain (the per-
iteration outputs are those of the full cascade, which the threshold analysis needs) and
carries a second, frozen copy of (landmarks, hidden, error): once a face's quitting score
drops below Ts, its frozen copy stops changing. The score is the network's estimated error
E (the paper), or a learned quit head's (`musica_jax.quit_head`, e.g. the predicted gain of
the next iteration). Static shapes, so it jits and batches; it does not save time (see
`musica_jax.fast_inference` for the paths that do; they share `early_exit_update`).

Shape (fixed by the project): the iterations are one pure stage function composed with
`jax.lax.scan`, parameters stacked on a leading stage axis. The pyramid levels (228 /
114 / 57 px) differ in size, so they are packed into one zero-bordered atlas
(`pyramid.AtlasLayout`) and each iteration reads its level through scanned (level,
origin, level size, step scale) arrays: no Python branch per stage.

Speed: the per-patch network runs in a channel-major layout. On CPU it is chunked over
groups of faces (`stage_features`): intermediates stay in cache instead of being
hundreds of MB of fresh allocations. On GPU/TPU (`ModelConfig.execution`) every patch of the batch
goes through one batched pass: chunks there would be dozens of small sequential kernels.
`stage_step` is the straightforward reference (one
gather into [B, P, 14, 14, 3], the Flax module); the tests loop it over the stages.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from musica_jax import pyramid
from musica_jax import quit_head as quit_head_lib
from musica_jax import stage_net
from musica_jax.config import EXECUTIONS, ModelConfig


@flax.struct.dataclass
class CascadeOutput:
  shapes: jax.Array            # [S, B, N, 2] landmarks after every iteration (full run)
  errors: jax.Array            # [S, B] estimated error after every iteration
  attention: jax.Array         # [S, B, P] mean local patch attention per patch
  hiddens: jax.Array           # [S, B, H] hidden state after every iteration
  scores: jax.Array            # [S, B] quitting score after every iteration (E without a head)
  landmarks: jax.Array         # [B, N, 2] early-exit result
  estimated_error: jax.Array   # [B] estimated error of the early-exit result
  hidden: jax.Array            # [B, H] hidden state of the early-exit result
  iterations: jax.Array        # [B] int32 iterations computed before quitting
  valid: jax.Array             # [B] bool, estimated_error < Tf


def stage_inputs(config: ModelConfig):
  """Per-iteration static facts as arrays, scanned alongside the stacked parameters."""
  layout = pyramid.AtlasLayout(config.image_size, max(config.levels) + 1)
  levels = np.asarray(config.levels, np.int32)
  xs = dict(
      level=jnp.asarray(levels),
      origin=jnp.asarray(np.asarray(layout.origins, np.int32)[levels]),
      level_size=jnp.asarray(np.asarray(layout.level_sizes, np.int32)[levels]),
      step_scale=jnp.asarray(np.exp2(levels).astype(np.float32)),
  )
  if config.stage_patches:     # [S, P]: 1 where iteration i reads the patch
    mask = np.zeros((config.num_stages, config.num_patches), np.float32)
    for i in range(config.num_stages):
      mask[i, list(config.stage_patch_positions(i))] = 1.0
    xs["patch_mask"] = jnp.asarray(mask)
  return layout, xs


def stage_xs(config: ModelConfig, i: int) -> dict:
  """The inputs of stage `i` alone (for paths that run one stage at a time). With
  `stage_patches`, "patch_positions" (a static tuple) replaces the scan's "patch_mask":
  the stage then computes only the patches it reads."""
  _, xs = stage_inputs(config)
  out = {k: v[i] for k, v in xs.items() if k != "patch_mask"}
  if config.stage_patches:
    out["patch_positions"] = config.stage_patch_positions(i)
  return out


def stage_patch_mask(config: ModelConfig, xs) -> jax.Array | None:
  """[P] float, 1 for the patches this stage reads (None: all of them)."""
  if "patch_mask" in xs:
    return xs["patch_mask"]
  if "patch_positions" in xs:
    return jnp.zeros((config.num_patches,), jnp.float32).at[
        jnp.asarray(xs["patch_positions"])].set(1.0)
  return None


def _masked_descriptors(config: ModelConfig, desc, att, xs):
  """Descriptors [b, P*D] and attention [b, P] with the patches this stage does not read
  zeroed (a scanned stage computes them all, then masks) or scattered into zeros (a stage
  of its own computed only its `patch_positions`)."""
  b, p, d = desc.shape[0], config.num_patches, config.descriptor_size
  if "patch_positions" in xs:
    pos = jnp.asarray(xs["patch_positions"])
    desc = jnp.zeros((b, p, d), desc.dtype).at[:, pos].set(desc.reshape(b, -1, d))
    att = jnp.zeros((b, p), att.dtype).at[:, pos].set(att)
    return desc.reshape(b, p * d), att
  if "patch_mask" in xs:
    m = xs["patch_mask"]
    desc = (desc.reshape(b, p, d) * m[None, :, None].astype(desc.dtype)).reshape(b, p * d)
    return desc, att * m[None, :]
  return desc, att


def broadcast_init(init_shape, batch, config):
  init_shape = jnp.asarray(init_shape, jnp.float32)
  if init_shape.shape[-2:] != (config.num_landmarks, 2):
    raise ValueError(f"init_shape must end in ({config.num_landmarks}, 2), got {init_shape.shape}")
  return jnp.broadcast_to(init_shape, (batch, config.num_landmarks, 2))


def initial_state(shape0, hidden0) -> dict:
  """Early-exit state of a batch before the first iteration (see `early_exit_update`)."""
  b = shape0.shape[0]
  return dict(shape=shape0, hidden=hidden0, error=jnp.full((b,), jnp.inf, jnp.float32),
              iterations=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool))


def early_exit_update(state: dict, active, shape, hidden, err, quit_now) -> dict:
  """The one early-exit rule, shared by the masked cascade and the fast paths.

  Faces with `active` take the new (shape, hidden, err), count one more iteration and are
  done from now on when `quit_now`; the others keep their state. All arrays lead with
  the same face axis (the full batch, or the faces a fast path gathered).
  """
  keep = lambda new, old: jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
  return dict(shape=keep(shape, state["shape"]), hidden=keep(hidden, state["hidden"]),
              error=keep(err, state["error"]),
              iterations=state["iterations"] + active.astype(jnp.int32),
              done=state["done"] | (active & quit_now))


def stage_step(config: ModelConfig, params, atlas, shape, hidden, xs):
  """One iteration on the full chain: returns (new_shape, new_hidden, error, attention)."""
  centres = jax.lax.stop_gradient(shape[:, list(config.patch_indices), :])
  patches = pyramid.sample_patches(atlas, centres, xs["level"], xs["origin"],
                                   xs["level_size"], config.patch_size)
  hidden, disp, err, att = stage_net.apply_stage(config, params, patches, hidden, centres,
                                                 stage_patch_mask(config, xs))
  return shape + xs["step_scale"] * disp, hidden, err, att


# Patches per chunk of the per-patch network (conv, pool, attention). Measured on the 2-core
# CPU at batch 64 (68/68, one iteration): 96-192 patches per chunk is 2.5-3x faster than
# one pass over all 4352 patches, whose intermediates (hundreds of MB) miss every cache
# and are fresh page-faulting mmaps on every call.
TARGET_CHUNK_PATCHES = 160


def one_batched_pass(execution: str = "auto") -> bool:
  """Whether the per-patch network runs on the whole batch at once (`ModelConfig.execution`:
  "auto" (chunked over face groups on the CPU backend, one batched pass on GPU/TPU),
  "cpu" (always chunked) or "accelerator" (always one pass))."""
  if execution not in EXECUTIONS:
    raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
  if execution == "auto":
    return jax.default_backend() != "cpu"
  return execution == "accelerator"


def face_group_size(batch: int, num_patches: int, target: int | None = None,
                    execution: str = "auto") -> int:
  """Faces per chunk: the largest divisor of `batch` with at most `target` patches
  (the whole batch in one batched pass: `one_batched_pass(execution)`)."""
  if one_batched_pass(execution):
    return batch
  target = TARGET_CHUNK_PATCHES if target is None else target
  k = max(1, min(batch, target // max(num_patches, 1)))
  while batch % k:
    k -= 1
  return k


def stage_features(config: ModelConfig, params, atlas: jax.Array, centres: jax.Array, xs,
                   remat: bool = False, face_index: jax.Array | None = None):
  """Per-patch part of one iteration for a batch, chunked over groups of faces.

  Args:
    params: one stage's parameters.
    atlas: [B, H, W, C] every pyramid level of each face (`pyramid.build_atlas`).
    centres: [b, P, 2] patch centres in level-0 pixels (no gradient flows through them).
    xs: this iteration's scanned inputs (level, origin, level_size).
    remat: recompute each chunk's forward in the backward pass instead of storing its
      intermediates (training: they would be ~60 kB per patch).
    face_index: optional [b] int, the atlas row of each face of `centres` (the fast paths
      run an iteration on a subset of the batch and read its patches straight from the
      full batch, without copying the subset's images). None: row f for face f (b = B).
  `atlas` may also be this iteration's pyramid level alone, [B, h, w, C] without a
  border, when `xs` has no "origin" (the fast paths: `pyramid.gather_patches_level_cm`).
  Returns (descriptors [b, P*D], mean attention [b, P]).
  """
  b, p = centres.shape[:2]
  ps = config.patch_size
  start, frac = pyramid.window_starts(centres, xs["level"], xs["level_size"], ps)
  k = face_group_size(b, p, execution=config.execution)
  local_face = jnp.repeat(jnp.arange(k, dtype=jnp.int32), p)

  def chunk(inputs):
    imgs, rows, st, fr = inputs
    if "origin" in xs:                 # the atlas (scanned cascade)
      face = local_face if rows is None else jnp.repeat(rows, p)
      patches = pyramid.gather_patches_cm(imgs, face, st.reshape(-1, 2), fr.reshape(-1, 2),
                                          ps, origin=xs["origin"])
    else:                              # one level; the chunk's faces get their border here
      imgs = imgs if rows is None else jnp.take(imgs, rows, axis=0, mode="clip")
      patches = pyramid.gather_patches_level_cm(imgs, local_face, st.reshape(-1, 2),
                                                fr.reshape(-1, 2), ps)
    desc, att = stage_net.patch_features(params, patches, config.use_attention,
                                         config.compute_dtype)
    return desc.reshape(k, -1), att.reshape(k, p)

  if remat:
    chunk = jax.checkpoint(chunk)
  if k == b:
    return chunk((atlas, face_index, start, frac))
  g = b // k
  split = lambda x: x.reshape(g, k, *x.shape[1:])
  if face_index is None:
    desc, att = jax.lax.map(chunk, (split(atlas), None, split(start), split(frac)))
  else:
    desc, att = jax.lax.map(lambda t: chunk((atlas, *t)),
                            (split(face_index), split(start), split(frac)))
  return desc.reshape(b, -1), att.reshape(b, p)


def stage_forward(config: ModelConfig, params, atlas, shape, hidden, xs, remat: bool = False,
                  face_index=None):
  """One iteration (the scanned stage function): returns (shape, hidden, error, attention).
  `face_index`: see `stage_features` (shape and hidden are then the subset's)."""
  centres = jax.lax.stop_gradient(shape[:, list(config.patch_indices), :])
  read = (centres if "patch_positions" not in xs
          else centres[:, list(xs["patch_positions"]), :])
  desc, att = stage_features(config, params, atlas, read, xs, remat, face_index)
  rec = params["recurrent"]
  rows = (rec["u"] if "u" in rec else rec["kernel"]).shape[0]
  if "patch_positions" in xs and rows == read.shape[1] * config.descriptor_size + hidden.shape[-1]:
    # The kernel keeps only the read patches' rows (`fast_inference.unstack_params`).
    _, att = _masked_descriptors(config, desc, att, xs)
  else:
    desc, att = _masked_descriptors(config, desc, att, xs)
  hidden, disp, err = stage_net.recurrent_head(config, params, desc, hidden, centres)
  return shape + xs["step_scale"] * disp, hidden, err, att


def stage_params(params, i: int):
  return jax.tree.map(lambda x: x[i], params)


def run_cascade(params: Any, images: jax.Array, init_shape: jax.Array,
                config: ModelConfig, ts=-jnp.inf, t_fail=jnp.inf, quit_params=None,
                max_iterations=None, patch_mask=None) -> CascadeOutput:
  """The whole cascade for a batch of level-0 face crops.

  Args:
    params: stage parameters stacked on a leading axis of length config.num_stages.
    images: [B, S, S, 3] level-0 face crops (S = config.image_size), standardised.
    init_shape: [N, 2] or [B, N, 2] initial landmarks (the mean shape) in crop pixels.
    config: static model configuration.
    ts: success threshold; a face stops after the first iteration whose quitting score
      is < ts. -inf: every face runs every iteration.
    t_fail: failure threshold; valid = final estimated error < t_fail.
    quit_params: optional quit head (`quit_head`, stacked per stage): its score replaces
      the estimated error as the quitting signal. None: the paper's rule (E < ts).
    max_iterations: optional [B] int, a face stops after that many iterations (an
      explicit assignment: the reference for the budget path of `fast_inference`).
    patch_mask: optional [S, P] (traced), the patches each iteration reads, in place of
      `config.stage_patches`' (training's all_patches_every switches it per step).

  The iterations are `stage_forward` composed with `lax.scan` over the stacked
  parameters and the scanned per-stage inputs of `stage_inputs`.
  """
  b = images.shape[0]
  if images.shape[1:3] != (config.image_size, config.image_size):
    raise ValueError(f"images must be [B, {config.image_size}, {config.image_size}, C], "
                     f"got {images.shape}")
  layout, xs = stage_inputs(config)
  if patch_mask is not None:
    xs["patch_mask"] = jnp.asarray(patch_mask, jnp.float32).reshape(
        config.num_stages, config.num_patches)
  atlas = pyramid.build_atlas(images.astype(jnp.float32), layout)
  shape0 = broadcast_init(init_shape, b, config)
  hidden0 = jnp.zeros((b, config.hidden_size), jnp.float32)
  remat = _remat_default(b, config.num_patches, config.execution)
  limit = (jnp.full((b,), config.num_stages, jnp.int32) if max_iterations is None
           else jnp.asarray(max_iterations, jnp.int32))

  def body(carry, inputs):
    params_i, quit_i, xs_i = inputs
    old_shape, hidden, frozen = carry
    shape, hidden, err, att = stage_forward(config, params_i, atlas, old_shape, hidden, xs_i,
                                            remat)
    score = quit_head_lib.score(quit_i, hidden, err,
                                quit_head_lib.step_length(shape, old_shape))
    active = ~frozen["done"]
    quit_now = (score < ts) | (frozen["iterations"] + 1 >= limit)
    frozen = early_exit_update(frozen, active, shape, hidden, err, quit_now)
    return (shape, hidden, frozen), (shape, err, att, hidden, score)

  (_, _, frozen), (shapes, errors, att, hiddens, scores) = jax.lax.scan(
      body, (shape0, hidden0, initial_state(shape0, hidden0)), (params, quit_params, xs))
  return CascadeOutput(shapes=shapes, errors=errors, attention=att, hiddens=hiddens,
                       scores=scores, landmarks=frozen["shape"],
                       estimated_error=frozen["error"], hidden=frozen["hidden"],
                       iterations=frozen["iterations"], valid=frozen["error"] < t_fail)


# Rematerialise the per-patch network in the backward pass once its stored intermediates
# (~60 kB per patch and iteration) would pass this many patches per iteration. Below it,
# storing them is ~9% faster (68/68, batch 128, 2-core CPU: ~1.5 GB of residuals).
REMAT_ABOVE_PATCHES = 16384
# In one batched pass (accelerators) the stored intermediates of a whole iteration are on
# device memory at once: ~60 kB x patches, 15 GB per iteration at this threshold (batch
# 1024 of 68/68 stores 4 GB per iteration and is not rematerialised).
REMAT_ABOVE_PATCHES_ONE_PASS = 262144


def _remat_default(batch: int, num_patches: int, execution: str = "auto") -> bool:
  limit = REMAT_ABOVE_PATCHES_ONE_PASS if one_batched_pass(execution) else REMAT_ABOVE_PATCHES
  return batch * num_patches > limit


@functools.partial(jax.jit, static_argnames=("config",))
def run_cascade_jit(params, images, init_shape, config: ModelConfig, ts=-jnp.inf, t_fail=jnp.inf,
                    quit_params=None, max_iterations=None):
  """Jitted `run_cascade`; thresholds are traced, so sweeping them never recompiles."""
  return run_cascade(params, images, init_shape, config, ts, t_fail, quit_params, max_iterations)


def run_cascade_padded(params, images, init_shape, config: ModelConfig,
                       batch: int) -> list[tuple[CascadeOutput, int]]:
  """`run_cascade_jit` (full cascade) over the faces of `images` in chunks of `batch`, the
  last chunk padded with zero crops (one compiled program): [(output, faces in chunk)]."""
  outs = []
  for s in range(0, images.shape[0], batch):
    part = images[s:s + batch]
    k = part.shape[0]
    if k < batch:
      part = jnp.concatenate([part, jnp.zeros((batch - k,) + part.shape[1:], part.dtype)])
    outs.append((run_cascade_jit(params, part, init_shape, config), k))
  return outs
