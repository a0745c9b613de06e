"""Training/eval pipelines on a tiny synthetic dataset: resume, sharding, padding, balancing."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import balancing
from data_pipelines import config as config_lib
from data_pipelines import datasets
from data_pipelines import input_pipeline
from data_pipelines import synthetic_faces


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  return config_lib.DataConfig(
      dataset="synthetic_faces", tfds_dir=str(tmp_path_factory.mktemp("tfds")),
      num_points=68, synthetic_train_size=24, synthetic_test_size=10, synthetic_image_size=128,
      batch_size=4, eval_batch_size=4, eval_split="test", balancing="gdb",
      gdb_components=4, num_parallel_calls=2)


def test_synthetic_faces_deterministic_and_on_structure():
  for n in (68, 98):
    a, b = synthetic_faces.make_face(7, 3, n), synthetic_faces.make_face(7, 3, n)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.landmarks, b.landmarks)
    assert a.landmarks.shape == (n, 2) and a.image.shape == (192, 192, 3)
    assert not np.array_equal(a.landmarks, synthetic_faces.make_face(7, 4, n).landmarks)
    # Landmarks sit on drawn edges: strong local gradient at nearly all of them.
    fractions = []
    for i in range(10):
      f = synthetic_faces.make_face(0, i, n)
      g = f.image.astype(np.float32).mean(-1)
      assert f.landmarks.min() >= 3 and f.landmarks.max() <= 188
      gx, gy = np.abs(np.diff(g, axis=1)), np.abs(np.diff(g, axis=0))
      hits = [max(gx[int(y) - 2:int(y) + 3, int(x) - 2:int(x) + 2].max(),
                  gy[int(y) - 2:int(y) + 2, int(x) - 2:int(x) + 3].max()) > 15
              for x, y in np.round(f.landmarks)]
      fractions.append(np.mean(hits))
    assert np.mean(fractions) > 0.9, fractions


def test_synthetic_left_right_follow_scheme():
  from musica_jax import schemes
  for n in (68, 98):
    s = schemes.get_scheme(n)
    for i in range(5):
      f = synthetic_faces.make_face(1, i, n, synthetic_faces.SyntheticFaceConfig(max_roll_deg=0))
      left = f.landmarks[list(s.left_eye)].mean(0)
      right = f.landmarks[list(s.right_eye)].mean(0)
      assert left[0] < right[0]


def test_split_sizes_and_statistics(cfg):
  assert input_pipeline.split_sizes(cfg) == {"train": 24, "test": 10}
  stats = input_pipeline.dataset_statistics(cfg)
  assert stats["mean_shape"].shape == (68, 2) and stats["mean_shape"].dtype == np.float32
  span = stats["mean_shape"].max(0) - stats["mean_shape"].min(0)
  assert 100 < span.max() <= 142.5     # the mean of 142-px landmark boxes
  again = input_pipeline.dataset_statistics(cfg)   # from the on-disk cache
  np.testing.assert_array_equal(stats["mean_shape"], again["mean_shape"])


@pytest.mark.parametrize("bal", ["gdb", "none"])
def test_resume_gives_the_same_batches(cfg, bal):
  c = dataclasses.replace(cfg, balancing=bal)
  it = input_pipeline.train_iterator(c, start_step=0)
  batches = [next(it) for _ in range(8)]       # 32 samples > 24 faces: crosses an epoch
  b = batches[0]
  assert b["image"].shape == (4, 228, 228, 3) and b["image"].dtype == np.float32
  assert b["landmarks"].shape == (4, 68, 2) and b["landmarks"].dtype == np.float32
  np.testing.assert_allclose(b["image"].mean((1, 2, 3)), 0, atol=1e-4)
  for k in (1, 6):
    resumed = next(input_pipeline.train_iterator(c, start_step=k))
    np.testing.assert_array_equal(resumed["image"], batches[k]["image"])
    np.testing.assert_array_equal(resumed["landmarks"], batches[k]["landmarks"])
  assert not np.array_equal(batches[0]["landmarks"], batches[1]["landmarks"])


def test_hosts_split_the_global_batch(cfg):
  whole = next(input_pipeline.train_iterator(cfg, start_step=2))
  parts = [next(input_pipeline.train_iterator(cfg, 2, h, 2)) for h in range(2)]
  np.testing.assert_array_equal(np.concatenate([p["landmarks"] for p in parts]),
                                whole["landmarks"])
  with pytest.raises(ValueError, match="batch_size"):
    input_pipeline.train_iterator(cfg, 0, 0, 3)


def test_epoch_without_balancing_is_a_permutation(cfg):
  c = dataclasses.replace(cfg, balancing="none")
  fn = input_pipeline.sample_index_fn(c, 24, None)
  idx = [int(fn(tf.constant(p, tf.int64))[0]) for p in range(48)]
  assert sorted(idx[:24]) == list(range(24)) and sorted(idx[24:]) == list(range(24))
  assert idx[:24] != idx[24:]


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_pads_and_drops_nothing(cfg, process_count):
  c = dataclasses.replace(cfg, eval_batch_size=4)
  batches = [list(input_pipeline.eval_iterator(c, "test", h, process_count))
             for h in range(process_count)]
  assert len({len(b) for b in batches}) == 1 and len(batches[0]) == 3   # ceil(10 / 4)
  ids, masks = [], []
  for step in range(3):
    for h in range(process_count):
      b = batches[h][step]
      assert b["image"].shape[0] == 4 // process_count
      masks.append(b["mask"])
      ids += [f for f, m in zip(b["file_id"], b["mask"]) if m]
  assert np.concatenate(masks).sum() == 10 and len(set(ids)) == 10
  data = datasets.load_split(c, "test")
  assert sorted(i.decode() for i in ids) == sorted(data.file_ids.tolist())
  b = batches[0][0]
  # Boxes are the face boxes in the crop: longer side 142 px, centred.
  side = np.max(b["box"][:, 2:] - b["box"][:, :2], -1)
  np.testing.assert_allclose(side, 142.0, atol=1e-3)
  # crop_scale/offset map crop landmarks back to the stored image coordinates.
  back = (b["landmarks"] - b["crop_offset"][:, None]) / b["crop_scale"][:, None, None]
  order = [list(data.file_ids).index(f.decode()) for f in b["file_id"]]
  np.testing.assert_allclose(back, data.landmarks[order], atol=1e-3)


def test_balancing_weights_and_sampling_frequencies():
  rng = np.random.default_rng(0)
  base = rng.normal(0, 1, (68, 2))
  shapes = base + rng.normal(0, 0.03, (300, 68, 2))
  shapes[:10] += rng.normal(0, 0.3, (10, 68, 2))             # ten unusual faces
  cfg = config_lib.DataConfig(gdb_components=5, seed=3)
  bal = balancing.compute(cfg, shapes)
  assert np.isclose(bal.weights.mean(), 1.0)
  assert np.argsort(-bal.weights)[:10].tolist() == sorted(np.argsort(-bal.weights)[:10].tolist(),
                                                          key=lambda i: -bal.weights[i])
  assert set(np.argsort(-bal.weights)[:10]) == set(range(10))
  np.testing.assert_allclose(bal.weights / bal.weights.mean(), bal.score / bal.score.mean())
  # Sampled frequencies follow the weights (stateless sampler, 30k draws).
  fn = input_pipeline.sample_index_fn(cfg, 300, bal.weights)
  ds = tf.data.Dataset.range(30000).map(lambda p: fn(p)[0],
                                        num_parallel_calls=2).batch(10000)
  idx = np.concatenate(list(ds.as_numpy_iterator()))
  freq = np.bincount(idx, minlength=300) / len(idx)
  expected = bal.weights / bal.weights.sum()
  assert abs(freq[:10].sum() / expected[:10].sum() - 1) < 0.05
  ratio_emp = freq[:10].mean() / np.median(freq)
  ratio_w = bal.weights[:10].mean() / np.median(bal.weights)
  assert abs(ratio_emp / ratio_w - 1) < 0.1, (ratio_emp, ratio_w)
  # Same seed -> same draws.
  again = np.concatenate(list(ds.as_numpy_iterator()))
  np.testing.assert_array_equal(idx, again)


def test_pdb_flattens_the_first_axis_histogram():
  rng = np.random.default_rng(1)
  base = rng.normal(0, 1, (68, 2))
  shapes = base + rng.normal(0, 0.03, (400, 68, 2))
  cfg = config_lib.DataConfig(balancing="pdb", pdb_bins=8)
  bal = balancing.compute(cfg, shapes)
  edges = np.linspace(bal.score.min(), bal.score.max() + 1e-12, 9)
  bins = np.clip(np.digitize(bal.score, edges) - 1, 0, 7)
  mass = np.bincount(bins, weights=bal.weights, minlength=8)
  occupied = mass[np.bincount(bins, minlength=8) > 0]
  np.testing.assert_allclose(occupied, occupied[0], rtol=1e-6)
  assert balancing.compute(dataclasses.replace(cfg, balancing="none"), shapes).weights is None
