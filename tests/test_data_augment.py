"""Augmentation dot test: pixels and landmarks follow exactly the same geometry.

Bright dots are drawn at the landmark positions of a dark image; after augmenting, each
transformed landmark must sit within 1 px of the centre of a dot, for every augmentation
alone and all together, both eagerly and inside Dataset.map.
"""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import augment
from data_pipelines import config as config_lib
from musica_jax import face_frame
from musica_jax import schemes

N = 68
OFF = dict(rotation_prob=0.0, shear_prob=0.0, scale_prob=0.0, flip_prob=0.0, box_prob=0.0,
           color_prob=0.0, greyscale_prob=0.0, occlusion_prob=0.0)
CASES = {
    "none": {},
    "rotation": dict(rotation_prob=1.0),
    "shear": dict(shear_prob=1.0),
    "scale": dict(scale_prob=1.0),
    "flip": dict(flip_prob=1.0),
    "box": dict(box_prob=1.0),
    "all_geometry": dict(rotation_prob=1.0, shear_prob=1.0, scale_prob=1.0, flip_prob=1.0,
                         box_prob=1.0),
    "all": dict(rotation_prob=1.0, shear_prob=1.0, scale_prob=1.0, flip_prob=1.0,
                box_prob=1.0, color_prob=1.0, greyscale_prob=1.0),
}


def _dot_image():
  """A 200x200 dark image with a 3x3 bright dot at each of 68 grid landmarks."""
  ys, xs = np.meshgrid(np.arange(8), np.arange(9), indexing="ij")
  grid = np.stack([xs.ravel(), ys.ravel()], -1)[:N] * 13.0 + np.array([45.0, 50.0])
  img = np.zeros((200, 200, 3), np.uint8)
  for x, y in grid.astype(int):
    img[y - 1:y + 2, x - 1:x + 2] = 255
  box = face_frame.box_from_landmarks(grid).astype(np.float32)
  return img, grid.astype(np.float32), box


def _check_dots(crop, points, name):
  g = np.asarray(crop, np.float64).mean(-1)
  g = g - np.median(g)
  h, w = g.shape
  errors = []
  for i, (x, y) in enumerate(points):
    xi, yi = int(round(x)), int(round(y))
    if not (4 <= xi < w - 4 and 4 <= yi < h - 4):
      continue   # rotated out of the crop
    win = np.clip(g[yi - 4:yi + 5, xi - 4:xi + 5], 0, None)
    assert win.max() > 0.25 * g.max(), f"{name}: no dot near landmark {i} at {(x, y)}"
    yy, xx = np.mgrid[yi - 4:yi + 5, xi - 4:xi + 5]
    cx, cy = (win * xx).sum() / win.sum(), (win * yy).sum() / win.sum()
    err = np.hypot(cx - x, cy - y)
    assert err < 1.0, f"{name}: dot {i} at {(cx, cy)}, landmark at {(x, y)} ({err:.2f} px)"
    errors.append(err)
  assert len(errors) > N // 2, f"{name}: most dots left the crop"
  # Measured ~0.1 px; a half-pixel convention mistake would give ~0.5-0.7 px.
  assert np.mean(errors) < 0.25, f"{name}: mean dot error {np.mean(errors):.2f} px"


def _cfg(case):
  return config_lib.DataConfig(**{**OFF, **CASES[case]})


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["eager", "dataset_map"])
def test_dots_follow_landmarks(case, mode):
  img, pts, box = _dot_image()
  cfg = _cfg(case)
  perm = tf.constant(schemes.IBUG68.flip_permutation, tf.int32)
  for seed in range(2):
    key = tf.constant([seed, 17], tf.int64)
    fn = lambda k: augment.augment_example(cfg, k, tf.constant(img), tf.constant(pts),
                                           tf.constant(box), perm)
    if mode == "eager":
      crop, points = fn(key)
    else:
      crop, points = next(iter(tf.data.Dataset.from_tensors(key).map(fn)))
    crop, points = crop.numpy(), points.numpy()
    assert crop.shape == (228, 228, 3) and points.shape == (N, 2)
    _check_dots(crop, points, f"{case}/{mode}/seed{seed}")


