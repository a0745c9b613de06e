"""Deployment: the portable StableHLO artifact, box-free prediction (detector), video
tracking, the crop without per-photo-size compilation."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from musica_jax import crop as crop_lib
from musica_jax import images as images_lib
from musica_jax import model_io
from musica_jax import portable
from musica_jax import predictor as predictor_lib
from musica_jax import stage_net
from musica_jax.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ModelConfig(num_landmarks=10, patch_indices=(0, 2, 4, 6, 8, 9), hidden_size=64,
                    image_size=64, init_std=0.5)


def _small_predictor():
  params = stage_net.init_stacked(jax.random.PRNGKey(0), SMALL)
  mean = np.random.default_rng(1).uniform(16, 48, (10, 2)).astype(np.float32)
  return predictor_lib.Predictor(params, SMALL, mean, max_batch=8)


@pytest.mark.usefixtures("highest_precision")   # compares paths: no TF32 (conftest.py)
def test_stablehlo_symbolic_batch_matches_the_predictor():
  """One exported program serves every batch size and gives the predictor's full-cascade
  landmarks and estimated error (float32 weights: not bfloat16-exact)."""
  p = _small_predictor()
  assert portable.weight_dtype(p.params) == "float32"
  exp = jax.export.deserialize(portable.export_stablehlo(p.params, SMALL, p.mean_shape))
  assert str(exp.in_avals[0].shape[0]) == "b"
  rng = np.random.default_rng(2)
  for n in (1, 3):
    crops = rng.normal(size=(n, 64, 64, 3)).astype(np.float32)
    lm, err = exp.call(crops)
    ref = p.run_fast(crops)
    assert lm.shape == (n, 10, 2) and err.shape == (n,)
    np.testing.assert_allclose(np.asarray(lm), ref["landmarks"], atol=1e-4)
    np.testing.assert_allclose(np.asarray(err), ref["estimated_error"], atol=1e-6)
    assert np.abs(np.asarray(lm) - p.mean_shape).max() > 1e-3   # the model moved them


_RUN_WITHOUT_MODEL_CODE = r"""
import sys
sys.modules["musica_jax"] = None          # any import of this package now fails
import jax, numpy as np
d = np.load(sys.argv[2])
exp = jax.export.deserialize(open(sys.argv[1], "rb").read())
lm, err = exp.call(d["crops"])
np.savez(sys.argv[3], landmarks=np.asarray(lm), error=np.asarray(err))
"""


@pytest.mark.usefixtures("highest_precision")   # exported inside it: HIGHEST in the artifact
def test_exported_default_model_runs_without_model_code(tmp_path):
  """experiments.export_model --format=stablehlo on the shipped model; a fresh process
  that cannot import musica_jax loads it and reproduces Predictor.predict's landmarks
  (crop frame) and estimated error on a photo."""
  if not model_io.is_model_dir(model_io.DEFAULT_MODEL_DIR):
    pytest.skip("no default model ships with this checkout")
  from experiments import export_model
  info = export_model.export_portable(str(tmp_path / "hlo"), model="default",
                                      platforms=("cpu",))
  assert info["weight_dtype"] == "bfloat16" and info["input"]["shape"][0] == "B"
  side = json.loads((tmp_path / "hlo" / "model.stablehlo.json").read_text())
  assert side["outputs"][0]["name"] == "landmarks"
  p = predictor_lib.Predictor.default()
  rng = np.random.default_rng(0)
  image = (rng.uniform(0, 1, (180, 150, 3)) ** 2 * 255).astype(np.uint8)
  boxes = [(30, 40, 120, 140), (10, 20, 70, 90)]
  pred = p.predict(image, boxes)
  crops = np.asarray(p.crops(image, boxes)[0])
  np.savez(tmp_path / "in.npz", crops=crops)
  # The artifact is lowered for the CPU: run it there on every host (a GPU host's
  # default backend would refuse a CPU-only export).
  env = dict(os.environ, PYTHONPATH="", JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", _RUN_WITHOUT_MODEL_CODE,
                        str(tmp_path / "hlo" / "model.stablehlo"), str(tmp_path / "in.npz"),
                        str(tmp_path / "out.npz")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  out = np.load(tmp_path / "out.npz")
  np.testing.assert_allclose(out["landmarks"], pred.crop_landmarks, atol=1e-4)
  np.testing.assert_allclose(out["error"], pred.estimated_error, atol=1e-6)


def test_photo_sizes_compile_nothing_new():
  """Faces in photos of many sizes run one program per face-batch bucket and crop source
  side (two sides: `crop.source_sides`): the host part of the crop depends on the photo's
  size, the compiled part does not."""
  from musica_jax import crop
  from musica_jax import fast_inference
  p = _small_predictor()
  rng = np.random.default_rng(4)
  p.predict(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8), (5, 5, 40, 45))
  before = fast_inference.run_selective_sources._cache_size()
  sides = set()
  for h, w in ((61, 333), (480, 97), (1001, 777), (123, 124), (2000, 1500)):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    box = (w * 0.2, h * 0.2, w * 0.7, h * 0.8)
    pred = p.predict(image, box)
    assert len(pred) == 1
    sources, *_ = crop_lib.face_sources(image, box, p.model_config.image_size)
    sides.add(sources.src.shape[1])
  assert sides == set(crop.source_sides(p.model_config.image_size))   # both were used
  assert fast_inference.run_selective_sources._cache_size() <= before + 1


# ---------------------------------------------------------------------------------------
# Box-free prediction.


def _needs_dlib():
  import importlib.util
  if importlib.util.find_spec("dlib") is None:
    pytest.skip("dlib is not installed (optional: pip install -e '.[peers]')")


class _FakeFinder:
  """A face finder with known answers (no dlib): boxes per call, counted."""

  def __init__(self, boxes):
    self.boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    self.calls = 0

  def __call__(self, image):
    self.calls += 1
    return self.boxes


def test_predict_without_boxes_uses_the_face_finder():
  p = _small_predictor()
  rng = np.random.default_rng(6)
  images = [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8) for _ in range(2)]
  boxes = [(10, 12, 60, 70), (50, 20, 100, 80)]
  p._face_finder = _FakeFinder(boxes)
  found = p.predict(images)
  given = p.predict(images, [boxes, boxes])
  assert p._face_finder.calls == 2 and len(found) == 4
  np.testing.assert_array_equal(found.image_index, [0, 0, 1, 1])
  np.testing.assert_allclose(found.landmarks, given.landmarks, atol=1e-5)
  np.testing.assert_allclose(found.boxes, given.boxes)
  # A photo without a face: no faces, no error.
  p._face_finder = _FakeFinder(np.zeros((0, 4)))
  none = p.predict(images[0])
  assert len(none) == 0 and none.landmarks.shape == (0, 10, 2)


def test_face_finder_without_dlib_says_how_to_install(monkeypatch):
  from musica_jax import detector
  monkeypatch.setitem(sys.modules, "dlib", None)
  with pytest.raises(ImportError, match="peers"):
    detector.FaceFinder(68)
  p = _small_predictor()
  with pytest.raises(ValueError, match="no dlib_hog box fit for 10-landmark"):
    p.find_faces(np.zeros((50, 50, 3), np.uint8))


def test_shipped_detector_fit_maps_detections_onto_landmark_boxes(shared_data):
  """dlib's HOG detector + the shipped fit on real common-set photos (never used by the
  fit): the mapped box overlaps the ground-truth landmark box well, and the default model
  localises the face from it."""
  _needs_dlib()
  from experiments import peers_lib
  from musica_jax import detector, metrics, schemes
  items = peers_lib.split_items(str(shared_data / "300w"), "lfpw_testset")[:8]
  finder = detector.FaceFinder(68)
  p = predictor_lib.Predictor.default()
  ious, nmes = [], []
  for it in items:
    image = images_lib.read_image(it.image_path)
    boxes = finder(image)
    k = detector.match_detection(it.box, boxes)
    if k is None:
      continue
    ious.append(float(detector.iou(it.box, boxes[k:k + 1])[0]))
    pred = p.predict(image, boxes[k])
    nmes.append(float(metrics.per_face_nme(pred.landmarks, it.landmarks[None],
                                           schemes.IBUG68, "interocular")[0]))
  assert len(ious) >= 6
  assert np.median(ious) > 0.75, ious
  assert np.mean(nmes) < 0.06, nmes


# ---------------------------------------------------------------------------------------
# Video.


def test_tracker_redetects_only_when_the_estimated_error_says_so():
  from musica_jax import tracking
  # Zero weights: the landmarks are the mean shape, whose tight box is the crop's 142-px
  # box, so a tracked square box stays where it is.
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), model_io.param_template(SMALL))
  rng = np.random.default_rng(7)
  mean = rng.uniform(113.5 - 71, 113.5 + 71, (10, 2))
  mean[:2] = [[113.5 - 71, 113.5 - 71], [113.5 + 71, 113.5 + 71]]
  p = predictor_lib.Predictor(params, SMALL, mean.astype(np.float32), max_batch=8)
  frames = [rng.integers(0, 256, (80, 80, 3), dtype=np.uint8) for _ in range(4)]
  p._face_finder = _FakeFinder([(20, 20, 60, 60)])
  t = tracking.FaceTracker(p, t_fail=np.inf)
  steps = [t.step(f) for f in frames]
  assert [s.reason for s in steps] == ["start", "", "", ""]
  assert t.redetections == 1 and p._face_finder.calls == 1
  # The next box is the tight box of the previous landmarks.
  np.testing.assert_allclose(t.boxes[0], np.r_[steps[-1].prediction.landmarks[0].min(0),
                                               steps[-1].prediction.landmarks[0].max(0)],
                             atol=1e-4)
  t = tracking.FaceTracker(p, t_fail=-1.0)          # every estimate is "lost"
  assert [t.step(f).reason for f in frames] == ["start"] + ["error>=t_fail"] * 3
  assert t.redetections == 4
  p._face_finder = _FakeFinder(np.zeros((0, 4)))   # nobody there
  t = tracking.FaceTracker(p)
  assert [len(t.step(f).prediction) for f in frames[:2]] == [0, 0]
  assert t.redetections == 2


def test_tracking_a_real_face_through_a_synthetic_sequence(shared_data, tmp_path):
  """A 300W common face moved, scaled and rotated over 16 frames, written as a folder of
  frames and run through `experiments.predict --video`: one detection, then tracked with a
  low error on every frame."""
  _needs_dlib()
  from experiments import deploy_benchmark_lib, peers_lib, predict_lib
  from musica_jax import metrics, schemes
  from PIL import Image
  it = peers_lib.split_items(str(shared_data / "300w"), "helen_testset")[0]
  frames, gt = deploy_benchmark_lib.synthetic_sequence(
      images_lib.read_image(it.image_path), it.landmarks, 16)
  d = tmp_path / "frames"
  d.mkdir()
  for i, f in enumerate(frames):
    Image.fromarray(f).save(d / f"{i:03d}.png")
  res = predict_lib.run_video(str(d), predictor_lib.Predictor.default(), t_fail=0.08,
                              output=str(tmp_path / "overlay"),
                              output_json=str(tmp_path / "v.json"), budget=2.5)
  assert len(res["frames"]) == 16 and res["frames"][0]["redetected"]
  # Frame by frame (batch 1) the stream still spends about the budget it asked for.
  assert res["budget"] == 2.5 and abs(res["mean_iterations"] - 2.5) <= 0.25
  assert res["redetections"] <= 2
  lm = np.stack([np.asarray(f["faces"][0]["landmarks"]) for f in res["frames"]])
  nme = metrics.per_face_nme(lm, gt, schemes.IBUG68, "interocular")
  assert float(np.max(nme)) < 0.06, nme
  assert len(list((tmp_path / "overlay").glob("*.png"))) == 16
  assert json.loads((tmp_path / "v.json").read_text())["redetections"] == res["redetections"]


def test_predict_cli_without_box_draws_every_detected_face(tmp_path):
  """experiments.predict with no --box: the face finder's faces, all in the JSON and the
  overlay; a photo where it finds none is reported, not an error."""
  from experiments import predict_lib
  from PIL import Image
  p = _small_predictor()
  p._face_finder = _FakeFinder([(10, 10, 50, 55), (60, 15, 100, 60)])
  rng = np.random.default_rng(8)
  path = tmp_path / "two.png"
  Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)).save(path)
  boxes = predict_lib.boxes_for([str(path)], [], False)
  assert boxes == [None]
  res = predict_lib.run([str(path)], boxes, p, output=str(tmp_path / "o.png"),
                        output_json=str(tmp_path / "o.json"))
  faces = res["images"][0]["faces"]
  assert len(faces) == 2 and (tmp_path / "o.png").is_file()
  np.testing.assert_allclose(faces[1]["box"], [60, 15, 100, 60])
  p._face_finder = _FakeFinder(np.zeros((0, 4)))
  assert predict_lib.run([str(path)], [None], p)["images"][0]["faces"] == []


@pytest.mark.slow
def test_savedmodel_export_matches_the_predictor(tmp_path):
  """--format=savedmodel (TensorFlow, via jax2tf): the serving signature gives the
  predictor's full-cascade landmarks and estimated error for any batch size."""
  if not model_io.is_model_dir(model_io.DEFAULT_MODEL_DIR):
    pytest.skip("no default model ships with this checkout")
  import tensorflow as tf
  from experiments import export_model
  export_model.export_savedmodel(str(tmp_path), model="default")
  serve = tf.saved_model.load(str(tmp_path / "saved_model")).signatures["serving_default"]
  p = predictor_lib.Predictor.default()
  crops = np.random.default_rng(9).normal(size=(3, 228, 228, 3)).astype(np.float32)
  out = serve(crops=tf.constant(crops))
  ref = p.run_fast(crops)
  np.testing.assert_allclose(out["landmarks"].numpy(), ref["landmarks"], atol=1e-4)
  np.testing.assert_allclose(out["estimated_error"].numpy(), ref["estimated_error"], atol=1e-6)
