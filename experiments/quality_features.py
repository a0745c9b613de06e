"""The features and the score of experiments.quality_score (issue #28 item 4): a per-face
quality score from what the cascade computes anyway. An experiment only: the score is not
shipped (it misses the issue's target, costs ~0.4 ms per face at batch 1, and the predictor
does not read it).

Why: the network's estimated error E (what Tf thresholds) is biased by condition: it
reads low on occluded faces and high on rotated ones (results/robust_val_default.md), so no
single Tf on E holds in every condition. This score corrects E with cheap facts about the
prediction itself, and reads as an estimated inter-ocular NME:

    score = exp(bias + sum_k weight_k * (feature_k - mean_k) / std_k)

(a linear regression of log NME, fitted by `experiments.quality_score` on val + robust-val;
`quality` below is that fit as a dict: features, weights, mean, std, bias, t_fail,
shape_model). A face is flagged when score >= t_fail (in NME units).

Features of one face (`FEATURES`), from the final landmarks in the crop frame (`crop_landmarks`
of `Predictor.predict`), the final estimated error E, the estimated error of the iteration
before it, and the length of the last iteration's step:
  log_error            log E of the last iteration computed
  log_previous_error   log E of the iteration before it (one iteration only: E itself)
  log_step             log(step + 1e-4); step: mean landmark displacement of the last
                       iteration / BOX_SIZE (`quit_head.step_length`); a face that has not
                       converged still moves
  log_mahalanobis      Mahalanobis distance of the shape (similarity-aligned) from the
                       TRAINING shapes' mean over their first K principal components
  log_residual         norm of what those K components do not explain (unit-norm shapes)
  log_asymmetry        the aligned shape against its own mirror image (flip permutation),
                       aligned again: left/right inconsistency
  abs_roll_deg         |rotation| of the similarity aligning the shape to the mean shape
  log_size             log(shape size / the model's mean shape's size), crop pixels
  shift                distance of the shape's centre from the mean shape's / BOX_SIZE

numpy only: `features(...)`, `score(quality, ...)`.
"""
from __future__ import annotations

import numpy as np

from musica_jax import face_frame

FEATURES = ("log_error", "log_previous_error", "log_step", "log_mahalanobis", "log_residual",
            "log_asymmetry", "abs_roll_deg", "log_size", "shift")
ERROR_EPS = 1e-4      # E floor before the log
STEP_EPS = 1e-4       # step floor (box sides) before the log
SHAPE_EPS = 1e-6      # Mahalanobis / residual / asymmetry floor before the log


# ---------------------------------------------------------------------------- geometry

