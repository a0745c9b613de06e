"""A model's schedules: its weights reading fewer patches in the early iterations.

A model trained with `--stage_patches=9,17,34 --all_patches_every=2` runs its full
schedule (every patch at every iteration; the model directory's config) and the cheap one
(9, 17, then 34 patches: `ModelConfig.stage_patches`) with the same weights. Each
schedule has its own quitting policy beside the model: quit_head.json/.npz for the
model's own, quit_head@9_17_34.json/.npz for another
(`experiments.fit_quit_head --stage_patches=9,17,34 --install`).

A schedule may also have its own early stages (stages@9_17_34.npz beside the model, written
by `save_stages` / `experiments.attach_schedule`): a run that trained only those stages
(`--train_stages=0,1`) with the rest frozen, so the model's own weights, and its full
cascade's accuracy, stay exactly as they were; `with_schedule` puts them in place.

A budget in MMACs then picks the schedule: `choose` compares, on the held-out val faces
(each policy's "nme_profile": its NME per mean iterations there; `fit_quit_head --install`), each
schedule's dial at that budget (its full cascade when that costs less) and takes the
lowest NME. `Predictor.predict(budget_mmacs=...)` does this, so one dial spans from the
cheap schedule's first iteration to the full schedule's whole cascade.

Escalation: a cheap schedule is weakest where a face starts far off (large rotations, loose
boxes), and its own estimated error says so. Its policy may carry an "escalation" profile
(`escalation_profile`, measured on the val faces by `fit_quit_head --install`): per
threshold t, the faces whose estimated error after the cheap cascade is >= t run the model's
own full cascade as well, at the mean MMACs and NME listed. `choose` compares those points
too: a budget between the cheap cascade and the full one may then run the cheap cascade
for every face and the full one for its worst few (the cheapest such point within
ESCALATION_TOLERANCE of the lowest NME the budget affords: a cap, not a target). The budget
is the mean over faces like the val faces; harder faces escalate more often and spend more
(at most both cascades).
"""
from __future__ import annotations

import dataclasses
import io
import pathlib
from typing import NamedTuple

import jax
import ml_dtypes
import numpy as np

from musica_jax import atomic_io
from musica_jax import budget as budget_lib
from musica_jax import cost
from musica_jax import fast_inference
from musica_jax import model_io
from musica_jax import quit_head
from musica_jax.config import ModelConfig


def suffix(own: ModelConfig, config: ModelConfig) -> str:
  """The file suffix of the quitting policy of schedule `config` in the directory of a
  model whose own config is `own`: "" (its own schedule) or "@9_17_34" (patches per
  iteration; "@34_34_34" for all patches when its own schedule is a cheap one)."""
  if config.patches_per_stage == own.patches_per_stage:
    return ""
  return "@" + "_".join(str(k) for k in config.patches_per_stage)


def parse(text: str) -> tuple[int, ...]:
  """"9,17,34" or "9_17_34" (or "@9_17_34") -> (9, 17, 34)."""
  parts = text.lstrip("@").replace("_", ",").split(",")
  try:
    return tuple(int(k) for k in parts if k.strip())
  except ValueError as e:
    raise ValueError(f"a schedule is comma-separated patch counts, got {text!r}") from e


def split_model_name(name: str) -> tuple[str, tuple[int, ...] | None]:
  """"default@9_17_34" -> ("default", (9, 17, 34)); a name without such a suffix -> (name,
  None)."""
  head, sep, tail = str(name).rpartition("@")
  if sep and head and tail and all(c.isdigit() or c in "_," for c in tail):
    return head, parse(tail)
  return str(name), None


def available(path) -> list[tuple[int, ...]]:
  """The schedules with a quitting policy in a model directory, other than its own."""
  p = pathlib.Path(path)
  if not p.is_dir():
    return []
  return sorted(parse(f.name[len("quit_head@"):-len(".json")])
                for f in p.glob("quit_head@*.json"))


