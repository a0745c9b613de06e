"""Calibration of an estimated error: how well a score (the cascade's estimate E, a quit
head's score) agrees with the error it is trained to predict.

The correlations are scipy.stats' (`pearsonr`; `spearmanr`, ties at their average rank),
flattened, in float64, with the conventions these reports have always had: NaN, without a
warning or an error, when there are fewer than 2 points or an input is constant; and for
Spearman a NaN value ranks above every number, all NaNs tied (a NaN error is the worst one,
as `musica_jax.metrics` counts it a failure), where scipy would make the result NaN.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

from experiments import early_exit_assignment as assignment


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
  x = np.asarray(x, np.float64).ravel()
  y = np.asarray(y, np.float64).ravel()
  if x.shape != y.shape:
    raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
  return x, y


def pearson(x, y) -> float:
  """Pearson's r of x and y (scipy.stats.pearsonr); NaN for < 2 points or a constant."""
  x, y = _pair(x, y)
  if x.size < 2:
    return float("nan")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", stats.ConstantInputWarning)
    return float(stats.pearsonr(x, y).statistic)


def spearman(x, y) -> float:
  """Spearman's rho of x and y (scipy.stats.spearmanr), NaNs ranked last and tied."""
  x, y = _pair(x, y)
  # The values' positions in sorted order (np.unique puts one NaN group last): the same
  # ranks as the values, NaN included.
  x, y = (np.unique(v, return_inverse=True)[1] for v in (x, y))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", stats.ConstantInputWarning)
    return float(stats.spearmanr(x, y).statistic)


def calibration(estimated, true_error, nme=None) -> dict:
  """Agreement of the estimate with the error it is trained to predict, per iteration.

  Per iteration (and pooled over all): Pearson and Spearman correlation of estimated vs
  true_error (and vs nme when given), mean absolute difference, mean of each.
  """
  estimated = assignment.check_2d(estimated, "estimated")
  true_error = assignment.check_2d(true_error, "true_error")
  if nme is not None:
    nme = assignment.check_2d(nme, "nme")

  def one(e, t, n):
    d = {"pearson": pearson(e, t), "spearman": spearman(e, t),
         "mean_abs_diff": float(np.abs(e - t).mean()),
         "mean_estimated": float(e.mean()), "mean_true": float(t.mean())}
    if n is not None:
      d["pearson_vs_nme"] = pearson(e, n)
      d["spearman_vs_nme"] = spearman(e, n)
    return d

  per = [one(estimated[i], true_error[i], None if nme is None else nme[i])
         for i in range(estimated.shape[0])]
  pooled = one(estimated.ravel(), true_error.ravel(), None if nme is None else nme.ravel())
  return {"per_iteration": per, "pooled": pooled}
