"""The predictor: its crop is the evaluation pipeline's crop; inputs are checked; landmarks
come back in image pixels."""
import functools
import glob
import os

import jax
import numpy as np
import pytest

from musica_jax import crop as crop_lib
from musica_jax import face_frame
from musica_jax import images as images_lib
from musica_jax import model_io
from musica_jax import predictor as predictor_lib
from musica_jax.config import ModelConfig


def _pts_files(shared_data, n_per_folder=2):
  files = []
  for folder in ("lfpw/testset", "helen/testset"):
    files += sorted(glob.glob(str(shared_data / "300w" / folder / "*.jpg")))[:n_per_folder]
  return files


def _real_faces(shared_data):
  from data_pipelines import readers
  files = _pts_files(shared_data)
  raws = [open(f, "rb").read() for f in files]
  pts = np.stack([readers.read_pts(f[:-4] + ".pts", 68) for f in files]).astype(np.float32)
  boxes = np.stack([face_frame.box_from_landmarks(p) for p in pts]).astype(np.float32)
  return files, raws, pts, boxes


def test_crop_equals_eval_pipeline_on_real_300w(shared_data):
  """The standardised crops of make_eval_dataset (the real tf.data pipeline) and of
  crop_lib.face_crops agree to 1e-3 when both start from the same decoded pixels."""
  import tensorflow as tf
  from data_pipelines import config as data_config
  from data_pipelines import augment
  from data_pipelines import datasets
  from data_pipelines import input_pipeline

  files, raws, pts, boxes = _real_faces(shared_data)
  m = len(files)
  images = np.empty(m, dtype=object)
  images[:] = raws
  data = datasets.SplitData(name="all", images=images, landmarks=pts, boxes=boxes,
                            attributes=np.zeros((m, 6), np.int64),
                            file_ids=np.array([os.path.basename(f) for f in files], object))
  cfg = data_config.DataConfig(dataset="pts_folder", data_dir=str(shared_data / "300w"),
                               eval_batch_size=m, num_parallel_calls=1)
  batch = next(input_pipeline.make_eval_dataset(cfg, "all", data=data).as_numpy_iterator())
  decoded = [augment.decode(tf.constant(r)).numpy() for r in raws]
  crops, scale, offset, index, _ = crop_lib.face_crops(decoded, list(boxes))
  np.testing.assert_array_equal(scale, batch["crop_scale"])
  np.testing.assert_array_equal(offset, batch["crop_offset"])
  np.testing.assert_array_equal(index, np.arange(m))
  diff = np.abs(np.asarray(crops) - batch["image"]).max()
  assert diff < 1e-3, f"predictor crop differs from the eval pipeline's by {diff}"
  # Landmarks mapped into the crop frame agree too.
  np.testing.assert_allclose(face_frame.to_crop(pts, scale, offset), batch["landmarks"],
                             atol=1e-3)


def test_pil_decoding_matches_pipeline_decoding(shared_data):
  """The predictor's callers decode with PIL (exact IDCT); the pipeline decodes JPEGs with
  TensorFlow's INTEGER_ACCURATE IDCT, which gives the same pixels (TF's default,
  INTEGER_FAST, differs by a few grey levels)."""
  import tensorflow as tf
  from PIL import Image
  from data_pipelines import augment
  files, raws, _, boxes = _real_faces(shared_data)
  worst = 0
  for f, r in zip(files, raws):
    pil = np.asarray(Image.open(f).convert("RGB")).astype(int)
    tfd = augment.decode(tf.constant(r)).numpy().astype(int)
    assert pil.shape == tfd.shape, f
    worst = max(worst, int(np.abs(pil - tfd).max()))
  exact = tf.io.decode_jpeg(raws[0], channels=3, dct_method="INTEGER_ACCURATE").numpy()
  np.testing.assert_array_equal(exact, np.asarray(Image.open(files[0]).convert("RGB")))
  assert worst == 0, f"pipeline decoding differs from PIL by up to {worst} grey levels"


def test_buckets():
  assert [predictor_lib.count_bucket(n, 64) for n in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 64]


@functools.lru_cache(maxsize=1)
def _zero_predictor_compiled():
  cfg = ModelConfig(num_landmarks=68, patch_indices=tuple(range(0, 68, 4)), hidden_size=32)
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), model_io.param_template(cfg))
  mean = np.random.default_rng(2).uniform(60, 170, (68, 2)).astype(np.float32)
  return predictor_lib.Predictor(params, cfg, mean, max_batch=4, min_batch=4)


