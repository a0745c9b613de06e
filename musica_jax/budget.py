"""The compute budget, the dial's second form: mean iterations per face (or MMACs).

The whole story of a budget lives here:
- `budget_iterations`: a budget given as iterations or MMACs, checked against the model.
- A batch of n >= 2 faces meets it exactly: `budget_capacities` gives the static number of
  faces that run each later stage (split over the stages by the validation faces' profile,
  info["profile"] of the model's quit_head.json); the compiled cascade
  (`fast_inference.run_selective`) runs those iterations on the faces of highest quitting
  score.
- One face alone can only run an iteration or not: it quits on the validation faces'
  threshold for the budget (`threshold_for_budget`).
- A sequence of single faces (video, a folder face by face) keeps the budget with a
  `BudgetStream`, which adapts that threshold face by face (`Predictor.stream`).
- `chunk_dial`: what one chunk of faces runs with, from the above.
numpy only.
"""
from __future__ import annotations

import threading

import numpy as np

from musica_jax import cost


def budget_iterations(config, info: dict | None, budget: float | None = None,
                      budget_mmacs: float | None = None) -> float | None:
  """A compute budget as mean iterations per face, from iterations or MMACs; checked
  (range, and that the model has the profile a budget needs). None when neither given."""
  if budget is not None and budget_mmacs is not None:
    raise ValueError("give budget (mean iterations per face) or budget_mmacs, not both")
  s = config.num_stages
  lo, hi = cost.cascade_macs(config, 1) / 1e6, cost.cascade_macs(config) / 1e6
  if budget_mmacs is not None:
    budget = mmacs_to_iterations(config, info, float(budget_mmacs))
  if budget is None:
    return None
  if not (np.isfinite(budget) and 1.0 <= budget <= s):
    raise ValueError(f"budget must be between 1 and {s} mean iterations per face "
                     f"({lo:.2f} to {hi:.2f} MMACs), got "
                     + (f"{budget:.4g} iterations" if budget_mmacs is None
                        else f"{float(budget_mmacs):.4g} MMACs"))
  if info is None:
    raise ValueError("this model has no quitting profile (quit_head.json, written by "
                     "experiments.fit_quit_head --install): a budget needs one; use ts")
  return float(budget)


def mmacs_to_iterations(config, info: dict | None, budget_mmacs: float) -> float:
  """Mean iterations per face that cost `budget_mmacs` MMACs per face. Iterations of
  equal cost: MMACs / per-iteration MMACs. With `stage_patches` (unequal costs) it
  depends on how the faces spread over the iterations: the model's quitting profile
  (info["profile"], the fraction of faces reaching each iteration at each mean) says,
  else the interpolation of `cost.cascade_macs`."""
  per = np.asarray(cost.iteration_macs(config), np.float64) / 1e6
  if np.allclose(per, per[0]):
    return float(budget_mmacs) / per[0]
  if info and "profile" in info:
    prof = np.asarray(info["profile"], np.float64)
    prof = prof[np.argsort(prof[:, 0])]
    mmacs = per[0] + prof[:, 1:] @ per[1:]
    if mmacs[0] <= budget_mmacs <= mmacs[-1]:
      return float(np.interp(budget_mmacs, mmacs, prof[:, 0]))
  # No profile, or outside it: between whole iterations (the caller checks the range).
  cum = np.concatenate([[0.0], np.cumsum(per)])
  return float(np.interp(budget_mmacs, cum, np.arange(len(cum)), left=0.0,
                         right=float(len(per) + 1)))


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
  table = table[np.isfinite(table[:, 0])]   # a null threshold (no face quits): -inf below
  order = np.argsort(table[:, 1])
  if budget > table[order[-1], 1]:          # above every finite row: no face quits
    return -np.inf
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


def chunk_dial(info: dict, budget: float | None, n: int, ts: float,
               stream: "BudgetStream | None" = None):
  """(capacities, threshold, target) for a chunk of n faces: no budget -> (None, ts, None);
  n >= 2 -> the exact capacities; one face -> the threshold of the budget (the stream's
  adapted one, and its target to `record`, when a stream keeps the budget)."""
  if budget is None:
    return None, ts, None
  if n >= 2:
    return budget_capacities(info, budget, n), ts, None
  if stream is None:
    return None, max(ts, threshold_for_budget(info, budget)), None
  target = stream.target()
  return None, max(ts, stream.threshold(target)), target
