"""The pure training step: Adam with a staircase schedule, EMA weights, NaN guard, and the
host-side divergence guard.

No TensorFlow, no I/O: experiments/train_lib.py feeds batches and owns checkpoints.
The model is deterministic (no dropout): all training randomness is augmentation and
sampling in the input pipeline, derived there from (seed, example, epoch). The only
key used here initialises the parameters: `jax.random.fold_in(root_key, 0)`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from musica_jax import cascade
from musica_jax import fast_inference
from musica_jax import losses
from musica_jax import metrics
from musica_jax import stage_net
# The configs live in musica_jax.config (no JAX import: the flag definitions read them).
from musica_jax.config import LR_SCHEDULES, ModelConfig, TrainConfig
from musica_jax.schemes import LandmarkScheme


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  # Count of steps whose loss or gradient was not finite; such updates are not applied.
  nonfinite_steps: jax.Array


def learning_rate_schedule(cfg: TrainConfig):
  if cfg.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.decay_factor)
  if cfg.lr_schedule != "staircase":
    raise ValueError(f"lr_schedule {cfg.lr_schedule!r}: one of {LR_SCHEDULES}")
  return optax.exponential_decay(cfg.learning_rate, transition_steps=cfg.decay_steps,
                                 decay_rate=cfg.decay_factor, staircase=True)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  return optax.adam(learning_rate_schedule(cfg))


def create_train_state(model_cfg: ModelConfig, train_cfg: TrainConfig) -> TrainState:
  key = jax.random.fold_in(jax.random.key(train_cfg.seed), 0)
  params = stage_net.init_stacked(key, model_cfg)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=make_optimizer(train_cfg).init(params),
                    nonfinite_steps=jnp.zeros((), jnp.int32))


def ema_decay_at(step, decay: float):
  """EMA decay with warm-up, min(decay, (1 + t) / (10 + t)): early on the average follows
  the weights (a 0.9999 average over a short run would still be the initialisation)."""
  t = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def train_step(state: TrainState, batch: dict, init_shape: jax.Array, *,
               model_cfg: ModelConfig, train_cfg: TrainConfig, scheme: LandmarkScheme):
  """One optimisation step. Returns (new state, metrics dict of scalars).

  batch: "image" [B, S, S, 3], "landmarks" [B, N, 2]; optional "mask" [B] (padding 0).
  A step whose loss or gradient is not finite leaves the state unchanged (except
  nonfinite_steps): the caller stops training and the last good state stays intact.
  """
  weights = batch.get("mask")
  weights = None if weights is None else weights.astype(jnp.float32)

  run_cfg = dataclasses.replace(model_cfg, compute_dtype=train_cfg.compute_dtype)
  patch_mask = None
  if train_cfg.all_patches_every and model_cfg.stage_patches:
    every = state.step % train_cfg.all_patches_every == 0      # all patches this step
    _, xs = cascade.stage_inputs(model_cfg)
    patch_mask = jnp.where(every, jnp.ones_like(xs["patch_mask"]), xs["patch_mask"])

  def loss_fn(params):
    out = cascade.run_cascade(params, batch["image"], init_shape, run_cfg,
                              patch_mask=patch_mask)
    total, parts = losses.cascade_loss(out.shapes, out.errors, batch["landmarks"],
                                       scheme.outer_eye_corners, weights,
                                       train_cfg.iteration_weights)
    return total, (out, parts)

  (loss, (out, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.global_norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  tx = make_optimizer(train_cfg)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  d = ema_decay_at(state.step, train_cfg.ema_decay)
  ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state.ema_params, params)
  if train_cfg.train_stages:      # the other stages' parameters and EMA stay bit for bit
    trained = np.zeros(model_cfg.num_stages, bool)
    trained[list(train_cfg.train_stages)] = True
    keep = lambda new, old: jnp.where(  # noqa: E731
        jnp.asarray(trained).reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
    params = jax.tree.map(keep, params, state.params)
    ema = jax.tree.map(keep, ema, state.ema_params)
  new = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                   nonfinite_steps=state.nonfinite_steps)
  keep_old = lambda n, o: jnp.where(ok, n, o)
  new = jax.tree.map(keep_old, new, state)
  new = new.replace(nonfinite_steps=state.nonfinite_steps + (~ok).astype(jnp.int32))
  nme = metrics.per_face_nme(out.shapes[-1], batch["landmarks"], scheme, "interocular")
  if weights is None:
    nme = nme.mean()
  else:
    nme = (nme * weights).sum() / jnp.maximum(weights.sum(), 1.0)
  return new, dict(loss=loss, nme=nme, grad_norm=grad_norm,
                   learning_rate=learning_rate_schedule(train_cfg)(state.step),
                   landmark_loss=parts["landmark_loss"][-1],
                   error_loss=parts["error_loss"][-1])


def eval_outputs(params, batch: dict, init_shape, *, model_cfg: ModelConfig,
                 scheme: LandmarkScheme, ts=-jnp.inf, t_fail=jnp.inf, quit_params=None,
                 capacities=None) -> dict:
  """Per-face evaluation outputs for a batch (jit this; thresholds are traced).

  The per-iteration outputs come from the full (masked) cascade. The early-exit ones
  (landmarks, estimated error, iterations, valid) follow the threshold rule with the
  model's quitting score (`quit_params`: a quit head, or None: the estimated error), or,
  with `capacities` (static), the budget path of `fast_inference.run_selective`.
  """
  out = cascade.run_cascade(params, batch["image"], init_shape, model_cfg, ts, t_fail,
                            quit_params)
  if capacities is not None:
    ee = fast_inference.run_selective(
        fast_inference.unstack_params(params), quit_params, batch["image"], init_shape,
        model_cfg, ts, t_fail, capacities=tuple(capacities), mask=batch.get("mask"))
    out = out.replace(landmarks=ee.landmarks, estimated_error=ee.estimated_error,
                      iterations=ee.iterations, valid=ee.valid)
  gt = batch["landmarks"]
  box = batch.get("box")
  res = {}
  for kind in metrics.NORMALISATIONS:
    res[f"nme_{kind}_per_iteration"] = metrics.per_face_nme(
        out.shapes, gt, scheme, kind, box)                          # [S, B]
  res["nme_interocular_early_exit"] = metrics.per_face_nme(out.landmarks, gt, scheme,
                                                           "interocular", box)
  res["nme_interpupil_early_exit"] = metrics.per_face_nme(out.landmarks, gt, scheme,
                                                          "interpupil", box)
  res["nme_interocular_init"] = metrics.per_face_nme(
      jnp.broadcast_to(init_shape, gt.shape), gt, scheme, "interocular", box)
  res["nme_interpupil_init"] = metrics.per_face_nme(
      jnp.broadcast_to(init_shape, gt.shape), gt, scheme, "interpupil", box)
  res["estimated_error"] = out.errors                                # [S, B]
  res["true_error"] = losses.per_iteration_error(out.shapes, gt, scheme.outer_eye_corners)
  res["iterations"] = out.iterations
  res["valid"] = out.valid
  res["landmarks"] = out.landmarks
  res["shapes"] = out.shapes
  res["attention"] = out.attention
  return res


class DivergenceGuard:
  """Stops a run whose loss blew up while staying finite (host side, no device sync).

  The rule: s_t, the exponential moving average of the per-step loss (decay `smoothing`,
  bias-corrected so s_1 is the first loss), is compared with its lowest value so far in
  this process; the run has diverged when s_t > factor x min(s). A healthy run's smoothed
  loss stays within a small multiple of its best (lr decay, GDB resampling and hard
  batches move it by well under 2x); a too-high learning rate sends it up by orders of
  magnitude within a few steps. factor <= 0 disables the guard. The state is not
  checkpointed: a resumed run starts a fresh reference from its first steps.
  """

  def __init__(self, factor: float = 10.0, smoothing: float = 0.9):
    if not (factor <= 0 or factor > 1):
      raise ValueError(f"divergence factor must be > 1 (or <= 0 to disable), got {factor}")
    if not 0 <= smoothing < 1:
      raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    self.factor, self.smoothing = float(factor), float(smoothing)
    self._ema, self._weight, self.best, self.best_step = 0.0, 0.0, float("inf"), None
    self.smoothed = float("nan")
    self.diverged_at = None            # the step at which the rule fired

  def update(self, step: int, loss: float) -> bool:
    """Feeds the loss of `step` (steps in order); True once the run has diverged.
    Non-finite losses are the NaN guard's business (TrainState.nonfinite_steps)."""
    if self.factor <= 0 or not np.isfinite(loss):
      return self.diverged_at is not None
    self._ema = self.smoothing * self._ema + (1 - self.smoothing) * float(loss)
    self._weight = self.smoothing * self._weight + (1 - self.smoothing)
    self.smoothed = self._ema / self._weight
    if self.smoothed < self.best:
      self.best, self.best_step = self.smoothed, step
    if self.diverged_at is None and self.smoothed > self.factor * self.best:
      self.diverged_at = step
    return self.diverged_at is not None

  def message(self) -> str:
    return (f"the loss diverged at step {self.diverged_at}: its moving average "
            f"{self.smoothed:.4g} is above {self.factor:g}x its best {self.best:.4g} "
            f"(step {self.best_step}; rule: --divergence_factor)")
