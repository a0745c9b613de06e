"""Assignments of faces to exit iterations: the arrays the early-exit analysis works on.

Pure numpy. Inputs are per-iteration, per-face arrays of one evaluation split, [S, F]
(iteration s, 0-based, of the full cascade; face f), e.g. the true error `nme` or the
cascade's estimated error `estimated` after each iteration.

An *assignment* is an int array `exit_idx` [F] (0-based iteration at which each face quits;
"iterations" reported to people are exit_idx + 1). Its cost profile is `counts` [S], the
number of faces quitting at each iteration; its accuracy is mean_f nme[exit_idx[f], f].
Used by `early_exit_policies` (the policies and sweeps), `early_exit_oracle` (the best
assignment of given counts) and `estimate_calibration`.
"""
from __future__ import annotations

import numpy as np


def check_2d(x, name: str) -> np.ndarray:
  """`x` as float64 [S, F] with S, F >= 1 (ValueError naming `name` otherwise)."""
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
    raise ValueError(f"{name} must be [S, F] with S, F >= 1, got shape {x.shape}")
  return x


def check_counts(counts, s: int, f: int) -> np.ndarray:
  """`counts` as int64 [S], non-negative, summing to F (ValueError otherwise)."""
  counts = np.asarray(counts, np.int64)
  if counts.shape != (s,) or (counts < 0).any() or counts.sum() != f:
    raise ValueError(f"counts must be [S={s}] non-negative summing to F={f}, got {counts}")
  return counts


def counts_of(exit_idx, num_stages: int) -> np.ndarray:
  """[S] number of faces quitting at each iteration."""
  return np.bincount(np.asarray(exit_idx, np.int64), minlength=num_stages)[:num_stages]


def assignment_nme(nme, exit_idx) -> np.ndarray:
  """[F] the true error of each face at its exit iteration."""
  nme = check_2d(nme, "nme")
  exit_idx = np.asarray(exit_idx, np.int64)
  return nme[exit_idx, np.arange(nme.shape[1])]
