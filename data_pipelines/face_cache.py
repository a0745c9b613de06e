"""The training faces decoded once into memory, and the batched crop from that cache.

Why: per training sample the per-sample pipeline decodes a JPEG (~0.4 ms for a 300W
photo) and warps it with ImageProjectiveTransformV3, ~1.2-1.5 ms per 228x228x3 crop on
the 2-core development CPU (the kernel recomputes the coordinates for every channel);
colour, greyscale and standardisation per sample cost as much again: ~530 samples/s.

The cache (`build`, once per training dataset, ~2 s for 300W). Each face's photo is
decoded once (THE decoder, `augment.decode`) and cut to the face's REGION (`regions`):
the pixels that any training crop of that face can read given the augmentation ranges of
the config (the box or perturbed landmark box, shifted, and the largest stretch of
rotation, shear and scale bound how far from the face a crop pixel can map; `crop_reach`),
at the photo's own resolution (no resampling), clipped to the photo. The regions are
packed (`pack`), each with its own 1-px zero border, into one uint8 mosaic [H, W, 3]
whose layout comes from the photos' headers, so the photos are decoded straight into it
and TF shares its buffer (`as_tensor`). 300W here: photos <= 322 px around faces <= 160
px, so every region is the whole photo: 479 MB for the 1,810 train_fit faces. A mosaic
over `DataConfig.train_cache_mb` is not built (`build` returns None) and the pipeline
decodes per sample as before.

The crop (`render_batch`, per batch). The photo position of each output pixel of each
crop comes from the sample's affine with ImageProjectiveTransformV3's float32 arithmetic
(`warp_batch`, one XLA program for the batch); one gather reads the 2x2 neighbourhood
from the mosaic and the op's bilinear weights blend it; a neighbour outside the photo
reads 0 (the op's constant fill: the zero border). The cut only moves integer indices,
so the crop from a cut region is the crop from the whole photo bit for bit; it equals
`augment.warp`'s up to the last bit of the coordinates (XLA fuses their multiply-adds):
~3e-5 grey levels on 300W, <= 0.03 on a noise photo with x ~ 1000. Then blur and low
resolution (`augment.degrade`, the per-sample path's function, on the drawn samples only,
written into the crop's buffer), colour, occlusion and greyscale with each sample's draws
(`augment.sample_params`, the draws of the per-sample path) and the per-image
standardisation, vectorised over the batch.
~2,000-2,400 samples/s on the development CPU (experiments.pipeline_benchmark; ~110 ms
of CPU per batch of 128: the warp ~50 (its gather ~45), the photometric passes ~40, the
per-sample draws and tf.data ~20). With --lowres_prob=0.3 --blur_prob=0.2, ~40 ms more
(~0.5 ms per low-resolution sample, ~0.9 per blurred one): ~1,600 samples/s.
"""
from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from data_pipelines.tf_setup import tf
from tensorflow.compiler.tf2xla.python import xla as tf2xla
try:
  from tensorflow.compiler.xla import xla_data_pb2
except ImportError:  # TF builds that ship XLA's protos under local_xla
  from local_xla.xla import xla_data_pb2  # type: ignore

from data_pipelines import augment
from data_pipelines import config as config_lib
from musica_jax import face_frame

CROP = face_frame.CROP_SIZE
# Image pixels kept beyond the bound of `regions`: the bilinear neighbour (+1) and float32
# rounding of the sampled matrices (far below 1 px).
_MARGIN = 2


@dataclasses.dataclass
class FaceCache:
  """Decoded face regions of one split, in the split's face order."""
  mosaic: np.ndarray     # uint8 [H, W, 3]: every region with a 1-px zero border
  cell: np.ndarray       # int32 [M, 2] (row, col) of each region's pixel (0, 0) in mosaic
  region: np.ndarray     # int32 [M, 4] (x0, y0, x1, y1): the photo pixels [x0, x1) x [y0, y1)

  @property
  def nbytes(self) -> int:
    return int(self.mosaic.nbytes)


def crop_reach(cfg: config_lib.DataConfig) -> float:
  """Bound on |A^-1 (q - c)| over the crop pixels q (c the crop centre) and every linear
  augmentation A = flip * rotation * shear * axis scale the config can draw: how far from
  the centre of the base (box) crop, in its pixels, an augmented crop can read. inf when
  unbounded (shear_max >= 1 can make A singular)."""
  reach = (CROP - 1) / 2.0 * math.sqrt(2.0)        # crop centre -> corner
  if not cfg.augment:
    return reach
  if cfg.scale_prob > 0:                            # one axis scaled by s: |S^-1| = max(1, 1/s)
    reach *= max(1.0, 1.0 / cfg.scale_min)
  if cfg.shear_prob > 0 and cfg.shear_max > 0:      # |[[1, a], [b, 1]]^-1| <= 1 / (1 - |a|v|b|)
    if cfg.shear_max >= 1:
      return math.inf
    reach /= 1.0 - cfg.shear_max
  return reach                                      # rotation and flip keep lengths


