"""The early-exit analysis of one evaluated split (paper 3.2; experiments.sweep_thresholds).

Pure numpy over the per-face outputs of the full cascade (`experiments.eval_lib.run_split`:
`nme_<norm>_per_iteration` [S, F] as fractions, `estimated_error` [S, F], `true_error`):
the Ts sweep of ours / random / oracle (`early_exit_policies.sweep`), the comparison at
equal mean iterations, the working points, the Tf curve, and the faces of Figure 1. NMEs
are in percent; Ts, Tf and E in the units of the estimated error.
"""
from __future__ import annotations

import numpy as np

from experiments import early_exit_assignment as assignment
from experiments import early_exit_policies as eep
from musica_jax import cost

ORACLE_DEFINITION = (
    "oracle: for the per-iteration counts of our policy at each Ts, the assignment of faces "
    "to iterations with exactly those counts that minimises the mean true NME (exact, "
    "min-cost assignment); a lower bound for every policy of that cost. "
    "oracle_sequential: iteration s gets the counts[s] faces of lowest true NME after "
    "iteration s among those not yet assigned (our rule driven by the true error).")

FAILURE_THRESHOLD_NME = 8.0     # percent: a face above it is a failure in the Tf curve
DEFAULT_TARGET_RATIOS = (1.01, 1.05, 1.10)
DEFAULT_BUDGET_ITERATIONS = (1.25, 1.5, 2.0, 2.5)


def analyse(per_face, model_cfg, norm: str, num_ts: int, draws: int, seed: int,
            compare_iterations: float, with_oracle: bool = True) -> dict:
  """{"nme" [S, F] percent, "estimated" [S, F], "sweep", "mmacs_per_iteration",
  "comparison" (None without the oracle)} of one model on one split."""
  nme = per_face[f"nme_{norm}_per_iteration"] * 100.0
  est = per_face["estimated_error"]
  sw = eep.sweep(nme, est, draws=draws, seed=seed, with_oracle=with_oracle,
                 max_points=num_ts)
  # Per iteration (they differ with ModelConfig.stage_patches); "mmacs_per_iteration" is
  # their mean (x iterations: the full cascade).
  per_stage = [m / 1e6 for m in cost.iteration_macs(model_cfg)]
  sw["mmacs"] = [eep.expected_macs(c, per_stage) for c in sw["counts"]]
  return {"nme": nme, "estimated": est, "sweep": sw, "mmacs_per_stage": per_stage,
          "mmacs_per_iteration": float(np.mean(per_stage)),
          "comparison": eep.compare_at(sw, compare_iterations) if with_oracle else None}


def working_points(sw: dict, full_nme: float, mmacs_it, target_nme=(),
                   budget_iterations=(), budget_mmacs=()) -> dict:
  """The Ts of each target NME (default: the full cascade's NME + 1%, 5%, 10% relative),
  of each budget of mean iterations (default 1.25, 1.5, 2, 2.5) and of mean MMACs;
  mmacs_it: MMACs of one iteration, or a list per iteration."""
  targets = list(target_nme) or [full_nme * r for r in DEFAULT_TARGET_RATIOS]
  budgets = list(budget_iterations) or list(DEFAULT_BUDGET_ITERATIONS)
  return {
      "target_nme": [{"target": t, "point": eep.ts_for_target_nme(sw, t, mmacs_it)}
                     for t in targets],
      "budget_iterations": [{"budget": b, "point": eep.ts_for_budget(
          sw, max_mean_iterations=b, macs_per_iteration=mmacs_it)} for b in budgets],
      "budget_mmacs": [{"budget": b, "point": eep.ts_for_budget(
          sw, max_macs=b, macs_per_iteration=mmacs_it)} for b in budget_mmacs],
      "units": "nme in percent, macs in millions per face (mean over the split)",
  }


def t_fail_analysis(nme, est, t_fail_ts: float | None) -> dict:
  """The Tf curve (faces whose final estimated error >= Tf are invalid), under early exit
  at `t_fail_ts` (None: the full cascade)."""
  s, f = nme.shape
  exits = (eep.exit_iterations(est, t_fail_ts) if t_fail_ts is not None
           else np.full(f, s - 1, np.int64))
  curve = eep.t_fail_curve(assignment.assignment_nme(nme, exits),
                           assignment.assignment_nme(est, exits),
                           failure_threshold=FAILURE_THRESHOLD_NME)
  return {"ts": t_fail_ts, "mean_iterations": float(exits.mean() + 1),
          "failure_threshold_nme": FAILURE_THRESHOLD_NME, "curve": curve}


def pick_figure1_faces(exit_idx, k: int) -> np.ndarray:
  """k faces spread over the exit iterations (round robin, evenly spaced within each
  group in dataset order), ordered by exit iteration."""
  groups = [np.flatnonzero(exit_idx == s) for s in range(int(exit_idx.max()) + 1)]
  groups = [g for g in groups if g.size]
  k = min(k, int(exit_idx.size))
  share = [0] * len(groups)
  i = 0
  while sum(share) < k:
    if share[i % len(groups)] < groups[i % len(groups)].size:
      share[i % len(groups)] += 1
    i += 1
  picked = []
  for g, n in zip(groups, share):
    if n:
      picked.extend(g[np.round(np.linspace(0, g.size - 1, n + 2)[1:-1]).astype(int)]
                    if g.size > n else g)
  return np.asarray(picked, np.int64)


def figure1_ts(comparison: dict, est, ts: float | None = None) -> float:
  """Figure 1's Ts: `ts`, else the swept Ts nearest the comparison's mean iterations,
  else the median first estimate."""
  if ts is None:
    ts = comparison.get("nearest_swept_ts")
  if ts is None or not np.isfinite(ts):
    ts = float(np.median(est[0]))
  return ts


def variant_row(name: str, key: str, step, model_cfg, a: dict) -> dict:
  """One line of Figure 7 (a model's NME against multiply-adds over Ts)."""
  sv = a["sweep"]
  return {"name": name, "workdir": key, "checkpoint_step": step,
          "num_patches": model_cfg.num_patches, "use_attention": model_cfg.use_attention,
          "mmacs_per_iteration": a["mmacs_per_iteration"], "ts": sv["ts"],
          "mean_iterations": sv["mean_iterations"], "mmacs": sv["mmacs"],
          "nme": sv["nme_policy"]}
