"""Training/eval pipelines on a tiny synthetic dataset: resume, sharding, padding, balancing."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import balancing
from data_pipelines import config as config_lib
from data_pipelines import datasets
from data_pipelines import face_cache
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
  assert input_pipeline.split_sizes(cfg) == {"train": 24, "test": 10, "train_fit": 22,
                                             "val": 2}
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


@pytest.mark.parametrize("changes", [dict(occlusion_prob=0.5, greyscale_prob=0.3),
                                     dict(lowres_prob=0.5, blur_prob=0.5, occlusion_prob=0.3,
                                          lowres_min_px=20.0),
                                     dict(augment=False)],
                         ids=["all_augmentations", "image_quality", "plain"])
def test_cached_pipeline_equals_the_per_sample_pipeline(cfg, changes):
  """The face cache + batched render gives the batches of the per-sample path (decode,
  augment_example, standardise per sample): the same draws (landmarks bit for bit), the
  same pixels up to float rounding (XLA's fused multiply-adds, the sums of the mean and
  variance): <= 1e-3 standardised units, ~0.05 grey levels."""
  c = dataclasses.replace(cfg, **changes)
  data = datasets.load_split(c, c.train_split)
  cache = face_cache.build(c, data.images, data.landmarks, data.boxes, c.train_cache_mb << 20)
  assert cache is not None and cache.mosaic.dtype == np.uint8   # the default path caches
  fast = input_pipeline.make_train_dataset(c, start_step=3, data=data).as_numpy_iterator()
  slow = input_pipeline.make_train_dataset(c, start_step=3, data=data,
                                           cache=None).as_numpy_iterator()
  for _ in range(4):
    a, b = next(fast), next(slow)
    assert a["image"].shape == b["image"].shape == (4, 228, 228, 3)
    assert a["image"].dtype == np.float32
    np.testing.assert_array_equal(a["landmarks"], b["landmarks"])
    np.testing.assert_allclose(a["image"], b["image"], atol=1e-3)
  for flag in ("occlusion_prob", "lowres_prob", "blur_prob"):
    if changes.get(flag):   # its draws change pixels, nothing else
      plain = dataclasses.replace(c, **{flag: 0.0})
      x = next(input_pipeline.train_iterator(c, 3))
      y = next(input_pipeline.train_iterator(plain, 3))
      np.testing.assert_array_equal(x["landmarks"], y["landmarks"])
      changed = np.abs(x["image"] - y["image"]).max(axis=(1, 2, 3)) > 0.1
      assert changed.any(), (flag, changed)


def test_cache_budget_falls_back_to_decoding_per_sample(cfg):
  data = datasets.load_split(cfg, cfg.train_split)
  assert face_cache.build(cfg, data.images, data.landmarks, data.boxes, 10_000) is None
  assert face_cache.build(cfg, data.images, data.landmarks, data.boxes, 0) is None
  off = dataclasses.replace(cfg, train_cache_mb=0)
  np.testing.assert_allclose(next(input_pipeline.train_iterator(off, 2))["image"],
                             next(input_pipeline.train_iterator(cfg, 2))["image"], atol=1e-3)
  with pytest.raises(ValueError, match="--train_cache_mb"):
    config_lib.validate(dataclasses.replace(cfg, train_cache_mb=-1))


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


def test_val_carve_disjoint_stable_and_sized(cfg):
  train = datasets.load_split(cfg, "train")
  fit, val = datasets.load_split(cfg, "train_fit"), datasets.load_split(cfg, "val")
  assert (len(fit), len(val)) == (22, 2)                      # round(0.1 * 24)
  assert not set(fit.file_ids) & set(val.file_ids)
  assert sorted([*fit.file_ids, *val.file_ids]) == sorted(train.file_ids)
  i = list(train.file_ids).index(val.file_ids[0])
  np.testing.assert_array_equal(val.landmarks[0], train.landmarks[i])
  # Mean shape (the cascade's start) from train_fit only, cached under the carve's name.
  stats = input_pipeline.dataset_statistics(dataclasses.replace(cfg, train_split="train_fit"))
  assert stats["num_faces"] == 22 and stats["split"] == "train_fit"
  assert datasets.stats_path(cfg, "train_fit") != datasets.stats_path(
      dataclasses.replace(cfg, val_seed=1), "train_fit")
  # Another seed, another carve; the same seed, the same faces.
  other = datasets.load_split(dataclasses.replace(cfg, val_seed=1), "val")
  assert set(other.file_ids) != set(val.file_ids)
  again = datasets.load_split(dataclasses.replace(cfg), "val")
  assert list(again.file_ids) == list(val.file_ids)


def test_carve_is_a_function_of_the_ids_and_keeps_photos_whole():
  ids = [f"lfpw/trainset/image_{i:04d}" for i in range(700)]
  ids += [f"afw/{1000 + i}_{k}" for i in range(100) for k in range(1, 1 + i % 3 + 1)]
  ids += [f"WFLW/{i}#{k}" for i in range(50) for k in range(2)]
  mask = datasets.carve(ids, 0.1, seed=5)
  target = round(0.1 * len(ids))
  assert target <= mask.sum() <= target + 2              # a photo holds at most 3 faces
  rng = np.random.default_rng(0)
  perm = rng.permutation(len(ids))
  shuffled = datasets.carve([ids[i] for i in perm], 0.1, seed=5)
  assert {ids[i] for i in perm[shuffled]} == {i for i, m in zip(ids, mask) if m}
  photo = {}
  for f, m in zip(ids, mask):
    photo.setdefault(datasets.photo_id(f), set()).add(bool(m))
  assert all(len(v) == 1 for v in photo.values())          # no photo on both sides
  assert datasets.photo_id("afw/1000_2") == "afw/1000" and datasets.photo_id("WFLW/3#1") == "WFLW/3"
  assert datasets.photo_id("lfpw/trainset/image_0001") == "lfpw/trainset/image_0001"
  assert not datasets.carve(ids, 0.0, seed=5).any()


def test_val_needs_train_fit_and_a_fraction():
  with pytest.raises(ValueError,
                     match="--train_split: 'train' with --eval_split=val: train on train_fit"):
    config_lib.validate(config_lib.DataConfig(train_split="train", eval_split="common,val"))
  with pytest.raises(ValueError, match="--val_fraction"):
    config_lib.validate(config_lib.DataConfig(train_split="train_fit", val_fraction=0.0))
  config_lib.validate(config_lib.DataConfig(train_split="train_fit", eval_split="val"))


def test_eval_box_jitter_moves_the_crop_deterministically(cfg):
  def first(c):
    return next(input_pipeline.eval_iterator(c, "test"))
  plain = first(cfg)
  jit = dataclasses.replace(cfg, box_jitter=0.1)
  a, b = first(jit), first(jit)
  c = first(dataclasses.replace(jit, seed=1))
  for k in ("image", "landmarks", "crop_scale", "crop_offset", "box"):
    np.testing.assert_array_equal(a[k], b[k])                  # same seed, same crops
  assert np.abs(a["crop_offset"] - plain["crop_offset"]).min() > 0.01
  assert not np.array_equal(a["crop_scale"], c["crop_scale"])
  # Still exact: crop landmarks map back to the stored image landmarks; "box" is the
  # dataset's (ground-truth) box in the jittered crop, not the jittered box.
  data = datasets.load_split(cfg, "test")
  order = [list(data.file_ids).index(f.decode()) for f in a["file_id"]]
  back = (a["landmarks"] - a["crop_offset"][:, None]) / a["crop_scale"][:, None, None]
  np.testing.assert_allclose(back, data.landmarks[order], atol=2e-3)
  gt = data.boxes[order] * a["crop_scale"][:, None] + np.tile(a["crop_offset"], 2)
  np.testing.assert_allclose(a["box"], gt, atol=1e-3)
  # Centre moved and size changed within +-10% of the box, and not all by the same amount.
  boxes = datasets.jitter_boxes(data.boxes, data.file_ids, 0.1, 0)
  size0, size1 = data.boxes[:, 2:] - data.boxes[:, :2], boxes[:, 2:] - boxes[:, :2]
  shift = ((boxes[:, :2] + boxes[:, 2:]) - (data.boxes[:, :2] + data.boxes[:, 2:])) / 2
  ratio = size1 / size0
  assert np.all(np.abs(shift) <= 0.1 * size0 + 1e-3) and np.all(np.abs(ratio - 1) <= 0.1 + 1e-5)
  assert np.ptp(ratio) > 0.02 and np.abs(shift).max() > 0.02 * size0.max()
  # Training batches do not see it.
  np.testing.assert_array_equal(next(input_pipeline.train_iterator(jit))["landmarks"],
                                next(input_pipeline.train_iterator(cfg))["landmarks"])