def _zero_predictor():
  """A small model whose parameters are all zero: it never moves the mean shape, so its
  landmarks are exactly the mean shape mapped back through the crop frame. One object
  (its compiled programs) shared by the tests, its quitting profile reset for each."""
  p = _zero_predictor_compiled()
  p.quit_info = None
  return p


def test_predict_maps_landmarks_back_to_image_coordinates():
  p = _zero_predictor()
  rng = np.random.default_rng(3)
  images = [rng.integers(0, 256, (120, 90, 3), dtype=np.uint8),
            rng.integers(0, 256, (70, 200, 3), dtype=np.uint8)]
  boxes = [[(10, 20, 60, 80)], [(5, 5, 40, 50), (100, 10, 160, 60), (150.5, 20, 199, 69)]]
  pred = p.predict(images, boxes)
  assert len(pred) == 4
  np.testing.assert_array_equal(pred.image_index, [0, 1, 1, 1])
  all_boxes = np.concatenate([np.asarray(b, np.float64) for b in boxes])
  scale, offset = face_frame.crop_transform(all_boxes)
  expected = face_frame.from_crop(np.broadcast_to(p.mean_shape, (4, 68, 2)), scale, offset)
  np.testing.assert_allclose(pred.landmarks, expected, atol=1e-3)
  assert pred.landmarks.shape == (4, 68, 2)
  np.testing.assert_array_equal(pred.iterations, [3, 3, 3, 3])
  assert pred.valid.all() and pred.valid.dtype == bool
  assert len(pred.for_image(1)) == 3
  js = pred.to_json()
  assert js[3]["image_index"] == 1 and len(js[3]["landmarks"]) == 68
  # One image, one box: the same face, same answer.
  one = p.predict(images[1], boxes[1][1])
  np.testing.assert_allclose(one.landmarks[0], pred.landmarks[2], atol=1e-4)
  # Failure threshold below any estimate: invalid.
  assert not p.predict(images[0], boxes[0], t_fail=-1.0).valid.any()


@pytest.mark.parametrize("box,match", [
    ((500, 500, 600, 600), "outside"),
    ((-300, -300, -200, -200), "outside"),
    ((10, 10, 10, 50), "empty"),
    ((10, 50, 40, 20), "empty"),
    ((np.nan, 0, 10, 10), "non-finite"),
    ((0, 0, 10), "x0, y0, x1, y1"),
])
def test_bad_boxes_are_refused(box, match):
  p = _zero_predictor()
  image = np.zeros((100, 100, 3), np.uint8)
  with pytest.raises(ValueError, match=match):
    p.predict(image, box)


@pytest.mark.parametrize("image,match", [
    (np.zeros((100, 100), np.uint8), "HxWx3"),
    (np.zeros((100, 100, 4), np.uint8), "HxWx3"),
    (np.full((100, 100, 3), 300.0), "0..255"),
    (np.zeros((0, 100, 3), np.uint8), "empty"),
])
def test_bad_images_are_refused(image, match):
  p = _zero_predictor()
  with pytest.raises(ValueError, match=match):
    p.predict(image, (10, 10, 50, 50))


def test_boxes_must_pair_with_images():
  p = _zero_predictor()
  image = np.zeros((100, 100, 3), np.uint8)
  with pytest.raises(ValueError, match="one entry"):
    p.predict([image, image], [(10, 10, 50, 50)])


def test_no_default_model_message(tmp_path, monkeypatch):
  monkeypatch.setattr(model_io, "DEFAULT_MODEL_DIR", tmp_path / "default_model")
  with pytest.raises(model_io.NoDefaultModelError, match="export_model"):
    predictor_lib.Predictor.default()
  with pytest.raises(model_io.NoDefaultModelError, match="no musica68 model"):
    model_io.load("musica68")
  with pytest.raises(ValueError, match="no shipped model 'musica19'"):
    predictor_lib.Predictor.default("musica19")


@pytest.mark.parametrize("name,patches", [("default", 34), ("musica68", 68)])
def test_shipped_models_on_real_test_faces(shared_data, name, patches):
  """Each shipped model localises real 300W common-set faces far better than its mean
  shape (the README's full-set numbers come from experiments.evaluate)."""
  try:
    p = predictor_lib.Predictor.default(name)
  except model_io.NoDefaultModelError:
    pytest.skip(f"no {name} model ships with this checkout")
  assert p.model_config.num_patches == patches and p.quit_info and np.isfinite(p.default_t_fail)
  from data_pipelines import readers
  from musica_jax import face_frame, metrics, schemes
  files = sorted((shared_data / "300w" / "helen" / "testset").glob("*.jpg"))[:24]
  images = [images_lib.read_image(f) for f in files]
  gts = [readers.read_pts(str(f.with_suffix(".pts")), 68) for f in files]
  boxes = [face_frame.box_from_landmarks(g) for g in gts]
  pred = p.predict(images, boxes)
  nme = metrics.per_face_nme(np.asarray(pred.landmarks), np.stack(gts), schemes.IBUG68,
                             "interocular")
  base = metrics.per_face_nme(
      np.stack([face_frame.from_crop(p.mean_shape[None], *face_frame.crop_transform(b[None]))[0]
                for b in boxes]), np.stack(gts), schemes.IBUG68, "interocular")
  assert float(np.mean(nme)) < 0.06
  assert float(np.mean(nme)) < 0.5 * float(np.mean(base))
  assert np.all((np.asarray(pred.iterations) >= 1) & (np.asarray(pred.iterations) <= 3))


