import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musica_jax import losses
from musica_jax import metrics
from musica_jax import schemes

FIVE = schemes.LandmarkScheme(
    name="five", num_points=4, groups={}, flip_permutation=(1, 0, 3, 2),
    left_eye=(0,), right_eye=(1,), outer_eye_corners=(0, 1),
    patch_subsets={4: (0, 1, 2, 3)}).validate()


def test_rectified_l1_by_hand():
  target = jnp.asarray([[[0.0, 0.0], [10.0, 0.0], [5.0, 5.0], [5.0, 8.0]]])
  pred = target.at[0, 2].add(jnp.asarray([3.0, -1.0])).at[0, 3].add(jnp.asarray([0.004, 0.004]))
  err = losses.per_iteration_error(pred[None], target, (0, 1))
  # (|3| + |-1|) on point 2; point 3's 0.008 px is rectified to 0; / (4 points * 10 px).
  assert float(err[0, 0]) == pytest.approx(4.0 / 40.0)


def test_cascade_loss_by_hand_and_error_target_is_gradient_stopped():
  target = jnp.asarray([[[0.0, 0.0], [10.0, 0.0], [5.0, 5.0], [5.0, 8.0]]])
  shapes = jnp.stack([target.at[0, 2, 0].add(4.0), target.at[0, 2, 0].add(2.0)])
  errors = jnp.asarray([[0.0], [0.5]])
  total, parts = losses.cascade_loss(shapes, errors, target, (0, 1))
  # loss_i = 0.1, 0.05; |loss - E| = 0.1, 0.45.
  expected = 0.95 * (0.1 + 0.05) + 0.05 * (0.1 + 0.45)
  assert float(total) == pytest.approx(expected, rel=1e-6)
  np.testing.assert_allclose(parts["landmark_loss"], [0.1, 0.05], rtol=1e-6)
  # d total / d shapes comes only from the landmark term (0.95 / 40 per unit x).
  g = jax.grad(lambda s: losses.cascade_loss(s, errors, target, (0, 1))[0])(shapes)
  assert float(g[0, 0, 2, 0]) == pytest.approx(0.95 / 40.0, rel=1e-6)
  ge = jax.grad(lambda e: losses.cascade_loss(shapes, e, target, (0, 1))[0])(errors)
  np.testing.assert_allclose(ge[:, 0], [-0.05, 0.05], rtol=1e-6)


def test_loss_weights_ignore_padding():
  target = jnp.asarray([[[0.0, 0.0], [10.0, 0.0], [5.0, 5.0], [5.0, 8.0]]] * 2)
  shapes = target.at[1].add(100.0)[None]
  total, _ = losses.cascade_loss(shapes, jnp.zeros((1, 2)), target, (0, 1),
                                 weights=jnp.asarray([1.0, 0.0]))
  assert float(total) == 0.0


def test_nme_normalisations_by_hand():
  target = jnp.asarray([[[0.0, 0.0], [10.0, 0.0], [5.0, 5.0], [5.0, 8.0]]])
  pred = target + jnp.asarray([1.0, 0.0])  # every point off by 1 px
  assert float(metrics.per_face_nme(pred, target, FIVE, "interocular")[0]) == pytest.approx(0.1)
  assert float(metrics.per_face_nme(pred, target, FIVE, "interpupil")[0]) == pytest.approx(0.1)
  # Box 10 x 8 -> sqrt(80).
  assert float(metrics.per_face_nme(pred, target, FIVE, "box")[0]) == pytest.approx(1 / np.sqrt(80))
  box = jnp.asarray([[0.0, 0.0, 4.0, 4.0]])
  assert float(metrics.per_face_nme(pred, target, FIVE, "box", box)[0]) == pytest.approx(0.25)
  with pytest.raises(ValueError, match="unknown normalisation"):
    metrics.per_face_nme(pred, target, FIVE, "nope")


def test_interpupil_uses_eye_centres_on_ibug():
  s = schemes.IBUG68
  target = np.zeros((68, 2))
  target[36:42] = [[0, 0], [1, -1], [2, -1], [3, 0], [2, 1], [1, 1]]
  target[42:48] = target[36:42] + [20, 0]
  target[45] = [25, 0]  # outer corner of the right eye moved: eye centre moves too
  d = float(metrics.normalising_distance(jnp.asarray(target)[None], s, "interpupil")[0])
  centre_l = target[36:42].mean(0)
  centre_r = target[42:48].mean(0)
  assert d == pytest.approx(np.linalg.norm(centre_r - centre_l))
  assert float(metrics.normalising_distance(jnp.asarray(target)[None], s, "interocular")[0]) == 25


def test_failure_rate_auc_and_ced_by_hand():
  nme = np.asarray([0.02, 0.04, 0.09, 0.2])
  assert metrics.failure_rate(nme, 0.08) == 0.5
  # AUC@0.08: (0.06 + 0.04 + 0 + 0) / 0.08 / 4 = 0.3125
  assert metrics.auc(nme, 0.08) == pytest.approx(0.3125)
  x, y = metrics.ced(nme, 0.08, num=5)  # x = 0, .02, .04, .06, .08
  np.testing.assert_allclose(y, [0, 0.25, 0.5, 0.5, 0.5])
  # The exact AUC matches a fine numerical integration of the CED.
  x, y = metrics.ced(nme, 0.08, num=200001)
  assert np.trapezoid(y, x) / 0.08 == pytest.approx(metrics.auc(nme, 0.08), abs=1e-4)
  s = metrics.summarise(nme)
  assert s["faces"] == 4 and s["nme"] == pytest.approx(8.75) and s["fr_010"] == 0.25


def test_learning_rate_schedules_staircase_and_warmup_cosine():
  from musica_jax import training
  stair = training.learning_rate_schedule(training.TrainConfig(
      steps=100, learning_rate=1e-3, decay_steps=40, decay_factor=0.1))
  np.testing.assert_allclose([float(stair(s)) for s in (0, 39, 40, 80)],
                             [1e-3, 1e-3, 1e-4, 1e-5], rtol=1e-6)
  cos = training.learning_rate_schedule(training.TrainConfig(
      steps=100, learning_rate=1e-3, decay_factor=0.1, lr_schedule="cosine",
      warmup_steps=10))
  values = np.array([float(cos(s)) for s in range(101)])
  assert values[0] == 0.0 and abs(values[10] - 1e-3) < 1e-9       # warm-up to the peak
  assert np.all(np.diff(values[:11]) > 0) and np.all(np.diff(values[10:]) < 0)
  np.testing.assert_allclose(values[100], 1e-4, rtol=1e-5)         # ends at lr x factor
  with pytest.raises(ValueError, match="lr_schedule"):
    training.learning_rate_schedule(training.TrainConfig(lr_schedule="linear"))
