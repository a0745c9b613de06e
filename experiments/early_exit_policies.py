"""Early-exit ("knowing when to quit") policy analysis, paper section 3.2, Figures 2 and 7.

Pure numpy. Inputs are per-iteration, per-face arrays of one evaluation split:

  nme        [S, F]  the true error whose mean is reported (e.g. inter-ocular NME) of the
                     landmarks after iteration s (0-based) of the full cascade;
  estimated  [S, F]  the cascade's estimated error E after iteration s.

A policy's outcome is an *assignment* of faces to exit iterations (`exit_idx` [F] and its
`counts` [S]: `early_exit_assignment`).

Three policies at the same cost profile (the counts produced by a success threshold Ts):

* policy  -- ours: quit at the first iteration with E < Ts, else at the last one.
* random  -- the paper's baseline: the same counts, faces assigned to iterations uniformly
             at random; mean NME averaged over `draws` (50) seeded draws. Its exact
             expectation, sum_s counts[s] * mean_f nme[s, f] / F, is reported too.
* oracle  -- the same counts assigned using the true error: the assignment with exactly
             those counts that minimises the mean true NME, a lower bound for every policy
             of that cost (exact; `early_exit_oracle`, which also has the weaker sequential
             reading reported beside it).

Also here: the Ts sweep, the failure-threshold (Tf) curve, working points (Ts for a target
NME or a budget of mean iterations / MACs) and the comparison at about 2 mean iterations.
The calibration of E is in `estimate_calibration`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from experiments import early_exit_assignment as assignment
from experiments import early_exit_oracle as oracle


# ----------------------------------------------------------------------------- basics

def _check_pair(nme, estimated):
  nme = assignment.check_2d(nme, "nme")
  estimated = assignment.check_2d(estimated, "estimated")
  if nme.shape != estimated.shape:
    raise ValueError(f"nme {nme.shape} and estimated {estimated.shape} differ in shape")
  return nme, estimated


def exit_iterations(estimated, ts: float) -> np.ndarray:
  """[F] 0-based exit iteration: the first s with estimated[s] < ts, else S - 1."""
  estimated = assignment.check_2d(estimated, "estimated")
  below = estimated < ts
  below[-1] = True   # the last iteration always ends it
  return np.argmax(below, axis=0).astype(np.int64)


def mean_iterations(counts) -> float:
  counts = np.asarray(counts, np.float64)
  return float((counts * np.arange(1, len(counts) + 1)).sum() / counts.sum())


# ----------------------------------------------------------------------------- policies

def policy(nme, estimated, ts: float) -> dict:
  """Ours for one Ts: exit iterations, counts, mean iterations and mean NME."""
  nme, estimated = _check_pair(nme, estimated)
  exit_idx = exit_iterations(estimated, ts)
  counts = assignment.counts_of(exit_idx, nme.shape[0])
  return dict(exit_idx=exit_idx, counts=counts, mean_iterations=mean_iterations(counts),
              nme=float(assignment.assignment_nme(nme, exit_idx).mean()))


def random_baseline(nme, counts, draws: int = 50, seed: int = 0) -> dict:
  """The same counts assigned at random: mean NME over `draws` seeded draws.

  Returns {"nme": mean over draws, "std": std over draws, "expected": the exact
  expectation sum_s counts[s] * mean_f nme[s, f] / F}.
  """
  nme = assignment.check_2d(nme, "nme")
  s, f = nme.shape
  counts = assignment.check_counts(counts, s, f)
  labels = np.repeat(np.arange(s), counts)
  rng = np.random.default_rng(seed)
  vals = np.array([nme[labels, rng.permutation(f)].mean() for _ in range(draws)])
  expected = float((counts * nme.mean(axis=1)).sum() / f)
  return {"nme": float(vals.mean()), "std": float(vals.std()), "expected": expected}


# ----------------------------------------------------------------------------- sweep

def ts_grid(estimated, max_points: int = 0) -> np.ndarray:
  """Ascending success thresholds covering every distinct decision of the policy.

  The policy only changes when Ts passes a value of estimated[:-1]; the grid is -inf
  (every face runs every iteration), then just above each such value (so that value
  counts as below Ts), or above `max_points` of them at evenly spaced quantiles.
  """
  estimated = assignment.check_2d(estimated, "estimated")
  vals = np.unique(estimated[:-1].ravel())
  vals = vals[np.isfinite(vals)]
  if max_points and vals.size > max_points:
    pick = np.unique(np.round(np.linspace(0, vals.size - 1, max_points)).astype(np.int64))
    vals = vals[pick]
  return np.concatenate([[-np.inf], np.nextafter(vals, np.inf)])


def sweep(nme, estimated, ts_values: Sequence[float] | None = None, draws: int = 50,
          seed: int = 0, with_oracle: bool = True, max_points: int = 0) -> dict:
  """Ts sweep: per Ts, mean iterations and mean NME of the policy, random and oracle.

  Returns a dict of lists (one entry per Ts, ascending Ts, so non-increasing mean
  iterations): ts, mean_iterations, counts, nme_policy, nme_random (mean over draws),
  nme_random_std, nme_random_expected, nme_oracle, nme_oracle_sequential. Each random
  point uses the same seed, so neighbouring points share their draws' randomness.
  """
  nme, estimated = _check_pair(nme, estimated)
  ts_values = ts_grid(estimated, max_points) if ts_values is None else np.asarray(ts_values,
                                                                                   np.float64)
  keys = ("ts", "mean_iterations", "counts", "nme_policy", "nme_random", "nme_random_std",
          "nme_random_expected")
  if with_oracle:
    keys += ("nme_oracle", "nme_oracle_sequential")
  out = {k: [] for k in keys}
  oracle_cache = {}
  for ts in ts_values:
    p = policy(nme, estimated, float(ts))
    r = random_baseline(nme, p["counts"], draws, seed)
    out["ts"].append(float(ts))
    out["mean_iterations"].append(p["mean_iterations"])
    out["counts"].append([int(c) for c in p["counts"]])
    out["nme_policy"].append(p["nme"])
    out["nme_random"].append(r["nme"])
    out["nme_random_std"].append(r["std"])
    out["nme_random_expected"].append(r["expected"])
    if with_oracle:
      key = tuple(int(c) for c in p["counts"])
      if key not in oracle_cache:
        seq = oracle.oracle_sequential_assignment(nme, p["counts"])
        # Start from whichever feasible assignment is already better.
        start = p["exit_idx"] if p["nme"] < assignment.assignment_nme(nme, seq).mean() else seq
        opt = oracle.oracle_assignment(nme, p["counts"], init=start)
        oracle_cache[key] = (float(assignment.assignment_nme(nme, opt).mean()),
                             float(assignment.assignment_nme(nme, seq).mean()))
      out["nme_oracle"].append(oracle_cache[key][0])
      out["nme_oracle_sequential"].append(oracle_cache[key][1])
  return out


# ----------------------------------------------------------------------------- Tf

def t_fail_curve(final_nme, final_estimated, max_points: int = 201,
                 failure_threshold: float | None = None) -> dict:
  """Failure threshold analysis: faces with final estimated error >= Tf are invalid.

  Args:
    final_nme: [F] true error of each face's output (at its exit iteration).
    final_estimated: [F] estimated error of that output.
    max_points: at most this many Tf values (from every distinct estimate, thinned evenly).
    failure_threshold: if given, also the failure rate (nme > it) of the remaining faces.
  Returns lists in order of decreasing Tf (increasing invalid fraction): t_fail,
  invalid_fraction, nme_remaining (ours), nme_remaining_oracle (the same number of faces
  removed, those of highest true error), and fr_remaining if failure_threshold is set.
  The random rejection's expected NME is the overall mean at every point.
  """
  final_nme = np.asarray(final_nme, np.float64).ravel()
  e = np.asarray(final_estimated, np.float64).ravel()
  if final_nme.shape != e.shape or final_nme.size == 0:
    raise ValueError("final_nme and final_estimated must be non-empty and of equal size")
  f = final_nme.size
  vals = np.unique(e)[::-1]                       # candidate Tf, descending
  tfs = np.concatenate([[np.inf], vals])          # Tf = inf: nobody invalid
  tfs = tfs[tfs > vals.min()]                     # keep at least one face valid
  if max_points and tfs.size > max_points:
    tfs = tfs[np.unique(np.round(np.linspace(0, tfs.size - 1, max_points)).astype(np.int64))]
  by_truth = np.sort(final_nme)                   # ascending: the oracle keeps a prefix
  csum = np.concatenate([[0.0], np.cumsum(by_truth)])
  out = {"t_fail": [], "invalid_fraction": [], "nme_remaining": [], "nme_remaining_oracle": []}
  if failure_threshold is not None:
    out["fr_remaining"] = []
  for t_fail in tfs:
    valid = e < t_fail
    kept = int(valid.sum())
    out["t_fail"].append(float(t_fail))
    out["invalid_fraction"].append(1.0 - kept / f)
    out["nme_remaining"].append(float(final_nme[valid].mean()))
    out["nme_remaining_oracle"].append(float(csum[kept] / kept))
    if failure_threshold is not None:
      out["fr_remaining"].append(float(np.mean(final_nme[valid] > failure_threshold)))
  out["nme_all"] = float(final_nme.mean())
  return out


# ----------------------------------------------------------------------------- working points

def _point(sw: dict, i: int, macs_per_iteration=None) -> dict:
  out = {"ts": sw["ts"][i], "mean_iterations": sw["mean_iterations"][i],
         "nme": sw["nme_policy"][i], "counts": sw["counts"][i]}
  if macs_per_iteration is not None:
    out["macs"] = float(expected_macs(sw["counts"][i], macs_per_iteration))
  return out


def expected_macs(counts, macs_per_iteration) -> float:
  """Mean multiply-adds per face for these counts; `macs_per_iteration` is a scalar (every
  iteration costs the same) or [S] per iteration."""
  counts = np.asarray(counts, np.float64)
  per = np.broadcast_to(np.asarray(macs_per_iteration, np.float64), counts.shape)
  return float((counts * np.cumsum(per)).sum() / counts.sum())


def ts_for_target_nme(sw: dict, target_nme: float, macs_per_iteration=None) -> dict | None:
  """The cheapest swept Ts whose policy NME is <= target (fewest mean iterations; among
  equals the lowest NME). None when no Ts reaches the target."""
  ok = [i for i, v in enumerate(sw["nme_policy"]) if v <= target_nme]
  if not ok:
    return None
  i = min(ok, key=lambda j: (sw["mean_iterations"][j], sw["nme_policy"][j]))
  return _point(sw, i, macs_per_iteration)


def ts_for_budget(sw: dict, max_mean_iterations: float | None = None,
                  max_macs: float | None = None, macs_per_iteration=None) -> dict | None:
  """The most accurate swept Ts whose mean iterations (or mean MACs per face, given
  `macs_per_iteration`) are within budget. None when even Ts = +inf-like is over it."""
  if (max_mean_iterations is None) == (max_macs is None):
    raise ValueError("give exactly one of max_mean_iterations and max_macs")
  if max_macs is not None:
    if macs_per_iteration is None:
      raise ValueError("max_macs needs macs_per_iteration")
    cost = [expected_macs(c, macs_per_iteration) for c in sw["counts"]]
    limit = max_macs
  else:
    cost, limit = sw["mean_iterations"], max_mean_iterations
  ok = [i for i, c in enumerate(cost) if c <= limit * (1 + 1e-12)]
  if not ok:
    return None
  i = min(ok, key=lambda j: (sw["nme_policy"][j], cost[j]))
  return _point(sw, i, macs_per_iteration)


# ----------------------------------------------------------------------------- comparison

def _curve(x, y):
  """Points sorted by x, equal x merged to their lowest y (the best Ts for that cost)."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  xs = np.unique(x)
  ys = np.array([y[x == v].min() for v in xs])
  return xs, ys


