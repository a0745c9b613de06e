"""Image-quality augmentation (issue #28): blur and low resolution of the training crop
(data_pipelines.augment.degrade; DataConfig.blur_*, lowres_*).

The cached (batched) and per-sample training paths computing the same from the same draws
is tests/test_data_pipeline.py::test_cached_pipeline_equals_the_per_sample_pipeline
[image_quality]."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy import ndimage

from data_pipelines import augment
from data_pipelines import config as config_lib
from data_pipelines import datasets
from data_pipelines import face_cache
from data_pipelines import input_pipeline
from data_pipelines import synthetic_faces
from musica_jax import face_frame
from musica_jax import schemes

CROP = face_frame.CROP_SIZE
ON = dict(lowres_prob=0.5, blur_prob=0.5)


def _face_crop(seed=0):
  """A synthetic face's crop, float32 [228, 228, 3] in 0..255 (edges and flat areas)."""
  f = synthetic_faces.make_face(0, seed, 68)
  box = face_frame.box_from_landmarks(f.landmarks).astype(np.float32)
  return augment.warp(tf.constant(f.image), augment.crop_matrix(tf.constant(box))), f, box


def _draws(cfg, seed):
  crop, f, box = _face_crop()
  del crop
  perm = tf.constant(schemes.IBUG68.flip_permutation, tf.int32)
  p = augment.sample_params(cfg, tf.constant([seed, 3], tf.int64), tf.constant(f.landmarks),
                            tf.constant(box), perm)
  return {k: v.numpy() for k, v in p.items()}


def _gradient_energy(image):
  g = np.asarray(image, np.float64)
  return np.mean(np.diff(g, axis=0) ** 2) + np.mean(np.diff(g, axis=1) ** 2)


def test_defaults_are_off_and_validation_names_the_flag():
  d = config_lib.DataConfig()
  assert d.lowres_prob == 0.0 and d.blur_prob == 0.0
  cases = {"lowres_prob": dict(lowres_prob=1.5), "blur_prob": dict(blur_prob=-0.1),
           "lowres_min_px": dict(lowres_min_px=2.0),
           "lowres_max_px": dict(lowres_min_px=60.0, lowres_max_px=50.0),
           "blur_max_sigma": dict(blur_max_sigma=0.0)}
  for flag, changes in cases.items():
    with pytest.raises(ValueError, match=f"^--{flag}:"):
      config_lib.validate(dataclasses.replace(d, **changes))
  with pytest.raises(ValueError, match="^--lowres_max_px:"):
    config_lib.validate(dataclasses.replace(d, lowres_max_px=200.0))   # > the crop's face
  with pytest.raises(ValueError, match="^--blur_max_sigma:"):
    config_lib.validate(dataclasses.replace(d, blur_max_sigma=float("nan")))
  config_lib.validate(dataclasses.replace(d, **ON, lowres_min_px=142.0, lowres_max_px=142.0))


def test_draws_are_seeded_and_in_range():
  cfg = config_lib.DataConfig(**ON, lowres_min_px=40.0, lowres_max_px=120.0,
                              blur_max_sigma=2.0)
  draws = [_draws(cfg, s) for s in range(24)]
  again = _draws(cfg, 5)
  for k, v in draws[5].items():
    np.testing.assert_array_equal(v, again[k], err_msg=k)
  lowres = np.array([d["lowres"] for d in draws])
  blur = np.array([d["blur"] for d in draws])
  assert 0 < lowres.sum() < 24 and 0 < blur.sum() < 24 and (lowres != blur).any()
  sizes = np.array([d["lowres_size"] for d in draws])
  assert sizes.dtype == np.int32 and len(set(sizes.tolist())) > 10
  assert sizes.min() >= round(CROP * 40 / 142) and sizes.max() <= round(CROP * 120 / 142)
  sigma = np.array([d["blur_sigma"] for d in draws])
  assert sigma.shape == (24, 2) and 0 <= sigma.min() and sigma.max() <= 2.0
  # The draws of the other augmentations do not move when these are switched on.
  off = _draws(config_lib.DataConfig(), 5)
  for k in ("matrix", "landmarks", "colour", "colour_fractions", "greyscale"):
    np.testing.assert_array_equal(off[k], draws[5][k], err_msg=k)
  assert not off["lowres"] and not off["blur"]


