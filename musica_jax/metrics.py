"""Evaluation metrics: NME under three normalisations, failure rate, AUC and the CED.

`per_face_nme` is jnp (jit-able, used inside batched evaluation); the aggregates are
host-side numpy over the per-face values of a whole split. A face whose NME is not finite
(NaN or inf: broken weights, a degenerate prediction) is a failure at every threshold and
contributes nothing to the AUC; `nonfinite_count` reports how many there were, so a result
never reads "FR 0%" for predictions that are NaN.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from musica_jax.schemes import LandmarkScheme

NORMALISATIONS = ("interpupil", "interocular", "box")


def normalising_distance(target, scheme: LandmarkScheme, kind: str, box=None):
  """[B] normalising distance of ground-truth landmarks [B, N, 2].

  interpupil: distance between the eye centres (means of the scheme's eye points);
  interocular: distance between the outer eye corners;
  box: sqrt(width * height) of the face box [B, 4] (the ground-truth box if None).
  """
  if kind == "interpupil":
    left = target[..., list(scheme.left_eye), :].mean(-2)
    right = target[..., list(scheme.right_eye), :].mean(-2)
    return jnp.linalg.norm(left - right, axis=-1)
  if kind == "interocular":
    a, b = scheme.outer_eye_corners
    return jnp.linalg.norm(target[..., a, :] - target[..., b, :], axis=-1)
  if kind == "box":
    if box is None:
      box = jnp.concatenate([target.min(-2), target.max(-2)], -1)
    return jnp.sqrt((box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1]))
  raise ValueError(f"unknown normalisation {kind!r}; use one of {NORMALISATIONS}")


def per_face_nme(pred, target, scheme: LandmarkScheme, kind: str, box=None):
  """Mean point-to-point error over landmarks / normalising distance, per face [..., B]."""
  err = jnp.linalg.norm(pred - target, axis=-1).mean(-1)
  return err / normalising_distance(target, scheme, kind, box)


def per_face_nme_numpy(pred, target, scheme: LandmarkScheme, kind: str = "interpupil",
                       box=None) -> np.ndarray:
  """`per_face_nme` of numpy (or jax) arrays, as a numpy array."""
  return np.asarray(per_face_nme(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32),
                                 scheme, kind, box))


def mean_nme_percent(pred, target, scheme: LandmarkScheme,
                     kinds=("interpupil", "interocular")) -> dict[str, float]:
  """{kind: mean NME over the faces, in percent} for each normalisation in `kinds`."""
  return {k: float(per_face_nme_numpy(pred, target, scheme, k).mean()) * 100 for k in kinds}


def _errors(nme) -> np.ndarray:
  """Per-face NMEs as float64 with every non-finite value (NaN, -inf, inf) set to +inf:
  a prediction that is not a number is as wrong as can be."""
  nme = np.asarray(nme, np.float64)
  return np.where(np.isfinite(nme), nme, np.inf)


def nonfinite_count(nme) -> int:
  """Number of faces whose NME is NaN or infinite."""
  return int(np.sum(~np.isfinite(np.asarray(nme, np.float64))))


def failure_rate(nme, threshold: float) -> float:
  """Fraction of faces whose NME is above `threshold` (e.g. 0.08 or 0.10), or not finite."""
  nme = _errors(nme)
  return float(np.mean(~(nme <= threshold))) if nme.size else float("nan")


def auc(nme, threshold: float) -> float:
  """Area under the cumulative error distribution on [0, threshold], divided by threshold.

  Exact for the empirical CED: each face contributes (threshold - e) / threshold when its
  error e is below the threshold, else 0.
  """
  nme = _errors(nme)
  return float(np.mean(np.clip(threshold - nme, 0.0, None)) / threshold)


def ced(nme, threshold: float, num: int = 201):
  """The cumulative error distribution: (x [num], fraction of faces with NME <= x)."""
  nme = np.sort(_errors(nme))
  x = np.linspace(0.0, threshold, num)
  return x, np.searchsorted(nme, x, side="right") / max(len(nme), 1)


def fr_auc(nme, thresholds=(0.08, 0.10)) -> dict:
  """{"fr_008": failure rate, "auc_008": AUC, ...} at each threshold (key: percent, 3 digits):
  the one place the result files' FR/AUC fields are made."""
  out = {}
  for t in thresholds:
    key = f"{int(round(t * 100)):03d}"
    out[f"fr_{key}"] = failure_rate(nme, t)
    out[f"auc_{key}"] = auc(nme, t)
  return out


def summarise(nme, thresholds=(0.08, 0.10)) -> dict:
  """NME (percent; NaN when any face is not finite), failure rate and AUC at each
  threshold for per-face NMEs, and the count of non-finite faces."""
  nme = np.asarray(nme, np.float64)
  out = {"faces": int(nme.size), "nme": float(nme.mean() * 100) if nme.size else float("nan"),
         "nonfinite_faces": nonfinite_count(nme)}
  out.update(fr_auc(nme, thresholds))
  return out