def test_eager_equals_dataset_map():
  img, pts, box = _dot_image()
  cfg = _cfg("all")
  perm = tf.constant(schemes.IBUG68.flip_permutation, tf.int32)
  key = tf.constant([3, 4], tf.int64)
  fn = lambda k: augment.augment_example(cfg, k, tf.constant(img), tf.constant(pts),
                                         tf.constant(box), perm)
  a = fn(key)
  b = next(iter(tf.data.Dataset.from_tensors(key).map(fn)))
  np.testing.assert_allclose(a[1].numpy(), b[1].numpy(), atol=1e-4)
  np.testing.assert_allclose(a[0].numpy(), b[0].numpy(), atol=1e-3)


def test_no_augmentation_matches_face_frame():
  img, pts, box = _dot_image()
  _, points, _ = augment.eval_example(tf.constant(img), tf.constant(pts), tf.constant(box))
  scale, offset = face_frame.crop_transform(box)
  np.testing.assert_allclose(points.numpy(), face_frame.to_crop(pts, scale, offset), atol=1e-3)
  lo, hi = points.numpy().min(0), points.numpy().max(0)
  assert abs(max(hi - lo) - face_frame.BOX_SIZE) < 1e-3


def test_flip_permutes_left_right():
  img, pts, box = _dot_image()
  cfg = _cfg("flip")
  perm = tf.constant(schemes.IBUG68.flip_permutation, tf.int32)
  _, flipped = augment.augment_example(cfg, tf.constant([0, 0], tf.int64), tf.constant(img),
                                       tf.constant(pts), tf.constant(box), perm)
  _, plain, _ = augment.eval_example(tf.constant(img), tf.constant(pts), tf.constant(box))
  c = (face_frame.CROP_SIZE - 1) / 2
  expected = plain.numpy()[list(schemes.IBUG68.flip_permutation)] * [-1, 1] + [2 * c, 0]
  np.testing.assert_allclose(flipped.numpy(), expected, atol=1e-3)


def test_photometric_ops():
  img = tf.constant(np.random.default_rng(0).uniform(0, 255, (228, 228, 3)), tf.float32)
  grey = augment.greyscale(img).numpy()
  assert np.allclose(grey[..., 0], grey[..., 1]) and np.allclose(grey[..., 1], grey[..., 2])
  jit = augment.colour_jitter(tf.constant([1, 2], tf.int64), img, 0.25).numpy()
  assert jit.min() >= 0 and jit.max() <= 255 and np.isclose(jit.max(), 255)
  occ = augment.occlude(tf.constant([1, 2], tf.int64), tf.zeros_like(img), 0.5).numpy()
  assert 0 < (occ.sum(-1) > 0).mean() <= 0.25 + 1e-6
  std = augment.standardise(img).numpy()
  assert abs(std.mean()) < 1e-4 and abs(std.std() - 1) < 1e-3


def _label_minus_dot(crop, points, half=6):
  """Per landmark: label position minus the centroid of the bright dot around it."""
  g = np.clip(np.asarray(crop, np.float64).mean(-1), 0, None)
  out = []
  for x, y in points:
    xi, yi = int(round(x)), int(round(y))
    if not (half <= xi < g.shape[1] - half and half <= yi < g.shape[0] - half):
      continue
    win = g[yi - half:yi + half + 1, xi - half:xi + half + 1]
    yy, xx = np.mgrid[yi - half:yi + half + 1, xi - half:xi + half + 1]
    out.append([x - (win * xx).sum() / win.sum(), y - (win * yy).sum() / win.sum()])
  assert len(out) > N // 2
  return np.asarray(out)


@pytest.mark.parametrize("flip_prob,shift,sign", [(1.0, 1.5, +1), (1.0, 0.0, -1),
                                                   (0.0, 1.5, +1), (0.0, 0.0, +1)])