def test_augment_example_is_deterministic_and_lands_only_on_pixels():
  crop, f, box = _face_crop()
  del crop
  perm = tf.constant(schemes.IBUG68.flip_permutation, tf.int32)
  cfg = config_lib.DataConfig(lowres_prob=1.0, blur_prob=1.0)
  plain = dataclasses.replace(cfg, lowres_prob=0.0, blur_prob=0.0)
  args = (tf.constant(f.image), tf.constant(f.landmarks), tf.constant(box), perm)
  key = tf.constant([7, 1], tf.int64)
  a_img, a_pts = augment.augment_example(cfg, key, *args)
  b_img, b_pts = augment.augment_example(cfg, key, *args)
  c_img, c_pts = augment.augment_example(plain, key, *args)
  np.testing.assert_array_equal(a_img.numpy(), b_img.numpy())
  np.testing.assert_array_equal(a_pts.numpy(), c_pts.numpy())       # landmarks unchanged
  assert _gradient_energy(a_img.numpy()) < 0.7 * _gradient_energy(c_img.numpy())


def test_off_is_bit_identical_to_the_pipeline_without_it(tmp_path_factory, monkeypatch):
  """Default flags: both training paths give exactly the batches of the code before the
  augmentation existed (augment.degrade replaced by nothing)."""
  cfg = config_lib.DataConfig(
      dataset="synthetic_faces", tfds_dir=str(tmp_path_factory.mktemp("tfds")),
      synthetic_train_size=12, synthetic_test_size=4, synthetic_image_size=128, batch_size=4,
      eval_split="test", num_parallel_calls=2, occlusion_prob=0.5)
  data = datasets.load_split(cfg, cfg.train_split)

  def batches(cache):
    ds = input_pipeline.make_train_dataset(cfg, start_step=1, data=data, cache=cache)
    it = ds.as_numpy_iterator()
    return [next(it) for _ in range(2)]

  cache = face_cache.build(cfg, data.images, data.landmarks, data.boxes, 1 << 30)
  now = batches(cache), batches(None)
  monkeypatch.setattr(augment, "degrade", lambda cfg, images, params, in_place=False: images)
  before = batches(cache), batches(None)
  for x, y in zip(now, before):
    for a, b in zip(x, y):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["landmarks"], b["landmarks"])


@pytest.mark.parametrize("face_px", [40.0, 75.0, 120.0])
def test_lowres_removes_detail_and_keeps_brightness(face_px):
  crop, _, _ = _face_crop(2)
  n = int(augment.lowres_size(face_px))
  assert n == round(CROP * face_px / face_frame.BOX_SIZE)
  out = augment.lowres(crop, n).numpy()
  assert out.shape == (CROP, CROP, 3) and out.dtype == np.float32
  ratio = _gradient_energy(out) / _gradient_energy(crop.numpy())
  assert ratio < {40.0: 0.4, 75.0: 0.6, 120.0: 0.9}[face_px], ratio
  assert abs(out.mean() - crop.numpy().mean()) < 0.5
  assert out.min() >= crop.numpy().min() - 1e-3 and out.max() <= crop.numpy().max() + 1e-3


def _area_matrix(n: int, size: int = CROP) -> np.ndarray:
  """[n, size]: low-resolution pixel j = the mean of the crop over [j, j + 1) x size / n
  (pixel edges; each crop pixel constant over its unit square, counted by overlap)."""
  s = size / n
  k = np.arange(size)
  lo, hi = np.arange(n)[:, None] * s, (np.arange(n)[:, None] + 1) * s
  return np.clip(np.minimum(hi, k + 1) - np.maximum(lo, k), 0, None) / s