def align(shapes, reference) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Similarity-aligns shapes [F, N, 2] onto `reference` [N, 2] (centred; orthogonal
  Procrustes, no reflection): (aligned [F, N, 2] centred, scale [F], rotation in degrees
  [F]) with aligned = scale * (shape - centroid) @ R."""
  shapes = np.asarray(shapes, np.float64)
  ref = np.asarray(reference, np.float64)
  ref = ref - ref.mean(0)
  centred = shapes - shapes.mean(-2, keepdims=True)
  m = np.einsum("fni,nj->fij", centred, ref)
  u, sig, vt = np.linalg.svd(m)
  d = np.sign(np.linalg.det(u @ vt))
  d = np.where(d == 0, 1.0, d)
  fix = np.ones_like(sig)
  fix[:, -1] = d
  rot = u @ (fix[:, :, None] * vt)
  norm2 = np.maximum(np.einsum("fni,fni->f", centred, centred), 1e-300)
  scale = (sig * fix).sum(-1) / norm2
  aligned = scale[:, None, None] * np.einsum("fni,fij->fnj", centred, rot)
  return aligned, scale, np.degrees(np.arctan2(rot[:, 0, 1], rot[:, 0, 0]))


def step_length(landmarks, previous_landmarks) -> np.ndarray:
  """Mean landmark displacement [F] between two shapes [F, N, 2] (crop pixels), in box
  sides: `quit_head.step_length` in numpy."""
  diff = np.asarray(landmarks, np.float64) - np.asarray(previous_landmarks, np.float64)
  return np.linalg.norm(diff, axis=-1).mean(-1) / face_frame.BOX_SIZE


def shape_features(landmarks, shape_model: dict) -> dict[str, np.ndarray]:
  """The shape's features [F] each (log_mahalanobis, log_residual, log_asymmetry,
  abs_roll_deg, log_size, shift) against `shape_model` (`shape_model_from_training`)."""
  lm = np.asarray(landmarks, np.float64)
  if lm.ndim == 2:
    lm = lm[None]
  mean = np.asarray(shape_model["mean"], np.float64)
  comps = np.asarray(shape_model["components"], np.float64)
  var = np.asarray(shape_model["variances"], np.float64)
  perm = np.asarray(shape_model["flip_permutation"], np.int64)
  if lm.shape[1:] != mean.shape:
    raise ValueError(f"landmarks must be [F, {mean.shape[0]}, 2], got {lm.shape}")
  aligned, _, rot = align(lm, mean)
  d = (aligned - mean).reshape(len(lm), -1)
  z = d @ comps.T
  maha = np.sqrt(np.sum(z * z / var, -1))
  resid = np.linalg.norm(d - z @ comps, axis=-1)
  mirrored = aligned[:, perm] * np.array([-1.0, 1.0])
  again, _, _ = align(mirrored, mean)
  asym = np.linalg.norm((aligned - again).reshape(len(lm), -1), axis=-1)
  centred = lm - lm.mean(1, keepdims=True)
  size = np.sqrt(np.einsum("fni,fni->f", centred, centred)) / float(shape_model["reference_size"])
  shift = np.linalg.norm(lm.mean(1) - np.asarray(shape_model["reference_centre"]), axis=-1)
  return {"log_mahalanobis": np.log(np.maximum(maha, SHAPE_EPS)),
          "log_residual": np.log(np.maximum(resid, SHAPE_EPS)),
          "log_asymmetry": np.log(np.maximum(asym, SHAPE_EPS)),
          "abs_roll_deg": np.abs(rot),
          "log_size": np.log(np.maximum(size, SHAPE_EPS)),
          "shift": shift / face_frame.BOX_SIZE}


def features(shape_model: dict, landmarks, estimated_error, previous_error, step
             ) -> dict[str, np.ndarray]:
  """Every feature of `FEATURES` [F] for faces with final landmarks [F, N, 2] (crop
  frame), final estimated error [F], the previous iteration's estimated error [F] (not
  finite: the face ran one iteration; E itself is used) and the last step's length [F]
  (`step_length`, box sides)."""
  e = np.atleast_1d(np.asarray(estimated_error, np.float64))
  prev = np.atleast_1d(np.asarray(previous_error, np.float64))
  prev = np.where(np.isfinite(prev), prev, e)
  st = np.atleast_1d(np.asarray(step, np.float64))
  out = {"log_error": np.log(np.maximum(e, ERROR_EPS)),
         "log_previous_error": np.log(np.maximum(prev, ERROR_EPS)),
         "log_step": np.log(np.maximum(st, 0.0) + STEP_EPS)}
  out.update(shape_features(landmarks, shape_model))
  return {k: out[k] for k in FEATURES}


def shape_model_from_training(aligned_mean, components, variances, flip_permutation,
                              init_shape) -> dict:
  """The fit's "shape_model" from a PCA of Procrustes-aligned training shapes (mean
  [N, 2] centred unit norm, components [K, 2N], variances [K]), the scheme's flip
  permutation and the model's mean shape in crop pixels (for size and shift)."""
  init = np.asarray(init_shape, np.float64)
  c = init - init.mean(0)
  return {"mean": np.asarray(aligned_mean, np.float64).tolist(),
          "components": np.asarray(components, np.float64).tolist(),
          "variances": np.asarray(variances, np.float64).tolist(),
          "flip_permutation": [int(i) for i in flip_permutation],
          "reference_size": float(np.sqrt((c * c).sum())),
          "reference_centre": init.mean(0).tolist()}


# ------------------------------------------------------------------------------ score

def linear(quality: dict, feats: dict) -> np.ndarray:
  """bias + sum_k w_k (x_k - mean_k) / std_k [F]: the predicted log NME."""
  out = float(quality["bias"])
  for name, w, m, s in zip(quality["features"], quality["weights"], quality["mean"],
                           quality["std"]):
    out = out + w * (np.asarray(feats[name], np.float64) - m) / s
  return np.asarray(out, np.float64)


def score(quality: dict, landmarks, estimated_error, previous_error, step) -> np.ndarray:
  """The quality score [F] (an estimated inter-ocular NME; flagged when >= quality's
  "t_fail"); inputs as `features`. A face with a non-finite input scores inf."""
  feats = features(quality["shape_model"], landmarks, estimated_error, previous_error, step)
  s = np.exp(np.minimum(linear(quality, feats), 50.0))
  bad = ~np.all(np.stack([np.isfinite(v) for v in feats.values()]), 0)
  return np.where(bad | np.isnan(s), np.inf, s)


def flagged(quality: dict, scores) -> np.ndarray:
  """bool [F]: score >= quality's t_fail (or not finite)."""
  return ~(np.asarray(scores, np.float64) < float(quality["t_fail"]))