def _policy(m: model_io.LoadedModel, stage_patches):
  """(config reading `stage_patches`, its suffix, quit head params, quitting info) of m (a
  ValueError naming the model when the schedule does not fit it)."""
  try:
    cfg = dataclasses.replace(m.model_config, stage_patches=tuple(stage_patches))
  except ValueError as e:
    raise ValueError(f"model {m.path}: {e}") from e
  name = suffix(m.model_config, cfg)
  head = None
  if name and not m.from_workdir:
    try:
      head = quit_head.load(m.path, cfg.num_stages, cfg.hidden_size, name)
    except (ValueError, KeyError, OSError) as e:
      raise ValueError(f"model {m.path}: quit head of schedule {name[1:]}: {e}") from e
  q, info = (None, None) if head is None else head
  return cfg, name, q, info


def policies(m: model_io.LoadedModel) -> list[tuple[ModelConfig, dict | None]]:
  """(config, quitting info) of each of m's other schedules (`available`), in that order:
  what `choose` compares, without loading any schedule's own stages."""
  if m.from_workdir:
    return []
  out = []
  for s in available(m.path):
    cfg, _, _, info = _policy(m, s)
    out.append((cfg, info))
  return out


def with_schedule(m: model_io.LoadedModel, stage_patches) -> model_io.LoadedModel:
  """The same weights reading `stage_patches` (a ValueError naming the model when they do
  not fit it), with that schedule's quitting policy (none when it has none) and its own
  early stages when it has them (`save_stages`)."""
  cfg, name, q, info = _policy(m, stage_patches)
  if not name:
    return m
  params = m.params
  if not m.from_workdir and stages_path(m.path, name).is_file():
    params = _with_own_stages(m, name)
  return dataclasses.replace(m, params=params, model_config=cfg, quit_head=q, quit_info=info,
                             metadata={**m.metadata, "schedule": list(cfg.patches_per_stage)})


def stages_path(directory, name: str) -> pathlib.Path:
  """Where schedule `name` ("@9_17_34", `suffix`) keeps its own early stages."""
  return pathlib.Path(directory) / f"stages{name}.npz"


def _bf16(x: np.ndarray) -> np.ndarray:
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def save_stages(m: model_io.LoadedModel, params, config: ModelConfig, stages) -> pathlib.Path:
  """Writes stages `stages` of `params` (stacked [S, ...], e.g. a `--train_stages` run's
  EMA weights) beside the model directory `m` as schedule `config`'s own early stages. The
  other stages of `params` must be the model's own (up to its storage rounding), as a run
  with them frozen leaves them: else a ValueError naming the first that differs. Rows of
  the recurrent kernel that a stage does not read are stored as zeros (compressed away)."""
  name = suffix(m.model_config, config)
  stages = sorted(int(k) for k in stages)
  if not name or not stages or not 0 <= stages[0] <= stages[-1] < config.num_stages - 1:
    raise ValueError(f"own stages need a schedule other than the model's own and stages "
                     f"before the last (got {config.patches_per_stage}, stages {stages})")
  own, new = model_io.flatten_params(m.params), model_io.flatten_params(params)
  if set(own) != set(new) or any(own[k].shape != new[k].shape for k in own):
    raise ValueError(f"model {m.path}: the parameters do not have the model's names and shapes")
  rnd = _bf16 if m.dtype == "bfloat16" else (lambda x: np.asarray(x, np.float32))
  for k in sorted(own):
    for i in range(config.num_stages):
      if i not in stages and not np.allclose(rnd(new[k][i]), own[k][i], rtol=2 ** -7, atol=0):
        raise ValueError(f"model {m.path}: stage {i} of {k} differs from the model's: only "
                         f"the trained stages {stages} may (train with --train_stages)")
  stored = {}
  for k, v in new.items():
    v = np.array(v[stages], np.float32)
    if k in ("recurrent/u", "recurrent/kernel"):       # [S, P*D + H, .]
      for j, i in enumerate(stages):
        unread = np.ones(v.shape[1], bool)
        unread[fast_inference.recurrent_rows(config, i)] = False
        v[j, unread] = 0.0
    stored[k] = (v.astype(ml_dtypes.bfloat16).view(np.uint16) if m.dtype == "bfloat16" else v)
  stored["__stages__"] = np.asarray(stages, np.int32)
  stored["__model_params_sha256__"] = np.asarray(model_io.params_digest(m.path))
  buf = io.BytesIO()
  np.savez_compressed(buf, **stored)
  path = stages_path(m.path, name)
  atomic_io.write(path, lambda f: f.write(buf.getvalue()), binary=True)
  return path