@pytest.mark.parametrize("n", [57, 76, 101, 193])
def test_lowres_is_the_area_downscale_and_bilinear_upscale_of_pil(n):
  """Down: each low-resolution pixel the mean of the area it covers (for an integer factor
  228 / n, its block: PIL BOX); back up: PIL BILINEAR (half-pixel centres, borders held)."""
  img = np.random.default_rng(n).uniform(0, 255, (CROP, CROP, 3)).astype(np.float32)
  ours = augment.lowres(tf.constant(img), tf.constant(n)).numpy()
  a = _area_matrix(n)
  for c in range(3):
    small = (a @ img[..., c].astype(np.float64) @ a.T).astype(np.float32)
    if CROP % n == 0:
      box = Image.fromarray(img[..., c], "F").resize((n, n), Image.Resampling.BOX)
      np.testing.assert_allclose(np.asarray(box), small, atol=1e-3)
    up = Image.fromarray(small, "F").resize((CROP, CROP), Image.Resampling.BILINEAR)
    np.testing.assert_allclose(ours[..., c], np.asarray(up), atol=5e-3)


@pytest.mark.parametrize("n", [64, 101, 193])
def test_lowres_keeps_constant_and_linear_images(n):
  const = tf.fill([CROP, CROP, 3], 117.0)
  np.testing.assert_allclose(augment.lowres(const, n).numpy(), 117.0, atol=0.01)
  # A ramp comes back inside the outermost low-resolution pixel centres (outside them the
  # border value is held), up to the part-covered pixels at the edges of each area (a
  # pixel is constant over its square): < 0.1 of the ramp's 0.5 levels per px.
  x = np.arange(CROP, dtype=np.float32)
  ramp = np.broadcast_to((0.5 * x[None, :] + 0.25 * x[:, None] + 10.0)[..., None],
                         (CROP, CROP, 3))
  out = augment.lowres(tf.constant(ramp), n).numpy()
  s = CROP / n
  lo, hi = int(np.ceil(0.5 * s - 0.5)), int(np.floor((n - 0.5) * s - 0.5))
  np.testing.assert_allclose(out[lo:hi + 1, lo:hi + 1], ramp[lo:hi + 1, lo:hi + 1], atol=0.05)


def test_gaussian_blur_is_scipys_with_mirrored_borders():
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 255, (3, CROP, CROP, 3)).astype(np.float32)
  sigma = np.array([[0.7, 2.5], [3.0, 0.3], [1.5, 1.5]], np.float32)
  radius = 9
  out = augment.gaussian_blur(tf.constant(images), tf.constant(sigma), radius).numpy()
  for k in range(3):
    ref = images[k].astype(np.float64)
    for axis in (0, 1):
      s = float(sigma[k, axis])
      ref = ndimage.gaussian_filter1d(ref, s, axis=axis, mode="reflect", truncate=radius / s)
    np.testing.assert_allclose(out[k], ref, atol=2e-3)
  # sigma 0: the image itself; a constant stays constant.
  np.testing.assert_array_equal(
      augment.gaussian_blur(tf.constant(images[:1]), tf.zeros([1, 2]), radius).numpy(),
      images[:1])
  const = augment.gaussian_blur(tf.fill([1, CROP, CROP, 3], 40.0), tf.constant([[3.0, 1.0]]),
                                radius).numpy()
  np.testing.assert_allclose(const, 40.0, atol=1e-3)
  crop, _, _ = _face_crop(1)
  blurred = augment.gaussian_blur(crop[None], tf.constant([[2.0, 2.0]]), radius)[0].numpy()
  assert _gradient_energy(blurred) < 0.5 * _gradient_energy(crop.numpy())
  assert abs(blurred.mean() - crop.numpy().mean()) < 0.5