def test_budget_dial_runs_exactly_the_budget():
  """predict(budget=) gives each batch exactly round((budget - 1) n) later iterations,
  nested over the stages; one face alone uses the profile's threshold; a model without a
  profile says so."""
  p = _zero_predictor()
  rng = np.random.default_rng(5)
  images = [rng.integers(0, 256, (120, 120, 3), dtype=np.uint8) for _ in range(3)]
  boxes = [(10, 10, 100, 100)] * 3
  with pytest.raises(ValueError, match="no quitting profile"):
    p.predict(images, boxes, budget=2.0)
  p.quit_info = {"profile": [[1.0, 0.0, 0.0], [2.0, 0.75, 0.25], [3.0, 1.0, 1.0]],
                 "thresholds": [[1.0, 1.0], [-1.0, 3.0]]}
  for budget, total in ((1.0, 3), (2.0, 6), (3.0, 9), (5 / 3, 5)):
    pred = p.predict(images, boxes, budget=budget)
    assert int(pred.iterations.sum()) == total
    assert np.all((pred.iterations >= 1) & (pred.iterations <= 3))
  # The same budget in multiply-adds.
  from musica_jax import cost
  mm = 2.0 * cost.cascade_macs(p.model_config, 1) / 1e6
  assert int(p.predict(images, boxes, budget_mmacs=mm).iterations.sum()) == 6
  # One face: the threshold with that mean iterations on the profile (E = 0 here).
  assert int(p.predict(images[0], boxes[0], budget=1.0).iterations[0]) == 1
  assert int(p.predict(images[0], boxes[0], budget=3.0).iterations[0]) == 3
  with pytest.raises(ValueError, match="between 1 and 3"):
    p.predict(images, boxes, budget=4.0)


def test_predict_is_stateless_and_a_stream_spends_the_budget_asked_for():
  """predict depends on its arguments only: face by face with a budget, each face gets
  the validation threshold (here 3 iterations: its score, 0, sits on the table's threshold
  for 2), whatever ran before. A stream keeps a running account that brings its faces'
  mean to the budget; a new stream starts afresh; without a budget a stream is predict."""
  p = _zero_predictor()
  p.quit_info = {"profile": [[1.0, 0.0, 0.0], [2.0, 0.75, 0.25], [3.0, 1.0, 1.0]],
                 "thresholds": [[1.0, 1.0], [-1.0, 3.0]]}
  image = np.random.default_rng(6).integers(0, 256, (120, 120, 3), dtype=np.uint8)
  box = (10, 10, 100, 100)
  alone = p.predict(image, box, budget=2.0)
  stream = p.stream(budget=2.0)
  first = [int(stream.predict(image, box).iterations[0]) for _ in range(8)]
  assert first[0] == 3 and sum(first) == 16          # the open-loop threshold: 24
  assert stream.mean_iterations == 2.0 and stream.faces == 8
  assert p.stream(budget=2.5).faces == 0              # one account per stream
  # The stream changed nothing that predict reads: the same face, the same answer.
  after = p.predict(image, box, budget=2.0)
  assert int(after.iterations[0]) == int(alone.iterations[0]) == 3
  np.testing.assert_array_equal(after.landmarks, alone.landmarks)
  again = p.stream(budget=2.0)
  assert [int(again.predict(image, box).iterations[0]) for _ in range(8)] == first
  plain = p.stream()
  assert plain.budget is None and np.isnan(plain.mean_iterations)
  np.testing.assert_array_equal(plain.predict(image, box).landmarks,
                                p.predict(image, box).landmarks)
  # run_fast on crops keeps the same account.
  crops = p.crops(image, box)[0]
  s2 = p.stream(budget=2.0)
  assert [int(s2.run_fast(crops)["iterations"][0]) for _ in range(8)] == first
  with pytest.raises(TypeError):
    p.predict(image, box, -np.inf)                    # the dials are keyword-only
