"""Data balancing (paper section 3.4): per-face sampling weights.

  gdb   Generalised data balancing (the paper's): Procrustes-align the training shapes to
        the mean shape, PCA with K = cfg.gdb_components components, Mahalanobis distance d
        of each face from the mean in that K-space; weight = mapping(d). Default mapping
        "linear" (weight proportional to d: the paper over-samples "in proportion to their
        Mahalanobis distance"); "square" (d**2) and "sqrt" (d**0.5) are options.
  pdb   Pose-based data balancing (Feng et al., the paper's baseline): histogram of the
        projections on the first principal axis (cfg.pdb_bins equal-width bins); weight =
        1 / (faces in the face's bin), which flattens the histogram.
  none  uniform (the pipeline then draws an exact permutation per epoch).

Weights are normalised to mean 1; optional clipping to [min, max] x the median weight
(cfg.balancing_min_ratio / balancing_max_ratio, 0 = off). The sampling itself (in
input_pipeline) draws i.i.d. faces with probability weight / sum(weights), statelessly
from (seed, stream position).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines import config as config_lib
from data_pipelines import shape_stats


@dataclasses.dataclass
class Balancing:
  weights: np.ndarray | None   # float64 [M], mean 1; None for uniform
  score: np.ndarray | None     # Mahalanobis distance (gdb) / first-axis projection (pdb)
  method: str


def compute(cfg: config_lib.DataConfig, landmarks: np.ndarray) -> Balancing:
  """Sampling weights for the faces with these landmarks [M, N, 2]."""
  if cfg.balancing == "none":
    return Balancing(None, None, "none")
  landmarks = np.asarray(landmarks, np.float64)
  if len(landmarks) == 1:
    # One face: every weighting normalises to weight 1; there is nothing to balance.
    return Balancing(np.ones(1), np.zeros(1), cfg.balancing)
  k = min(cfg.gdb_components, len(landmarks) - 1, 2 * landmarks.shape[1])
  if k < 1:
    raise ValueError(f"--balancing={cfg.balancing} needs at least 2 training faces")
  model = shape_stats.fit_shape_model(landmarks, k if cfg.balancing == "gdb" else 1)
  if cfg.balancing == "gdb":
    score = model.mahalanobis(landmarks)
    power = {"linear": 1.0, "square": 2.0, "sqrt": 0.5}[cfg.gdb_mapping]
    w = np.power(np.maximum(score, 1e-6), power)
  elif cfg.balancing == "pdb":
    score = model.first_component(landmarks)
    edges = np.linspace(score.min(), score.max() + 1e-12, cfg.pdb_bins + 1)
    bins = np.clip(np.digitize(score, edges) - 1, 0, cfg.pdb_bins - 1)
    counts = np.bincount(bins, minlength=cfg.pdb_bins)
    w = 1.0 / counts[bins]
  else:
    raise ValueError(f"--balancing: unknown {cfg.balancing!r}; use gdb, pdb or none")
  med = np.median(w)
  if cfg.balancing_min_ratio > 0:
    w = np.maximum(w, cfg.balancing_min_ratio * med)
  if cfg.balancing_max_ratio > 0:
    w = np.minimum(w, cfg.balancing_max_ratio * med)
  return Balancing(w / w.mean(), score, cfg.balancing)


def top_faces(bal: Balancing, file_ids, k: int = 20) -> list[dict]:
  """The k faces with the largest score and their oversampling ratio vs the median face."""
  if bal.weights is None:
    return []
  rarity = bal.score if bal.method == "gdb" else np.abs(bal.score - np.median(bal.score))
  order = np.argsort(-rarity)
  med = np.median(bal.weights)
  return [{"file_id": str(file_ids[i]), "score": float(bal.score[i]),
           "weight": float(bal.weights[i]), "oversampling_vs_median": float(bal.weights[i] / med)}
          for i in order[:k]]
