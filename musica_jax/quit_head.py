"""A learned quitting signal: a small head on the cascade's own state after each iteration.

Why (issue "knowing when to quit that pays"): the paper quits a face when its estimated
CURRENT error E falls below Ts. On 300W even the true current error used that way captures
only about half of the oracle's gain: a face with a high error that the next iteration
does not improve is better stopped, and its compute given to a face that does improve.
The oracle's knowledge is the GAIN of the next iteration; this head learns an estimate of
it (or of the current error, for comparison) from what the cascade already computed.

Features of a face after iteration i (all gradient-stopped: the head never changes the
landmarks, so the full cascade's accuracy is exactly the base model's):
  hidden state h_i [H], the network's E_i, log(max(E_i, 1e-4)), and the length of the
  iteration's step: mean over landmarks of |S_i - S_{i-1}| / BOX_SIZE (crop pixels per
  box side, so the same number whatever the face size).
Head per iteration (parameters stacked on a leading stage axis like the cascade's):
  standardise -> dense(hidden_units) -> relu -> dense(1). The last stage's head is never
  used to quit (the cascade ends there anyway); it is trained like the others.

Kinds (what the head predicts; `score` is what the quitting rule compares, in both cases
"quit when score < threshold", and the budget path runs the next iteration on the faces of
HIGHEST score):
  "gain":  NME_i - NME_{i+1} (inter-ocular, as a fraction), the next iteration's gain.
  "error": log NME_i; score = exp(output), an estimate of the current error.
  "estimated_error": no head: the network's own E (the paper's rule). Stored as
    quit_head.json alone, for its validation profile (budget -> capacities / threshold).
A face's quality score (what users threshold with Tf) stays the network's own E.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax

from musica_jax import atomic_io
from musica_jax import cost
from musica_jax import face_frame
from musica_jax import strict_json

KINDS = ("gain", "error")
PARAMS_FILE = "quit_head.npz"
INFO_FILE = "quit_head.json"
FORMAT = "musica-jax-quit-head"
VERSION = 1
_EPS = 1e-4


def features(hidden: jax.Array, error: jax.Array, step: jax.Array) -> jax.Array:
  """[..., H], [...], [...] -> [..., H + 3] (see the module docstring)."""
  e = error.astype(jnp.float32)[..., None]
  return jnp.concatenate([hidden.astype(jnp.float32), e, jnp.log(jnp.maximum(e, _EPS)),
                          step.astype(jnp.float32)[..., None]], axis=-1)


def step_length(new_shape: jax.Array, old_shape: jax.Array) -> jax.Array:
  """Mean landmark displacement of one iteration, in box sides: [..., N, 2] x2 -> [...]."""
  return jnp.linalg.norm(new_shape - old_shape, axis=-1).mean(-1) / face_frame.BOX_SIZE


def apply(params: dict, feats: jax.Array) -> jax.Array:
  """One stage's head: params of that stage (no stage axis), feats [..., D] -> score [...]."""
  x = (feats - params["mean"]) / params["std"]
  h = jax.nn.relu(x @ params["w1"] + params["b1"])
  out = h @ params["w2"] + params["b2"]
  return jnp.where(params["exp_output"] > 0, jnp.exp(jnp.minimum(out, 30.0)), out)


def score(params: dict | None, hidden, error, step) -> jax.Array:
  """The quitting score of one stage; None params = the network's own estimated error."""
  if params is None:
    return error
  return apply(params, jax.lax.stop_gradient(features(hidden, error, step)))


def stage_slice(params: dict | None, i: int):
  return None if params is None else jax.tree.map(lambda x: x[i], params)


# ------------------------------------------------------------------------------- fitting

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
    if self.kind not in KINDS:
      raise ValueError(f"quit head kind must be one of {KINDS}, got {self.kind!r}")
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
  return np.log(np.maximum(nme, _EPS))


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
    z = (x - fixed["mean"][:, None]) / fixed["std"][:, None] * use
    h = jax.nn.relu(jnp.einsum("sbd,sdh->sbh", z, p["w1"]) + p["b1"][:, None])
    return jnp.einsum("sbh,sh->sb", h, p["w2"]) + p["b2"][:, None]

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
  out = jax.vmap(apply)(jax.tree.map(jnp.asarray, params), jnp.asarray(feats, jnp.float32))
  return np.asarray(out, np.float64)


