"""THE crop (musica_jax.crop): host part + device blend equal a per-pixel bilinear reference
with zero fill, for boxes inside, across the border, tiny and huge; standardisation; the
static source sides; the crop inside the cascade's program equals crop-then-cascade."""
import jax.numpy as jnp
import numpy as np
import pytest

from musica_jax import crop
from musica_jax import face_frame


def _naive_crop(image, scale, offset, size):
  """Per pixel bilinear with constant-0 fill, float64 (the reference)."""
  h, w, _ = image.shape
  out = np.zeros((size, size, 3), np.float64)
  img = image.astype(np.float64)

  def px(y, x):
    return img[y, x] if 0 <= y < h and 0 <= x < w else np.zeros(3)
  for yo in range(size):
    for xo in range(size):
      x = (xo - offset[0]) / scale
      y = (yo - offset[1]) / scale
      x0, y0 = int(np.floor(x)), int(np.floor(y))
      ax, ay = x - x0, y - y0
      out[yo, xo] = ((1 - ay) * ((1 - ax) * px(y0, x0) + ax * px(y0, x0 + 1))
                     + ay * ((1 - ax) * px(y0 + 1, x0) + ax * px(y0 + 1, x0 + 1)))
  return out


def _raw_crops(photos, index, scale, offset, size, side=None):
  """Crops before standardisation (the device blend alone), numpy."""
  src = crop.prepare(photos, np.asarray(index), np.asarray(scale, np.float32),
                     np.asarray(offset, np.float32), size, side)
  import jax
  got = jax.vmap(crop._crop_one)(*(jnp.asarray(a) for a in src.arrays()))
  return np.asarray(got), src


# (scale, offset): inside; over the top-left corner (reads the zero fill); a tiny face
# blown up 4x; a huge face (photo span wider than the compact source: gathered rows and
# columns); a crop that sticks out on every side.
CASES = [(0.7, (-3.2, -5.9)), (1.9, (20.3, 31.6)), (4.0, (-60.0, -90.0)),
         (0.11, (1.5, 2.5)), (0.35, (8.0, 5.0))]


@pytest.mark.parametrize("scale,offset", CASES)
def test_crop_matches_naive_bilinear_with_zero_fill(scale, offset):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (207, 251, 3), dtype=np.uint8)
  size = 24
  got, _ = _raw_crops([image], [0], [scale], [offset], size)
  # The map is evaluated in float32 (as TensorFlow does): at a 9x downscale the photo
  # coordinates reach ~200 px and their rounding moves a blend by up to ~3e-3 grey levels.
  np.testing.assert_allclose(got[0], _naive_crop(image, scale, np.asarray(offset), size),
                             atol=5e-3)


def test_float_photos_and_mixed_batches():
  """Float photos (0..255) crop like their uint8 values; faces of photos of different
  sizes share one batch."""
  rng = np.random.default_rng(1)
  a = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
  b = rng.integers(0, 256, (90, 31, 3), dtype=np.uint8)
  scale, offset = [0.9, 0.5, 1.3], [(1.0, 2.0), (3.0, -4.0), (-7.0, 0.5)]
  got, src = _raw_crops([a, b], [0, 1, 0], scale, offset, 16)
  assert src.src.dtype == np.uint8
  got_f, src_f = _raw_crops([a.astype(np.float32), b], [0, 1, 0], scale, offset, 16)
  assert src_f.src.dtype == np.float32
  np.testing.assert_allclose(got_f, got, atol=1e-4)
  for k, (photo, s, o) in enumerate(zip([a, b, a], scale, offset)):
    np.testing.assert_allclose(got[k], _naive_crop(photo, s, np.asarray(o), 16), atol=2e-3)


def test_source_side_is_one_of_two_static_sizes():
  compact, full = crop.source_sides(228)
  assert (compact, full) == (288, 456)
  rng = np.random.default_rng(2)
  photo = rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)
  box_small = np.array([[300.0, 300.0, 440.0, 450.0]])     # fits the compact source
  box_large = np.array([[100.0, 100.0, 600.0, 650.0]])     # 3.9x downscale: does not
  for boxes, side in ((box_small, compact), (box_large, full),
                      (np.concatenate([box_small, box_large]), full)):
    scale, offset = face_frame.crop_frames(boxes)
    src = crop.prepare([photo], np.zeros(len(boxes), np.int32), scale, offset, 228)
    assert src.src.shape == (len(boxes), side, side, 3)
    got = np.asarray(crop.crops(src))
    assert got.shape == (len(boxes), 228, 228, 3) and np.all(np.isfinite(got))


def test_large_face_crop_matches_reference_at_full_size():
  """A face larger than the compact source (gathered rows and columns) at the model's
  crop size, against the reference at a few pixels."""
  rng = np.random.default_rng(3)
  photo = rng.integers(0, 256, (640, 560, 3), dtype=np.uint8)
  scale, offset = face_frame.crop_frames(np.array([[40.0, 30.0, 540.0, 610.0]]))
  got, src = _raw_crops([photo], [0], scale, offset, 228)
  assert src.src.shape[1] == 456
  ref = _naive_crop(photo, float(scale[0]), offset[0].astype(np.float64), 228)
  # float32 coordinates up to ~600 px (as TensorFlow): up to ~0.01 grey levels.
  np.testing.assert_allclose(got[0], ref, atol=2e-2)


def test_padding_faces_are_blank_and_crops_standardised():
  rng = np.random.default_rng(4)
  photo = rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)
  scale, offset = face_frame.crop_frames(np.array([[10.0, 10.0, 50.0, 50.0]]))
  src = crop.pad(crop.prepare([photo], np.zeros(1, np.int32), scale, offset, 32), 4)
  got = np.asarray(crop.crops(src))
  assert got.shape == (4, 32, 32, 3)
  assert np.all(got[1:] == 0)
  np.testing.assert_allclose(got[0].mean(), 0.0, atol=1e-4)
  np.testing.assert_allclose(got[0].std(), 1.0, atol=1e-3)


def test_standardise_matches_definition():
  x = np.random.default_rng(1).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
  got = np.asarray(crop.standardise(jnp.asarray(x)))
  np.testing.assert_allclose(crop.standardise(x), got, atol=1e-5)   # numpy path
  ref = (x - x.mean((1, 2, 3), keepdims=True)) / x.std((1, 2, 3), keepdims=True)
  np.testing.assert_allclose(got, ref, atol=1e-4)
  const = np.asarray(crop.standardise(jnp.full((1, 4, 4, 3), 7.0)))
  assert np.all(np.isfinite(const)) and np.all(const == 0)


def test_empty_batch():
  src = crop.prepare([], np.zeros(0, np.int32), np.zeros(0, np.float32),
                     np.zeros((0, 2), np.float32), 16)
  assert len(src) == 0 and crop.crops(src).shape == (0, 16, 16, 3)