def test_flip_keeps_the_labels_convention_offset(flip_prob, shift, sign):
  """Labels annotated delta image px right of the content (dot at p, label at p + delta)
  must stay delta right of it after the flip, in crop px: + delta x crop scale. Mirroring
  labels with the image alone (shift 0) turns it into - delta x scale: the bias a model
  trained with flips learns (half of its faces say +delta, half -delta)."""
  img, pts, box = _dot_image()
  delta = 1.5
  cfg = dataclasses.replace(_cfg("none"), flip_prob=flip_prob, flip_label_shift=shift)
  perm = tf.constant(schemes.IBUG68.flip_permutation, tf.int32)
  crop, points = augment.augment_example(cfg, tf.constant([0, 1], tf.int64), tf.constant(img),
                                         tf.constant(pts + [delta, 0.0]), tf.constant(box),
                                         perm)
  scale, _ = face_frame.crop_transform(box)
  offset = _label_minus_dot(crop.numpy(), points.numpy()).mean(0)
  np.testing.assert_allclose(offset, [sign * delta * scale, 0.0], atol=0.15)


def test_flip_shift_is_in_image_pixels_under_all_geometry():
  """With rotation, shear, scale and box changes too, the mirrored face's offset is the
  convention's (delta - 2 shift, 0) image px carried by the sampled affine."""
  img, pts, box = _dot_image()
  delta = 1.5
  cfg = dataclasses.replace(_cfg("all_geometry"), flip_label_shift=delta)
  perm = tf.constant(schemes.IBUG68.flip_permutation, tf.int32)
  for seed in range(3):
    key = tf.constant([seed, 5], tf.int64)
    labels = tf.constant(pts + [delta, 0.0])
    crop, points = augment.augment_example(cfg, key, tf.constant(img), labels,
                                           tf.constant(box), perm)
    landmark_box = tf.concat([tf.reduce_min(labels, 0), tf.reduce_max(labels, 0)], 0)
    matrix, flip = augment.sample_geometry(cfg, key, tf.constant(box), landmark_box)
    assert bool(flip)
    expected = matrix.numpy()[:2, :2] @ np.array([delta - 2 * delta, 0.0])
    offset = np.median(_label_minus_dot(crop.numpy(), points.numpy(), half=5), 0)
    np.testing.assert_allclose(offset, expected, atol=0.3)


# ---------------------------------------------------------------------------------------
# The face cache (data_pipelines.face_cache): the training crops are warped from each
# face's decoded region instead of the photo.

GEOMETRY_ON = dict(rotation_prob=1.0, shear_prob=1.0, scale_prob=1.0, flip_prob=1.0,
                   box_prob=1.0)
EXTREME = dict(GEOMETRY_ON, rotation_max_deg=180.0, shear_max=0.6, scale_min=0.3,
               scale_max=2.0, box_scale_x_max=1.5, box_scale_y_max=1.6, box_shift_max=0.5)