# ------------------------------------------------------------------------------- storage

def save(directory, params: dict | None, info: dict) -> None:
  """Writes quit_head.json (+ quit_head.npz unless params is None: the policy is then the
  network's estimated error) into a model directory, each file atomically."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  if params is None:
    (directory / PARAMS_FILE).unlink(missing_ok=True)
  else:
    atomic_io.write(directory / PARAMS_FILE, lambda fh: np.savez(
        fh, **{k: np.asarray(v, np.float32) for k, v in params.items()}), binary=True)
  doc = {"format": FORMAT, "version": VERSION, **info}
  atomic_io.write(directory / INFO_FILE, lambda fh: strict_json.dump(doc, fh, indent=1))


_KEYS = ("w1", "b1", "w2", "b2", "mean", "std", "exp_output")


def load(directory, num_stages: int, hidden_size: int) -> tuple[dict | None, dict] | None:
  """(params, info) of a model directory's quitting policy; None when it has none.

  params is None for the policy "the network's own estimated error" (info only: the
  validation profile that turns a budget into capacities or a threshold).
  """
  directory = pathlib.Path(directory)
  info_path = directory / INFO_FILE
  if not info_path.is_file():
    if (directory / PARAMS_FILE).is_file():
      raise ValueError(f"{directory}: {PARAMS_FILE} without {INFO_FILE}")
    return None
  try:
    info = json.loads(info_path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{info_path}: not valid JSON: {e}") from e
  if info.get("format") != FORMAT:
    raise ValueError(f"{info_path}: not a {FORMAT} file")
  for key in ("profile", "thresholds"):
    if not info.get(key):
      raise ValueError(f"{info_path}: no {key!r} table")
  if info.get("kind") == "estimated_error":
    return None, info
  with np.load(directory / PARAMS_FILE) as z:
    params = {k: np.asarray(z[k], np.float32) for k in z.files}
  missing = set(_KEYS) - set(params)
  if missing:
    raise ValueError(f"{directory / PARAMS_FILE}: missing arrays {sorted(missing)}")
  d = hidden_size + 3
  if params["w1"].shape[:2] != (num_stages, d):
    raise ValueError(f"{directory / PARAMS_FILE}: w1 has shape {params['w1'].shape}, the "
                     f"model needs [{num_stages}, {d}, units]")
  return params, info


def budget_iterations(config, info: dict | None, budget: float | None = None,
                      budget_mmacs: float | None = None) -> float | None:
  """A compute budget as mean iterations per face, from iterations or MMACs; checked
  (range, and that the model has the profile a budget needs). None when neither given."""
  if budget is not None and budget_mmacs is not None:
    raise ValueError("give budget (mean iterations per face) or budget_mmacs, not both")
  per_iteration = cost.cascade_macs(config, 1) / 1e6
  if budget_mmacs is not None:
    budget = float(budget_mmacs) / per_iteration
  if budget is None:
    return None
  s = config.num_stages
  if not (np.isfinite(budget) and 1.0 <= budget <= s):
    raise ValueError(f"budget must be between 1 and {s} mean iterations per face "
                     f"({per_iteration:.2f} to {s * per_iteration:.2f} MMACs), got "
                     f"{budget:.4g} iterations")
  if info is None:
    raise ValueError("this model has no quitting profile (quit_head.json, written by "
                     "experiments.fit_quit_head --install): a budget needs one; use ts")
  return float(budget)


def budget_capacities(info: dict, budget: float, batch: int) -> tuple[int, ...]:
  """Static per-stage capacities (faces that run stages 1..S-1) for a batch of `batch`
  faces and a budget of `budget` mean iterations per face.

  The split between stages follows the threshold policy on the validation faces at the
  same mean iterations (info["profile"]: rows of [mean_iterations, fraction reaching
  stage 1, ..., fraction reaching stage S-1], from `experiments.fit_quit_head`). The
  total is exact: sum(capacities) = round((budget - 1) * batch).
  """
  prof = np.asarray(info["profile"], np.float64)
  s = prof.shape[1]          # = num_stages (column 0 is mean iterations)
  if not 1.0 <= budget <= s:
    raise ValueError(f"budget must be in [1, {s}] mean iterations, got {budget}")
  order = np.argsort(prof[:, 0])
  x = prof[order, 0]
  fr = np.stack([np.interp(budget, x, prof[order, j]) for j in range(1, s)])
  total = int(round((budget - 1.0) * batch))
  want = fr * batch
  want = want * (total / max(want.sum(), 1e-9))
  caps = np.minimum(np.floor(want + 1e-9).astype(int), batch)
  for j in range(1, len(caps)):
    caps[j] = min(caps[j], caps[j - 1])
  # The rounding remainder goes to the earliest stage with room: the sets stay nested.
  diff = total - int(caps.sum())
  for j in range(len(caps)):
    room = (batch if j == 0 else caps[j - 1]) - caps[j]
    add = min(diff, room)
    caps[j] += add
    diff -= add
  return tuple(int(c) for c in caps)


def threshold_for_budget(info: dict, budget: float) -> float:
  """The quitting threshold whose mean iterations on the validation faces is `budget`
  (for batch 1, where a capacity cannot express a fraction of a face)."""
  table = np.asarray(info["thresholds"], np.float64)   # rows [threshold, mean_iterations]
  order = np.argsort(table[:, 1])
  return float(np.interp(budget, table[order, 1], table[order, 0]))


class BudgetStream:
  """Keeps a budget (mean iterations per face) over a stream of single faces.

  A batch of n >= 2 faces meets its budget exactly (`budget_capacities`); one face alone
  can only run an iteration or not, so it quits on a threshold. The threshold of the
  validation faces (`threshold_for_budget`) spends the budget only on faces like them:
  on easier faces (the 300W test photos with their own boxes, after a validation stream of
  augmented faces) they quit earlier and the stream runs fewer iterations than asked.
  This class closes the loop: before each face it asks the validation table for the
  threshold of the target `budget + bias + debt / horizon`, where bias is the mean shortfall
  of the single faces so far (target asked minus iterations run: how much easier this
  stream is than the table) and debt the iterations the stream still owes (budget x faces -
  iterations run); `record(iterations, target)` adds what the face ran. Faces still quit
  on their own score; the running mean reaches the budget within ~16 faces (tests). Plain
  numpy; deterministic given the stream; the counters are updated under a lock, so threads
  may share a stream (each reads slightly older counters).
  """

  def __init__(self, info: dict, budget: float, num_stages: int, horizon: float = 16.0):
    if not 1.0 <= budget <= num_stages:
      raise ValueError(f"budget must be in [1, {num_stages}] mean iterations, got {budget}")
    if horizon <= 0:
      raise ValueError(f"horizon must be > 0, got {horizon}")
    self.info, self.budget, self.num_stages, self.horizon = info, float(budget), num_stages, horizon
    self.faces = 0
    self.iterations = 0
    self._shortfall, self._single_faces = 0.0, 0
    self._lock = threading.Lock()   # threads sharing a predictor update the counters safely

  @property
  def mean_iterations(self) -> float:
    return self.iterations / self.faces if self.faces else float("nan")

  def target(self) -> float:
    """The mean iterations to ask the validation table for, for the next face."""
    debt = self.budget * self.faces - self.iterations
    bias = self._shortfall / self._single_faces if self._single_faces else 0.0
    return float(np.clip(self.budget + bias + debt / self.horizon, 1.0, self.num_stages))

  def threshold(self, target: float | None = None) -> float:
    """The quitting threshold for the next face (of `target`, default `self.target()`)."""
    return threshold_for_budget(self.info, self.target() if target is None else target)

  def record(self, iterations, target: float | None = None) -> None:
    """Adds the iterations the stream's faces ran (an int or an array of them). Faces
    that quit on `threshold(target)` pass that target: they teach the bias."""
    it = np.asarray(iterations).reshape(-1)
    with self._lock:
      self.faces += int(it.size)
      self.iterations += int(it.sum())
      if target is not None:
        self._shortfall += target * it.size - float(it.sum())
        self._single_faces += int(it.size)
