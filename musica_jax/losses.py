"""Training loss (reference notes "Loss and training"; paper section 3.3).

Per iteration i and face b:
  loss_i[b] = sum_n rect(|dx| + |dy|) / (N * d_outer[b])
with rect(e) = 0 where e < 0.01 px (small label noise is not chased), distances in
level-0 crop pixels and d_outer the outer-eye-corner distance of the ground truth.
Total = sum_i w_i 0.95 * mean_b loss_i + 0.05 * mean_b |loss_i - E_i|, with w_i = 1 (the
paper's) or the training option `iteration_weights` scaled to sum to the number of
iterations (weights that favour early iterations train every prefix of the cascade as a
final answer, for the budget dial; the error term keeps weight 1 so every iteration's
quitting signal is trained alike).

The error target loss_i is gradient-stopped in the estimation term: that term should
teach the head to *predict* the error, not pull the landmarks toward a shape whose error
matches the current estimate. (The original TF1 code did not stop it; with the 0.05
weight the difference is small, but the stopped version is what the paper describes:
an estimator of the error.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

RECTIFY_PX = 0.01
LANDMARK_WEIGHT = 0.95
ERROR_WEIGHT = 0.05


def outer_eye_distance(landmarks: jax.Array, corners: tuple[int, int]) -> jax.Array:
  a, b = corners
  return jnp.linalg.norm(landmarks[..., a, :] - landmarks[..., b, :], axis=-1)


def per_iteration_error(shapes: jax.Array, target: jax.Array,
                        corners: tuple[int, int]) -> jax.Array:
  """Rectified, normalised L1 error [S, B] of predictions [S, B, N, 2] vs target [B, N, 2]."""
  l1 = jnp.abs(shapes - target).sum(-1)
  l1 = jnp.where(l1 < RECTIFY_PX, 0.0, l1)
  norm = jnp.maximum(outer_eye_distance(target, corners), 1e-6)
  return l1.sum(-1) / (target.shape[-2] * norm)


def normalised_iteration_weights(iteration_weights, num_stages: int) -> jax.Array:
  """[S] landmark-term weights: ones for `()`, else the given S weights scaled to sum S."""
  if not iteration_weights:
    return jnp.ones(num_stages, jnp.float32)
  if len(iteration_weights) != num_stages:
    raise ValueError(f"iteration_weights has {len(iteration_weights)} values, the model has "
                     f"{num_stages} iterations")
  w = jnp.asarray(iteration_weights, jnp.float32)
  return w * (num_stages / w.sum())


def cascade_loss(shapes, errors, target, corners, weights=None, iteration_weights=()):
  """Returns (total loss, dict of per-iteration terms).

  Args:
    shapes: [S, B, N, 2] predictions after every iteration.
    errors: [S, B] estimated errors.
    target: [B, N, 2] ground truth (same frame).
    corners: the scheme's outer eye corner indices.
    weights: optional [B] per-face weights (0 for padding); means are weighted.
    iteration_weights: () or S non-negative weights of the iterations' landmark terms
      (`normalised_iteration_weights`).
  """
  loss_i = per_iteration_error(shapes, target, corners)
  if weights is None:
    weights = jnp.ones(target.shape[0], jnp.float32)
  wsum = jnp.maximum(weights.sum(), 1.0)
  mean = lambda x: (x * weights).sum(-1) / wsum
  landmark_term = mean(loss_i)
  error_term = mean(jnp.abs(jax.lax.stop_gradient(loss_i) - errors))
  w = normalised_iteration_weights(iteration_weights, shapes.shape[0])
  total = jnp.sum(LANDMARK_WEIGHT * w * landmark_term + ERROR_WEIGHT * error_term)
  return total, dict(landmark_loss=landmark_term, error_loss=error_term)
