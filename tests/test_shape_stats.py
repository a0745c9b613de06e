import numpy as np
import pytest

from data_pipelines import shape_stats


def _rot(theta):
  c, s = np.cos(theta), np.sin(theta)
  return np.asarray([[c, -s], [s, c]])


def test_procrustes_removes_similarity_transforms():
  rng = np.random.default_rng(0)
  base = rng.normal(size=(20, 2))
  shapes = np.stack([base @ _rot(rng.uniform(-1, 1)) * rng.uniform(0.5, 3) + rng.normal(size=2) * 10
                     for _ in range(12)])
  aligned, mean = shape_stats.procrustes(shapes)
  np.testing.assert_allclose(aligned, np.broadcast_to(mean, aligned.shape), atol=1e-8)
  assert np.linalg.norm(mean) == pytest.approx(1.0)


def test_mahalanobis_ranks_the_unusual_shape_first_and_pdb_axis():
  rng = np.random.default_rng(1)
  base = rng.normal(size=(15, 2))
  # Variation mostly along one deformation mode; face 0 is far out along a rare mode.
  mode_a = rng.normal(size=(15, 2))
  mode_b = rng.normal(size=(15, 2))
  shapes = np.stack([base + 0.3 * rng.normal() * mode_a + 0.01 * rng.normal() * mode_b
                     for _ in range(200)])
  shapes[0] = base + 0.3 * mode_b  # small in pixels, but along a rare direction
  model = shape_stats.fit_shape_model(shapes, num_components=4)
  d = model.mahalanobis(shapes)
  assert d.shape == (200,)
  assert int(np.argmax(d)) == 0
  # The first axis is mode A: its projection correlates with the mode-A coefficient.
  assert model.variances[0] > model.variances[1]
  with pytest.raises(ValueError, match="num_components"):
    shape_stats.fit_shape_model(shapes, num_components=0)
  bad = shapes.copy()
  bad[3, 2, 0] = np.nan
  with pytest.raises(ValueError, match="non-finite"):
    shape_stats.fit_shape_model(bad, 4)
