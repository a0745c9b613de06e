"""The dlib side-by-side: the box fit on synthetic boxes, and a smoke test when dlib is
installed (the optional `peers` extra) and the real data is present."""
import importlib.util

import numpy as np
import pytest

from experiments import peers_lib
from musica_jax import detector


def _boxes(rng, n):
  c = rng.uniform(50, 400, (n, 2))
  s = rng.uniform(60, 220, (n, 1)) * np.stack([rng.uniform(0.85, 1.15, n), np.ones(n)], -1)
  return np.concatenate([c - s / 2, c + s / 2], -1)


def test_box_fit_recovers_a_known_mapping():
  rng = np.random.default_rng(0)
  truth = detector.BoxMapping(a=0.02, b=0.11, c=0.95, d=0.12, e=0.07, f=1.01)
  lb = _boxes(rng, 300)
  exact = truth.apply(lb)
  fit = detector.fit_box_mapping(lb, exact)
  for k in "abcdef":
    assert getattr(fit, k) == pytest.approx(getattr(truth, k), abs=1e-9), k
  assert fit.residual_rms < 1e-9 and fit.faces == 300
  # With detector-like noise (1% of the box size) the fit is still close.
  size = np.sqrt((lb[:, 2] - lb[:, 0]) * (lb[:, 3] - lb[:, 1]))[:, None]
  noisy = exact + rng.normal(0, 0.01, exact.shape) * size
  fit = detector.fit_box_mapping(lb, noisy)
  # (w and h are correlated, so c/d and e/f trade off: check the mapped boxes.)
  assert fit.a == pytest.approx(truth.a, abs=0.01) and fit.b == pytest.approx(truth.b, abs=0.01)
  fresh = _boxes(rng, 200)
  fsize = np.sqrt((fresh[:, 2] - fresh[:, 0]) * (fresh[:, 3] - fresh[:, 1]))[:, None]
  assert np.abs((fit.apply(fresh) - truth.apply(fresh)) / fsize).max() < 0.01
  assert 0.005 < fit.residual_rms < 0.02


def test_box_fit_is_translation_and_scale_equivariant():
  m = detector.BoxMapping(a=0.05, b=0.1, c=1.1, d=0.0, e=0.0, f=1.2)
  box = np.array([[10.0, 20.0, 110.0, 140.0]])
  moved = box * 2.0 + np.array([30.0, -5.0, 30.0, -5.0])
  np.testing.assert_allclose(m.apply(moved), m.apply(box) * 2.0 + [30, -5, 30, -5])
  np.testing.assert_allclose(detector.BoxMapping().apply(box), box)


def test_box_fit_errors():
  with pytest.raises(ValueError, match="at least 3"):
    detector.fit_box_mapping(np.zeros((2, 4)), np.zeros((2, 4)))
  with pytest.raises(ValueError, match="input boxes but"):
    detector.fit_box_mapping(np.ones((4, 4)), np.ones((3, 4)))


def test_match_detection():
  lb = np.array([100.0, 100.0, 200.0, 220.0])
  dets = [[0, 0, 50, 50], [90, 110, 210, 230], [300, 300, 400, 400]]
  assert detector.match_detection(lb, dets) == 1
  assert detector.match_detection(lb, [[0, 0, 50, 50]]) is None
  assert detector.match_detection(lb, []) is None


def test_summarise_perfect_and_shifted():
  gt = np.random.default_rng(1).uniform(0, 100, (3, 68, 2))
  row, io = peers_lib.summarise(gt, gt)
  assert row["nme_interpupil"] == 0 and row["fr_008"] == 0 and row["auc_008"] == 1
  row, _ = peers_lib.summarise(gt + [1.0, 0.0], gt)
  assert row["nme_interocular"] > 0


_HAVE_DLIB = (importlib.util.find_spec("dlib") is not None
              and importlib.util.find_spec("face_recognition_models") is not None)


@pytest.mark.skipif(not _HAVE_DLIB, reason="dlib / face-recognition-models not installed "
                    "(optional: pip install 'musica-jax[peers]')")
def test_dlib_smoke(shared_data, tmp_path):
  assert peers_lib.find_dlib_model().name == peers_lib.DLIB_MODEL_FILE
  out = tmp_path / "cmp.json"
  res = peers_lib.compare(peers_lib.DlibConfig(
      str(shared_data / "300w"), str(out), split="lfpw_testset", fit_max_faces=12,
      max_faces=8))
  assert out.exists()
  fit = res["box_fit"]
  assert fit["detector_found"] >= 3
  row = res["rows"][0]
  assert row["faces"] == 8
  assert 0 < row["nme_interocular"] < 15, row
  assert row["ms_per_face"] > 0
  # Reusing the fit skips the detector and gives the same numbers.
  again = peers_lib.compare(peers_lib.DlibConfig(
      str(shared_data / "300w"), None, split="lfpw_testset", box_fit_json=str(out),
      max_faces=8))
  assert again["rows"][0]["nme_interocular"] == pytest.approx(row["nme_interocular"])