def value_at(x, y, x0: float) -> float | None:
  """Piecewise-linear y(x0) of the curve (None outside the swept range of x)."""
  xs, ys = _curve(x, y)
  if x0 < xs[0] - 1e-12 or x0 > xs[-1] + 1e-12:
    return None
  return float(np.interp(x0, xs, ys))


def cost_to_reach(x, y, target: float) -> float | None:
  """Smallest x at which the piecewise-linear curve y(x) reaches y <= target (None if
  never)."""
  xs, ys = _curve(x, y)
  if ys[0] <= target:
    return float(xs[0])
  for i in range(1, xs.size):
    if ys[i] <= target:
      t = (ys[i - 1] - target) / (ys[i - 1] - ys[i])
      return float(xs[i - 1] + t * (xs[i] - xs[i - 1]))
  return None


def compare_at(sw: dict, iterations: float = 2.0) -> dict:
  """The paper's Figure-2 reading at `iterations` mean iterations.

  random_nme: the random baseline at that cost (green point); policy_nme: ours at the same
  cost (yellow point); relative_gain = (random - ours) / random; policy_iterations_to_match:
  the fewest mean iterations at which ours reaches random_nme (red point), and its ratio to
  `iterations`. Values interpolate linearly between swept points.
  """
  x = sw["mean_iterations"]
  rnd = value_at(x, sw["nme_random"], iterations)
  # The policy curve's best point per cost; random/oracle are fixed by the counts.
  ours = value_at(x, sw["nme_policy"], iterations)
  out = {"mean_iterations": iterations, "random_nme": rnd, "policy_nme": ours,
         "oracle_nme": value_at(x, sw["nme_oracle"], iterations) if "nme_oracle" in sw
         else None}
  if rnd is None or ours is None:
    out.update(relative_gain=None, policy_iterations_to_match=None, iterations_ratio=None)
    return out
  out["relative_gain"] = (rnd - ours) / rnd if rnd else None
  match = cost_to_reach(x, sw["nme_policy"], rnd)
  out["policy_iterations_to_match"] = match
  out["iterations_ratio"] = None if match is None else match / iterations
  i = int(np.argmin(np.abs(np.asarray(x) - iterations)))
  out["nearest_swept_ts"] = sw["ts"][i]
  out["nearest_swept_mean_iterations"] = x[i]
  return out