def _with_own_stages(m: model_io.LoadedModel, name: str):
  """m's parameters with schedule `name`'s own stages in place (a ValueError naming the
  file when it does not fit the model)."""
  path = stages_path(m.path, name)
  try:
    with np.load(path, allow_pickle=False) as z:
      raw = {k: z[k] for k in z.files}
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: unreadable ({e})") from e
  if str(raw.pop("__model_params_sha256__", "")) != model_io.params_digest(m.path):
    raise ValueError(f"{path}: made for other weights than {m.path}'s params.npz")
  stages = [int(k) for k in raw.pop("__stages__")]
  own = model_io.flatten_params(m.params)
  if set(raw) != set(own):
    raise ValueError(f"{path}: parameter names differ from the model's")

  def put(keypath, leaf):
    k = model_io._key(keypath)  # noqa: SLF001  (the one naming of parameters)
    v = raw[k]
    v = v.view(ml_dtypes.bfloat16) if v.dtype == np.uint16 else v
    if v.shape != (len(stages),) + leaf.shape[1:]:
      raise ValueError(f"{path}: {k} has shape {v.shape}, expected "
                       f"{(len(stages),) + leaf.shape[1:]}")
    out = np.array(leaf, np.float32)
    out[stages] = np.asarray(v, np.float32)
    return out
  return jax.tree_util.tree_map_with_path(put, m.params)


# A budget is a cap for escalation: the cheapest escalation point whose validation NME is
# within this fraction of the lowest the budget affords. Past a few percent of the faces the
# val curve is flat within its noise, and on a CPU each escalated face costs a second,
# small-batch pass: spending the rest of the budget bought no accuracy and cost time
# (32 MMACs ran slower than the full cascade, benchmarks/deploy_escalation_cpu_2core.json).
ESCALATION_TOLERANCE = 0.01


class Choice(NamedTuple):
  """What serves a budget (`choose`): the schedule (index into the candidates), the mean
  iterations of its dial (None: its whole cascade) and the escalation threshold (None:
  none; else the faces whose estimated error after that cascade is >= it run the model's
  own full cascade too)."""
  index: int
  iterations: float | None = None
  escalate: float | None = None


def escalation_profile(estimated, nme_schedule, nme_own, schedule_mmacs: float,
                       own_mmacs: float, points: int = 41) -> list[list[float]]:
  """Rows [t, fraction escalated, mean MMACs per face, mean NME], by MMACs, of the rule
  "after the schedule's whole cascade, a face whose estimated error is >= t also runs the
  model's own full cascade (whose result it keeps)", on faces with the schedule's final
  estimated errors `estimated` [F], the two cascades' NMEs `nme_schedule`, `nme_own` [F]:
  t at `points` quantiles of the estimates, and t = inf (no face escalates). A non-finite
  estimate always escalates (as `Predictor.predict` does)."""
  e = np.asarray(estimated, np.float64)
  a, b = np.asarray(nme_schedule, np.float64), np.asarray(nme_own, np.float64)
  if not e.shape == a.shape == b.shape or e.ndim != 1 or e.size == 0:
    raise ValueError(f"escalation_profile needs equal-length 1-D arrays, got {e.shape}, "
                     f"{a.shape}, {b.shape}")
  finite = e[np.isfinite(e)]
  ts = np.unique(np.quantile(finite, np.linspace(0, 1, points))) if finite.size else []
  rows = []
  for t in list(ts) + [np.inf]:
    up = ~(e < t)
    rows.append([float(t), float(up.mean()), float(schedule_mmacs + up.mean() * own_mmacs),
                 float(np.where(up, b, a).mean())])
  return sorted(rows, key=lambda r: (r[2], -r[0]))