def regions(cfg: config_lib.DataConfig, landmarks, boxes, image_hw) -> np.ndarray:
  """int64 [M, 4] (x0, y0, x1, y1): per face, the photo pixels [x0, x1) x [y0, y1) that a
  training crop of it can read (bilinear neighbours included), clipped to the photo
  (image_hw [M, 2] height, width). The crop is the base crop of the dataset box or (box
  augmentation) of the landmark box scaled and shifted, then the linear augmentation about
  its centre (augment.sample_geometry); a base crop of box side L maps crop pixels to image
  pixels by L / BOX_SIZE, so a crop reads within crop_reach * L / BOX_SIZE of the box centre."""
  landmarks = np.asarray(landmarks, np.float64)
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  hw = np.asarray(image_hw, np.int64).reshape(-1, 2)
  whole = np.concatenate([np.zeros_like(hw), hw[:, ::-1]], 1)
  reach = crop_reach(cfg)
  if not math.isfinite(reach):
    return whole
  size = boxes[:, 2:] - boxes[:, :2]
  radius = (reach * size.max(1) / face_frame.BOX_SIZE)[:, None]
  centre = (boxes[:, :2] + boxes[:, 2:]) / 2.0
  lo, hi = centre - radius, centre + radius
  if cfg.augment and cfg.box_prob > 0:
    lb = np.concatenate([landmarks.min(1), landmarks.max(1)], 1)
    lsize = lb[:, 2:] - lb[:, :2]
    longer = np.maximum(lsize[:, 0] * cfg.box_scale_x_max, lsize[:, 1] * cfg.box_scale_y_max)
    r = (reach * longer / face_frame.BOX_SIZE)[:, None] + cfg.box_shift_max * lsize
    lcentre = (lb[:, :2] + lb[:, 2:]) / 2.0
    lo, hi = np.minimum(lo, lcentre - r), np.maximum(hi, lcentre + r)
  if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
    return whole
  big = float(np.iinfo(np.int32).max // 4)
  lo = np.floor(np.clip(lo, -big, big)).astype(np.int64) - _MARGIN
  hi = np.floor(np.clip(hi, -big, big)).astype(np.int64) + 2 + _MARGIN
  wh = hw[:, ::-1]
  lo, hi = np.clip(lo, 0, wh), np.clip(hi, 0, wh)
  hi = np.maximum(hi, lo)
  return np.concatenate([lo, hi], 1)


def pack(sizes) -> tuple[np.ndarray, tuple[int, int]]:
  """Shelf packing of regions sizes [M, 2] (height, width), each in a cell with a 1-px
  border: (cell [M, 2] (row, col) of each region's pixel (0, 0), mosaic (height, width))."""
  sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
  ch, cw = sizes[:, 0] + 2, sizes[:, 1] + 2
  width = int(max(cw.max(initial=3), math.ceil(math.sqrt(float((ch * cw).sum())))))
  cell = np.zeros((len(sizes), 2), np.int64)
  x = y = shelf = 0
  for i in np.argsort(-ch, kind="stable"):
    if x + cw[i] > width:
      y, x, shelf = y + shelf, 0, 0
    cell[i] = (y + 1, x + 1)
    x += cw[i]
    shelf = max(shelf, ch[i])
  return cell, (int(max(y + shelf, 3)), width)


def build(cfg: config_lib.DataConfig, images, landmarks, boxes,
          budget_bytes: int) -> FaceCache | None:
  """Decodes every photo (encoded bytes [M]) once into the cache of its face's region.
  None when the mosaic would take more than budget_bytes, or a photo's size cannot be read
  from its header (the pipeline then decodes per sample, which reports bad files).
  Memory: the mosaic and the photos being decoded (the sizes come from the headers, so
  the mosaic is laid out before the first decode)."""
  images = np.asarray(images, dtype=object)
  if budget_bytes <= 0 or not len(images):
    return None
  hw = _photo_sizes(images)
  if hw is None:
    return None
  region = regions(cfg, landmarks, boxes, hw)
  size = (region[:, 2:] - region[:, :2])[:, ::-1]            # (height, width)
  cell, shape = pack(size)
  if shape[0] * shape[1] * 3 > budget_bytes:
    return None
  mosaic = _aligned_zeros((*shape, 3))
  ds = tf.data.Dataset.from_tensor_slices(tf.constant(images, tf.string))
  ds = ds.map(augment.decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  opts = tf.data.Options()
  opts.deterministic = True
  for i, photo in enumerate(ds.with_options(opts).as_numpy_iterator()):
    if tuple(photo.shape[:2]) != tuple(hw[i]):   # header and decoder disagree: no cache
      return None
    (x0, y0, x1, y1), (r, c) = region[i], cell[i]
    mosaic[r:r + y1 - y0, c:c + x1 - x0] = photo[y0:y1, x0:x1]
  return FaceCache(mosaic=mosaic, cell=cell.astype(np.int32), region=region.astype(np.int32))


def _photo_sizes(images) -> np.ndarray | None:
  """int64 [M, 2] (height, width) of encoded photos from their headers (PIL reads only
  the header); None if one cannot be read."""
  from PIL import Image  # noqa: PLC0415
  out = np.zeros((len(images), 2), np.int64)
  try:
    for i, data in enumerate(images):
      with Image.open(io.BytesIO(data)) as im:
        out[i] = im.size[::-1]
  except Exception:  # noqa: BLE001  (PIL raises many kinds)
    return None
  return out


def _aligned_zeros(shape, align: int = 64) -> np.ndarray:
  """uint8 zeros whose buffer starts on an `align`-byte boundary (TF's CPU tensors need
  it to share the buffer, `as_tensor`)."""
  n = int(np.prod(shape))
  buf = np.zeros(n + align, np.uint8)
  start = (-buf.ctypes.data) % align
  return buf[start:start + n].reshape(shape)


def as_tensor(mosaic: np.ndarray) -> tf.Tensor:
  """The mosaic as a TF tensor sharing its buffer when it is aligned and contiguous (no
  second copy of a cache of hundreds of MB); else a copy."""
  if mosaic.flags["C_CONTIGUOUS"] and mosaic.ctypes.data % 64 == 0:
    try:
      return tf.experimental.dlpack.from_dlpack(mosaic.__dlpack__())
    except Exception:  # noqa: BLE001  (an older TF without numpy's dlpack)
      pass
  return tf.constant(mosaic)


def affine_transform(matrix):
  """Image -> crop matrix [..., 3, 3] -> ImageProjectiveTransformV3's crop -> image
  transform, its first 6 entries [..., 6] (augment.warp's computation; the last row of an
  affine's inverse is exactly (0, 0, 1))."""
  inv = tf.linalg.inv(matrix)
  inv = inv / inv[..., 2:, 2:]
  return tf.reshape(inv, tf.concat([tf.shape(inv)[:-2], [9]], 0))[..., :6]


_WINDOW = xla_data_pb2.GatherDimensionNumbers(offset_dims=[3, 4, 5], start_index_map=[0, 1],
                                              index_vector_dim=3)


@tf.function(jit_compile=True)
def warp_batch(mosaic, cell, region, transform):
  """Bilinear crops [B, 228, 228, 3] float32 of cached regions: mosaic uint8 [H, W, 3],
  cell int32 [B, 2], region int32 [B, 4] (FaceCache rows), transform float32 [B, 6] (crop
  -> photo affine, `affine_transform`). ImageProjectiveTransformV3's arithmetic (bilinear,
  constant fill 0)."""
  grid = tf.range(CROP, dtype=tf.float32)
  ox, oy = grid[None, None, :], grid[None, :, None]
  t = transform[:, :, None, None]
  x = t[:, 0] * ox + t[:, 1] * oy + t[:, 2]        # photo coordinates of each output pixel
  y = t[:, 3] * ox + t[:, 4] * oy + t[:, 5]
  xf, yf = tf.floor(x), tf.floor(y)
  r = tf.cast(region, tf.float32)[:, :, None, None]
  x0, y0, x1, y1 = r[:, 0], r[:, 1], r[:, 2], r[:, 3]
  # Some neighbour inside the region (else both taps of an axis read the fill, 0).
  inside = (xf >= x0 - 1) & (xf <= x1 - 1) & (yf >= y0 - 1) & (yf <= y1 - 1)
  col = tf.cast(tf.where(inside, xf - x0, 0.0), tf.int32) + cell[:, 1, None, None]
  row = tf.cast(tf.where(inside, yf - y0, 0.0), tf.int32) + cell[:, 0, None, None]
  win = tf.cast(tf2xla.gather(mosaic, tf.stack([row, col], -1), _WINDOW, [2, 2, 3], False),
                tf.float32)                        # [B, C, C, 2, 2, 3]
  wl, wr = ((xf + 1.0) - x)[..., None], (x - xf)[..., None]
  top = wl * win[:, :, :, 0, 0] + wr * win[:, :, :, 0, 1]
  bottom = wl * win[:, :, :, 1, 0] + wr * win[:, :, :, 1, 1]
  value = ((yf + 1.0) - y)[..., None] * top + (y - yf)[..., None] * bottom
  return tf.where(inside[..., None], value, 0.0)


def render_batch(cfg: config_lib.DataConfig, mosaic, batch: dict):
  """The standardised training crops [B, 228, 228, 3] of a batch of sample parameters
  (`augment.sample_params` fields plus the cache's "cell", "region", "transform" and, with
  occlusion, "occlusion_noise" [B, 228, 228, 3]): the per-sample ops of
  augment.augment_example then augment.standardise, on the whole batch.

  Five passes over the batch (measured the fastest split on the development CPU, where
  XLA:CPU fuses elementwise work well but reduces 2-3x slower than TensorFlow's kernels):
  the warp (XLA), the colour range per channel (TF), colour / occlusion / greyscale (XLA),
  the sums for the mean and variance (TF), the standardisation (XLA); between the warp and
  the colour range, augment.degrade on the samples drawn for blur or low resolution (TF
  kernels on those samples only)."""
  crop = warp_batch(mosaic, batch["cell"], batch["region"], batch["transform"])
  # Blur / low resolution of the drawn samples, written into the crop's buffer (the crop
  # is this function's own: nothing else reads it).
  crop = augment.degrade(cfg, crop, batch, in_place=True)
  b = tf.shape(crop)[0]
  colour, fr = batch["colour"], batch["colour_fractions"]
  # Colour "jetting" (augment._stretch) per sample and channel; the other samples pass
  # through exactly ((crop - 0) / 1 clipped to [0, inf) times 1: the crop is >= 0).
  if cfg.augment and cfg.color_prob > 0:
    lo_v, hi_v = _channel_min_max(crop)
    rng = tf.maximum(hi_v - lo_v, 1e-3)
    lo = lo_v + fr[:, 0] * rng
    hi = hi_v - fr[:, 1] * rng
    den = tf.maximum(hi - lo, 1e-3)
  else:
    lo, den = tf.zeros([b, 3]), tf.ones([b, 3])
  c = colour[:, None]
  args = [crop, tf.where(c, lo, 0.0), tf.where(c, den, 1.0), colour, batch["greyscale"]]
  if cfg.augment and cfg.occlusion_prob > 0:
    args += [batch["occlusion"], batch["occlusion_rect"], batch["occlusion_noise"]]
  image = _colour_occlude_grey(*args)          # minus _CENTRE (see _standardise)
  flat = tf.reshape(image, [b, -1, _LANES])
  total = tf.reduce_sum(tf.reduce_sum(flat, 1), 1)
  squares = tf.reduce_sum(tf.square(tf.math.reduce_euclidean_norm(flat, 1)), 1)
  return _standardise(image, total, squares)


_PIXELS = CROP * CROP * 3
_LANES = 144                 # divides _PIXELS: reductions run down [B, _PIXELS / 144, 144]
_CENTRE = 128.0              # the sums are of image - 128: no cancellation in E[x^2] - E[x]^2


def _channel_min_max(crop):
  """Per image and channel min and max [B, 3] (reduce_min/max over axes 1, 2), reduced
  down the columns of [B, H * W / 16, 48] first (several times faster here)."""
  b = tf.shape(crop)[0]
  cols = tf.reshape(crop, [b, -1, 48])
  lo = tf.reduce_min(tf.reshape(tf.reduce_min(cols, 1), [b, 16, 3]), 1)
  hi = tf.reduce_max(tf.reshape(tf.reduce_max(cols, 1), [b, 16, 3]), 1)
  return lo, hi


@tf.function(jit_compile=True)
def _colour_occlude_grey(crop, lo, den, colour, grey, occlusion=None, rect=None, noise=None):
  """augment_example's photometric steps for a batch (colour with its range lo, den [B, 3]
  where `colour`, occlusion, greyscale), minus _CENTRE."""
  top = tf.where(colour, 1.0, np.inf)[:, None, None, None]
  mul = tf.where(colour, 255.0, 1.0)[:, None, None, None]
  image = tf.clip_by_value((crop - lo[:, None, None, :]) / den[:, None, None, :], 0.0,
                           top) * mul
  if occlusion is not None:
    mask = occlusion[:, None, None] & augment.occlusion_mask(rect)
    image = tf.where(mask[..., None], noise, image)
  image = tf.where(grey[:, None, None, None], augment.greyscale(image), image)
  return image - _CENTRE


@tf.function(jit_compile=True)
def _standardise(image, total, squares):
  """augment.standardise (per_image_standardization) of image + _CENTRE, from the sums of
  image and image**2 per sample."""
  mean = total / _PIXELS
  var = tf.maximum(squares / _PIXELS - mean * mean, 0.0)
  std = tf.maximum(tf.sqrt(var), 1.0 / math.sqrt(_PIXELS))
  return (image - mean[:, None, None, None]) / std[:, None, None, None]