def _photo_with_small_face(seed=0, size=(1000, 1100), at=(420, 470)):
  """Noise photo (PNG bytes) with the dot face (a ~100 px box) at (y, x): with the default
  augmentation ranges the face's region is a real cut of the photo."""
  img, pts, box = _dot_image()
  rng = np.random.default_rng(seed)
  photo = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
  y, x = at
  photo[y:y + 200, x:x + 200] = np.maximum(photo[y:y + 200, x:x + 200] // 4, img)
  pts, box = pts + [float(x), float(y)], box + [float(x), float(y), float(x), float(y)]
  return tf.io.encode_png(photo).numpy(), photo, pts.astype(np.float32), box.astype(np.float32)


def _params(cfg, keys, pts, box):
  from data_pipelines import face_cache
  perm = tf.constant(schemes.IBUG68.flip_permutation, tf.int32)

  def one(k):
    p = augment.sample_params(cfg, k, tf.constant(pts), tf.constant(box), perm)
    return p["matrix"], face_cache.affine_transform(p["matrix"])

  ds = tf.data.Dataset.from_tensor_slices(tf.constant(keys, tf.int64)).map(one)
  return next(iter(ds.batch(len(keys))))


@pytest.mark.parametrize("ranges", [GEOMETRY_ON, EXTREME], ids=["defaults", "extreme"])
def test_a_crop_reads_only_inside_its_face_region(ranges):
  """Every pixel any crop reads (the bilinear neighbours of the preimages of the crop's
  corners: an affine map's extremes) lies in face_cache.regions, over 3000 draws with
  every geometric augmentation on (photo large enough that the region is a cut)."""
  from data_pipelines import face_cache
  img, pts, box = _dot_image()
  hw, at = (6000, 6000), np.float32(2900.0)
  pts, box = pts + at, box + at
  cfg = config_lib.DataConfig(**{**OFF, **ranges})
  x0, y0, x1, y1 = face_cache.regions(cfg, pts[None], box[None], [hw])[0]
  assert 0 < x0 and 0 < y0 and x1 < hw[1] and y1 < hw[0]
  keys = np.stack([np.arange(3000), np.full(3000, 11)], -1)
  _, transform = _params(cfg, keys, pts, box)
  t = transform.numpy().astype(np.float64)
  c = np.array([[0, 0], [227, 0], [0, 227], [227, 227]], np.float64)
  xs = np.floor(t[:, None, 0] * c[:, 0] + t[:, None, 1] * c[:, 1] + t[:, None, 2])
  ys = np.floor(t[:, None, 3] * c[:, 0] + t[:, None, 4] * c[:, 1] + t[:, None, 5])
  assert xs.min() >= x0 and xs.max() + 1 <= x1 - 1
  assert ys.min() >= y0 and ys.max() + 1 <= y1 - 1
  # The bound is not loose by much: the draws reach most of the way to it.
  assert xs.min() - x0 < 0.3 * (x1 - x0) and ys.min() - y0 < 0.3 * (y1 - y0)


def test_the_warp_from_the_cached_region_is_the_warp_from_the_photo():
  """Cut region vs whole photo: bit for bit (the cut moves integer indices only); vs
  augment.warp (ImageProjectiveTransformV3 on the photo): within float rounding: XLA
  fuses the coordinates' multiply-adds, a last-bit difference (1.2e-4 px at x ~ 1000)
  times this noise photo's gradients (up to 255 levels per px) is <= 0.03 grey levels."""
  from data_pipelines import face_cache
  png, photo, pts, box = _photo_with_small_face()
  cfg = config_lib.DataConfig(**{**OFF, **GEOMETRY_ON})
  cut = face_cache.build(cfg, [png], pts[None], box[None], 1 << 30)
  whole = face_cache.build(dataclasses.replace(cfg, shear_max=1.0), [png], pts[None],
                           box[None], 1 << 30)   # an unbounded reach: the whole photo
  np.testing.assert_array_equal(whole.region[0], [0, 0, photo.shape[1], photo.shape[0]])
  assert (cut.region[0, 2] - cut.region[0, 0]) < photo.shape[1] - 100
  r0, c0 = whole.cell[0]
  np.testing.assert_array_equal(whole.mosaic[r0:r0 + photo.shape[0], c0:c0 + photo.shape[1]],
                                photo)
  keys = np.stack([np.arange(48), np.full(48, 5)], -1)
  matrices, transform = _params(cfg, keys, pts, box)
  n = len(keys)

  def crops(cache):
    return face_cache.warp_batch(tf.constant(cache.mosaic),
                                 tf.constant(np.repeat(cache.cell, n, 0)),
                                 tf.constant(np.repeat(cache.region, n, 0)), transform).numpy()

  a, b = crops(cut), crops(whole)
  np.testing.assert_array_equal(a, b)
  ref = np.stack([augment.warp(tf.constant(photo), m).numpy() for m in matrices])
  np.testing.assert_allclose(a, ref, atol=0.05)
  assert (np.abs(a - ref) > 1e-3).mean() < 0.05   # mostly closer than that
  assert a.std() > 30 and (a == 0).mean() < 0.01   # photo content, not fill


def test_pack_gives_every_region_its_own_zero_border():
  from data_pipelines import face_cache
  rng = np.random.default_rng(3)
  sizes = rng.integers(1, 40, (60, 2))
  cell, (h, w) = face_cache.pack(sizes)
  used = np.zeros((h, w), int)
  for (r, c), (sh, sw) in zip(cell, sizes):
    assert r >= 1 and c >= 1 and r + sh + 1 <= h and c + sw + 1 <= w
    used[r - 1:r + sh + 1, c - 1:c + sw + 1] += 1
  assert used.max() == 1