def escalated_mmacs(config: ModelConfig, own: ModelConfig, iterations) -> np.ndarray:
  """Multiply-adds per face (millions) of faces that ran `iterations` of schedule `config`
  and, where that is more than its cascade has (they escalated), the model's own full
  cascade `own` too."""
  it = np.asarray(iterations)
  s = config.num_stages
  cum = np.concatenate([[0.0], np.cumsum(cost.iteration_macs(config))]) / 1e6
  return cum[np.minimum(it, s)] + np.where(it > s, cost.cascade_macs(own) / 1e6, 0.0)


def _nme_at(config: ModelConfig, info: dict, budget_mmacs: float,
            escalate: bool = True) -> tuple[float, Choice]:
  """(validation NME of this schedule's dial at budget_mmacs, the choice that gets it:
  mean iterations (None: its full cascade, which costs no more) and, with `escalate` and
  the policy's "escalation" rows, the threshold of the cheapest escalation point within
  ESCALATION_TOLERANCE of the lowest NME the budget affords, when it beats the cascade
  alone). inf when the budget is below one iteration or the policy has no NME profile."""
  prof = info.get("nme_profile") if info else None
  if not prof:
    return np.inf, Choice(0)
  rows = np.asarray(prof, np.float64)
  rows = rows[np.argsort(rows[:, 0])]
  full = cost.cascade_macs(config) / 1e6
  if budget_mmacs >= full - 1e-9:
    alone = float(rows[-1, 1])
    # Escalation points within the budget (t None: the no-escalation row, inf in JSON).
    ok = [r for r in ((info.get("escalation") or []) if escalate else [])
          if r[0] is not None and np.isfinite(r[0]) and r[2] <= budget_mmacs + 1e-9]
    if ok:
      low = min(r[3] for r in ok)
      t, _, _, nme = min((r for r in ok if r[3] <= low * (1 + ESCALATION_TOLERANCE)),
                         key=lambda r: r[2])
      if nme < alone - 1e-12:
        return float(nme), Choice(0, None, float(t))
    return alone, Choice(0)
  if budget_mmacs < cost.cascade_macs(config, 1) / 1e6:
    return np.inf, Choice(0)
  it = budget_lib.mmacs_to_iterations(config, info, budget_mmacs)
  return float(np.interp(it, rows[:, 0], rows[:, 1])), Choice(0, it)


def choose(candidates: list[tuple[ModelConfig, dict | None]], budget_mmacs: float,
           escalate: bool = True) -> Choice:
  """What serves a budget of `budget_mmacs` MMACs per face (`Choice`): the lowest
  validation NME among candidates (config, quitting info), each at its dial, its whole
  cascade, or (with `escalate`, for a schedule other than the first) its whole cascade
  with escalation to the first's; the first (the model's own) on ties and when it has no
  NME profile (nothing to compare the others with: a policy fitted before profiles were
  kept would otherwise lose to any schedule that has one, at every budget)."""
  if not (candidates[0][1] or {}).get("nme_profile"):
    return Choice(0)
  best, best_nme = Choice(0), np.inf
  for i, (cfg, info) in enumerate(candidates):
    nme, c = _nme_at(cfg, info, budget_mmacs, escalate and i > 0)
    if nme < best_nme - 1e-12:
      best, best_nme = c._replace(index=i), nme
  return best if np.isfinite(best_nme) else Choice(0)


def for_budget_mmacs(m: model_io.LoadedModel, budget_mmacs: float, escalate: bool = True
                     ) -> tuple[model_io.LoadedModel, Choice] | None:
  """The loaded model's schedule that serves `budget_mmacs` best on validation and how
  (`choose`: the mean iterations of its dial, or None for its full cascade; the
  escalation threshold or None); None when that is the model's own schedule (or it has
  no other)."""
  others = policies(m)
  if not others:
    return None
  c = choose([(m.model_config, m.quit_info)] + others, budget_mmacs, escalate)
  return None if c.index == 0 else (with_schedule(m, others[c.index - 1][0].stage_patches), c)
