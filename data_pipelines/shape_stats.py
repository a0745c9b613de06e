"""Shape statistics for data balancing (paper section 3.4): Procrustes, PCA, Mahalanobis.

Host-side numpy: these run once over the training set, never inside a jitted step.
"""
from __future__ import annotations

import dataclasses

import numpy as np


def _check_shapes(shapes) -> np.ndarray:
  shapes = np.asarray(shapes, np.float64)
  if shapes.ndim != 3 or shapes.shape[-1] != 2:
    raise ValueError(f"shapes must be [faces, points, 2], got {shapes.shape}")
  if not np.all(np.isfinite(shapes)):
    bad = np.unique(np.nonzero(~np.isfinite(shapes))[0])
    raise ValueError(f"shapes contain non-finite values (faces {bad[:10].tolist()})")
  return shapes


def _normalise(shape: np.ndarray) -> np.ndarray:
  """Centred at the origin with unit Frobenius norm."""
  c = shape - shape.mean(0)
  return c / np.linalg.norm(c)


def align_to(shapes: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """Similarity-aligns every shape onto `reference` (orthogonal Procrustes, no reflection)."""
  shapes = _check_shapes(shapes)
  ref = reference - reference.mean(0)
  centred = shapes - shapes.mean(1, keepdims=True)
  # Per shape: rotation R, scale s minimising |s X R - ref|.
  m = np.einsum("fni,nj->fij", centred, ref)
  u, sig, vt = np.linalg.svd(m)
  d = np.sign(np.linalg.det(u @ vt))
  fix = np.ones_like(sig)
  fix[:, -1] = d
  rot = u @ (fix[:, :, None] * vt)
  scale = (sig * fix).sum(-1) / np.einsum("fni,fni->f", centred, centred)
  return scale[:, None, None] * np.einsum("fni,fij->fnj", centred, rot)


def procrustes(shapes, iterations: int = 10) -> tuple[np.ndarray, np.ndarray]:
  """Generalised Procrustes analysis: returns (aligned shapes, mean shape).

  The mean is centred with unit norm; each aligned shape is similarity-aligned to it.
  """
  shapes = _check_shapes(shapes)
  mean = _normalise(shapes[0])
  for _ in range(iterations):
    aligned = align_to(shapes, mean)
    new_mean = _normalise(aligned.mean(0))
    # Fix the mean's rotation to the first shape's so iterations don't drift.
    new_mean = align_to(new_mean[None], mean)[0]
    new_mean = _normalise(new_mean)
    done = np.abs(new_mean - mean).max() < 1e-10
    mean = new_mean
    if done:
      break
  return align_to(shapes, mean), mean


@dataclasses.dataclass
class ShapeModel:
  """PCA of Procrustes-aligned shapes."""
  mean: np.ndarray        # [N, 2], centred, unit norm
  components: np.ndarray  # [K, 2N], orthonormal rows
  variances: np.ndarray   # [K]

  def project(self, shapes) -> np.ndarray:
    """Procrustes-aligns `shapes` to the mean and returns PCA coordinates [faces, K]."""
    aligned = align_to(shapes, self.mean)
    flat = (aligned - self.mean).reshape(len(aligned), -1)
    return flat @ self.components.T

  def mahalanobis(self, shapes) -> np.ndarray:
    """Mahalanobis distance from the mean shape over the K components [faces]."""
    z = self.project(shapes)
    return np.sqrt(np.sum(z * z / self.variances, axis=-1))

  def first_component(self, shapes) -> np.ndarray:
    """Projection on the first principal axis (pose-based balancing, PDB) [faces]."""
    return self.project(shapes)[:, 0]


def fit_shape_model(shapes, num_components: int) -> ShapeModel:
  """Procrustes + PCA with `num_components` components."""
  shapes = _check_shapes(shapes)
  n_faces, n_points, _ = shapes.shape
  if not 1 <= num_components <= min(n_faces - 1, 2 * n_points):
    raise ValueError(f"num_components={num_components} must be in [1, "
                     f"{min(n_faces - 1, 2 * n_points)}] for {n_faces} faces")
  aligned, mean = procrustes(shapes)
  flat = (aligned - mean).reshape(n_faces, -1)
  flat = flat - flat.mean(0)
  _, s, vt = np.linalg.svd(flat, full_matrices=False)
  variances = s[:num_components] ** 2 / (n_faces - 1)
  if np.any(variances <= 0):
    raise ValueError("degenerate shapes: a principal component has zero variance")
  return ShapeModel(mean=mean, components=vt[:num_components], variances=variances)