def test_degrade_touches_only_drawn_samples_in_place_or_not():
  rng = np.random.default_rng(1)
  images = rng.uniform(0, 255, (5, CROP, CROP, 3)).astype(np.float32)
  cfg = config_lib.DataConfig(**ON, blur_max_sigma=2.0)
  params = {"blur": tf.constant([True, False, True, False, False]),
            "blur_sigma": tf.constant(rng.uniform(0.5, 2.0, (5, 2)), tf.float32),
            "lowres": tf.constant([False, True, True, False, False]),
            "lowres_size": tf.constant([50, 64, 120, 90, 30], tf.int32)}
  x = tf.constant(images)
  out = augment.degrade(cfg, x, params).numpy()
  np.testing.assert_array_equal(x.numpy(), images)                # the input is untouched
  np.testing.assert_array_equal(out[3:], images[3:])               # not drawn: bit for bit
  for i in range(3):
    assert np.abs(out[i] - images[i]).max() > 1.0
  # One at a time (the per-sample path's batch of one) = the batch.
  for i in range(5):
    one = augment.degrade(cfg, x[i:i + 1], {k: v[i:i + 1] for k, v in params.items()})
    np.testing.assert_allclose(one.numpy()[0], out[i], atol=1e-3)
  # Blur then resolution, as the camera.
  expected = augment.lowres(augment.gaussian_blur(x[2:3], params["blur_sigma"][2:3],
                                                  augment.blur_radius(cfg))[0], 120)
  np.testing.assert_allclose(out[2], expected.numpy(), atol=1e-3)
  # In place (the cached path's own crop buffer): the same values.
  fresh = tf.function(lambda: augment.degrade(cfg, tf.identity(x) + 0.0, params,
                                              in_place=True))()
  np.testing.assert_array_equal(fresh.numpy(), out)
  # Nothing drawn: nothing changes.
  none = {**params, "blur": tf.zeros([5], bool), "lowres": tf.zeros([5], bool)}
  np.testing.assert_array_equal(augment.degrade(cfg, x, none).numpy(), images)


def test_training_flags_parse(train_config, tfds_dir):
  """`python -m experiments.train --flagfile=demo.flags ... --lowres_prob=0.5` parses into
  the data config (and a bad value is a one-line error naming the flag)."""
  from absl import app  # noqa: PLC0415
  base = ["--flagfile=demo.flags", f"--tfds_dir={tfds_dir}"]
  cfg = train_config([*base, "--lowres_prob=0.5", "--lowres_min_px=32", "--blur_prob=0.25",
                      "--blur_max_sigma=2.5"]).data
  assert (cfg.lowres_prob, cfg.lowres_min_px, cfg.lowres_max_px) == (0.5, 32.0, 120.0)
  assert (cfg.blur_prob, cfg.blur_max_sigma) == (0.25, 2.5)
  with pytest.raises(app.UsageError, match="--lowres_max_px"):
    train_config([*base, "--lowres_prob=0.5", "--lowres_max_px=300"])


def test_resuming_an_older_run_is_no_data_change():
  """A run_config written before these fields existed reads as their defaults (off)."""
  from experiments import train_lib  # noqa: PLC0415
  cfg = config_lib.DataConfig()
  old = {k: v for k, v in dataclasses.asdict(cfg).items()
         if not k.startswith(("lowres_", "blur_"))}
  assert not train_lib.data_flags_differ(old, cfg)
  assert train_lib.data_flags_differ(old, dataclasses.replace(cfg, lowres_prob=0.3))
  assert train_lib.data_flags_differ(None, cfg)


@pytest.mark.slow   # a JAX compile and two training steps (~15 s on 2 cores)
def test_tiny_training_run_with_it(train_config, tiny_run_flags, tmp_path, capsys):
  import json  # noqa: PLC0415
  from experiments import train_lib  # noqa: PLC0415
  from musica_jax import run_config  # noqa: PLC0415
  flags = tiny_run_flags(tmp_path / "tfds", 16, "--lowres_prob=0.5", "--blur_prob=0.5",
                         "--steps=2")
  train_lib.train_and_evaluate(train_config(flags, tmp_path / "w"), str(tmp_path / "w"))
  assert "step 2/2" in capsys.readouterr().out
  data = run_config.load(tmp_path / "w")["data"]
  assert (data["lowres_prob"], data["blur_prob"]) == (0.5, 0.5)
  lines = [json.loads(l) for l in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
  losses = [v for l in lines for k, v in l.items() if "loss" in k]
  assert losses and np.all(np.isfinite(losses))
