"""Fitting the quitting heads (`musica_jax.quit_head`) on the cascade's features of
augmented training faces: one small MLP per stage, optax Adam, deterministic per seed.
Used by `experiments.fit_quit_head` (the study and `--install`); inference needs only
`musica_jax.quit_head`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from musica_jax import quit_head


@dataclasses.dataclass(frozen=True)
class FitConfig:
  kind: str = "gain"
  hidden_units: int = 64
  steps: int = 3000
  batch_size: int = 512
  learning_rate: float = 3e-3
  loss: str = "huber"        # huber | l2 | rank (pairwise logistic on the target's order)
  huber_delta: float = 0.01  # NME units (1% inter-ocular)
  seed: int = 0
  # "all": hidden state + the generic signals; "generic": E, log E and the step length
  # only (the hidden-state weights are zero): a head that cannot memorise faces.
  inputs: str = "all"

  def __post_init__(self):
    if self.kind not in quit_head.KINDS:
      raise ValueError(f"quit head kind must be one of {quit_head.KINDS}, got {self.kind!r}")
    if self.loss not in ("huber", "l2", "rank"):
      raise ValueError(f"quit head loss must be huber, l2 or rank, got {self.loss!r}")
    if self.inputs not in ("all", "generic"):
      raise ValueError(f"quit head inputs must be all or generic, got {self.inputs!r}")


def targets(nme: np.ndarray, kind: str) -> np.ndarray:
  """Per-stage targets [S, F] from the true per-iteration errors nme [S, F] (fractions).

  gain: nme[i] - nme[i+1] (the last stage: 0, nothing follows). error: log nme[i].
  """
  nme = np.asarray(nme, np.float64)
  if kind == "gain":
    out = np.zeros_like(nme)
    out[:-1] = nme[:-1] - nme[1:]
    return out
  return np.log(np.maximum(nme, quit_head.EPS))


def fit(feats: np.ndarray, nme: np.ndarray, cfg: FitConfig) -> dict:
  """Trains one head per stage on feats [S, F, D] and true errors nme [S, F].

  Returns stacked numpy parameters [S, ...] (the `score` convention of `apply`).
  Deterministic for a given cfg.seed.
  """
  feats = np.asarray(feats, np.float32)
  s, f, d = feats.shape
  y = targets(nme, cfg.kind).astype(np.float32)
  mean = feats.mean(1)
  std = np.maximum(feats.std(1), 1e-3)
  # Inputs the head may use (the last 3 features are the generic signals).
  use = np.ones((d,), np.float32) if cfg.inputs == "all" else (np.arange(d) >= d - 3).astype(
      np.float32)
  key = jax.random.key(cfg.seed)
  k1, k2, kb = jax.random.split(key, 3)
  init = dict(
      w1=jax.random.normal(k1, (s, d, cfg.hidden_units)) * (1.0 / np.sqrt(d)),
      b1=jnp.zeros((s, cfg.hidden_units)),
      w2=jax.random.normal(k2, (s, cfg.hidden_units)) * (0.1 / np.sqrt(cfg.hidden_units)),
      b2=jnp.asarray(y.mean(1)))
  fixed = dict(mean=jnp.asarray(mean), std=jnp.asarray(std),
               exp_output=jnp.full((s,), 1.0 if cfg.kind == "error" else 0.0))
  tx = optax.adam(optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps))
  feats_j, y_j = jnp.asarray(feats), jnp.asarray(y)

  def raw(p, x):   # [S, b, D] -> [S, b], without the exp of "error" heads
    # The inference MLP (`quit_head.apply_raw`) per stage; inputs not in `use` get no weight.
    return jax.vmap(quit_head.apply_raw)({**p, **fixed, "w1": p["w1"] * use[None, :, None]}, x)

  def loss_fn(p, idx):
    x, t = feats_j[:, idx], y_j[:, idx]
    out = raw(p, x)
    if cfg.loss == "l2":
      return jnp.mean(jnp.square(out - t))
    if cfg.loss == "huber":
      delta = cfg.huber_delta if cfg.kind == "gain" else 0.1
      return jnp.mean(optax.huber_loss(out, t, delta=delta))
    # Pairwise logistic ranking loss on random pairs, plus a small L2 that anchors the
    # scale (thresholds and budgets need comparable numbers across stages).
    half = idx.shape[0] // 2
    diff = out[:, :half] - out[:, half:2 * half]
    sign = jnp.sign(t[:, :half] - t[:, half:2 * half])
    rank = jnp.mean(jax.nn.softplus(-sign * diff / 0.01))
    return rank + jnp.mean(jnp.square(out - t)) / 1e-4 * 0.1

  @jax.jit
  def step(p, opt, k):
    idx = jax.random.randint(k, (cfg.batch_size,), 0, f)
    loss, g = jax.value_and_grad(loss_fn)(p, idx)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt, loss

  p, opt = init, tx.init(init)
  for k in jax.random.split(kb, cfg.steps):
    p, opt, _ = step(p, opt, k)
  p = dict(p, w1=p["w1"] * use[None, :, None])     # unused inputs: exactly zero weight
  out = {**{k: np.asarray(v) for k, v in p.items()},
         **{k: np.asarray(v) for k, v in fixed.items()}}
  return {k: v.astype(np.float32) for k, v in out.items()}


def scores_numpy(params: dict, feats: np.ndarray) -> np.ndarray:
  """Scores [S, F] of every stage's head on feats [S, F, D] (analysis; numpy in/out)."""
  out = jax.vmap(quit_head.apply)(jax.tree.map(jnp.asarray, params),
                                  jnp.asarray(feats, jnp.float32))
  return np.asarray(out, np.float64)
