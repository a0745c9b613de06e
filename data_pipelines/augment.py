"""Face crop and augmentation as TensorFlow ops (host side, inside tf.data).

All geometry (face box -> crop, box perturbation, non-uniform scaling, shear, rotation,
flip) is composed into ONE 3x3 affine matrix from image to crop coordinates; the pixels
are warped once with it (bilinear) and the landmarks are multiplied by the same matrix,
so they cannot drift apart. Coordinates: pixel centres at integers (face_frame), which is
also what `ImageProjectiveTransformV3` uses.

Randomness is stateless: every draw comes from `key` (a [2] int64 seed) folded with a
fixed id per draw, so an example's augmentation is a pure function of its key.

Photometric order, the same in both training paths (`augment_example` per sample,
face_cache.render_batch per batch): warp -> image quality (`degrade`: blur, then low
resolution; the camera's view of the face) -> colour -> occlusion -> greyscale ->
standardise (the caller's).
"""
from __future__ import annotations

import math

from data_pipelines.tf_setup import tf
import tensorflow.experimental.numpy as tnp

from data_pipelines import config as config_lib
from musica_jax import face_frame

CROP = face_frame.CROP_SIZE
_CENTRE = (CROP - 1) / 2.0

# Draw ids (fold-in constants) so adding a draw never changes the others.
_ROT, _ROT_P, _SHEAR, _SHEAR_P, _SCALE, _SCALE_AX, _SCALE_P = range(1, 8)
_FLIP_P, _BOX_S, _BOX_T, _BOX_P, _COLOR, _COLOR_P, _GREY_P, _OCC, _OCC_P = range(8, 17)
_LOWRES_P, _LOWRES, _BLUR_P, _BLUR = range(17, 21)
# sample_params' draws of `degrade`.
DEGRADE_KEYS = ("blur", "blur_sigma", "lowres", "lowres_size")


def decode(image_bytes):
  """Encoded photo -> uint8 [H, W, 3]. JPEGs with the accurate integer DCT: bit-identical to
  PIL (the predictor's decoder), so a model sees the same pixels in training and in
  deployment. TF's default (INTEGER_FAST) differs from PIL by up to 8 grey levels."""
  image = tf.cond(
      tf.io.is_jpeg(image_bytes),
      lambda: tf.io.decode_jpeg(image_bytes, channels=3, dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_image(image_bytes, channels=3, expand_animations=False))
  image.set_shape([None, None, 3])
  return image


def _uniform(key, draw, shape=(), lo=0.0, hi=1.0):
  seed = tf.random.experimental.stateless_fold_in(key, draw)
  return tf.random.stateless_uniform(shape, seed=seed, minval=lo, maxval=hi, dtype=tf.float32)


def _coin(key, draw, prob):
  return _uniform(key, draw) < prob


def crop_matrix(box):
  """Image -> crop affine (3x3) for a face box [4]: face_frame.crop_transform in float32."""
  scale, offset = face_frame.crop_transform(tf.cast(box, tf.float32), xp=tnp)
  return tf.stack([[scale, 0.0, offset[0]], [0.0, scale, offset[1]], [0.0, 0.0, 1.0]])


def _about_centre(m2):
  """A 2x2 linear map applied about the crop centre, as 3x3."""
  c = tf.constant(_CENTRE, tf.float32)
  t = tf.stack([c - m2[0, 0] * c - m2[0, 1] * c, c - m2[1, 0] * c - m2[1, 1] * c])
  return tf.concat([tf.concat([m2, t[:, None]], 1), [[0.0, 0.0, 1.0]]], 0)


def sample_geometry(cfg: config_lib.DataConfig, key, box, landmark_box):
  """Returns (image->crop 3x3 matrix, flip bool) for one training example."""
  # Bounding-box perturbation: the landmark box scaled U(1, sx) x U(1, sy) and shifted up to
  # box_shift_max of its size (reference notes); otherwise the dataset's face box.
  lb = tf.cast(landmark_box, tf.float32)
  size = lb[2:] - lb[:2]
  scales = 1.0 + _uniform(key, _BOX_S, [2]) * tf.constant(
      [cfg.box_scale_x_max - 1.0, cfg.box_scale_y_max - 1.0], tf.float32)
  shift = _uniform(key, _BOX_T, [2], -cfg.box_shift_max, cfg.box_shift_max) * size
  centre = (lb[:2] + lb[2:]) / 2.0 + shift
  half = size * scales / 2.0
  perturbed = tf.concat([centre - half, centre + half], 0)
  use_box = _coin(key, _BOX_P, cfg.box_prob)
  base = crop_matrix(tf.where(use_box, perturbed, tf.cast(box, tf.float32)))

  # Linear part about the crop centre: flip * rotation * shear * axis scale.
  theta = tf.where(_coin(key, _ROT_P, cfg.rotation_prob),
                   _uniform(key, _ROT, (), -cfg.rotation_max_deg, cfg.rotation_max_deg),
                   0.0) * (math.pi / 180.0)
  rot = tf.stack([[tf.cos(theta), -tf.sin(theta)], [tf.sin(theta), tf.cos(theta)]])
  sh = tf.where(_coin(key, _SHEAR_P, cfg.shear_prob),
                _uniform(key, _SHEAR, [2], -cfg.shear_max, cfg.shear_max), 0.0)
  shear = tf.stack([[1.0, sh[0]], [sh[1], 1.0]])
  s = tf.where(_coin(key, _SCALE_P, cfg.scale_prob),
               _uniform(key, _SCALE, (), cfg.scale_min, cfg.scale_max), 1.0)
  x_axis = _uniform(key, _SCALE_AX) < 0.5
  scale = tf.linalg.diag(tf.where(x_axis, tf.stack([s, 1.0]), tf.stack([1.0, s])))
  flip = _coin(key, _FLIP_P, cfg.flip_prob)
  mirror = tf.linalg.diag(tf.stack([tf.where(flip, -1.0, 1.0), 1.0]))
  linear = mirror @ rot @ shear @ scale
  return _about_centre(linear) @ base, flip


def transform_points(matrix, points):
  """points [N, 2] -> matrix applied (affine)."""
  return points @ tf.transpose(matrix[:2, :2]) + matrix[:2, 2]


def warp(image, matrix, out_size: int = CROP):
  """Bilinear warp of image [H, W, C] (any dtype) into [out, out, C] float32.

  `matrix` maps image -> output coordinates; the op wants output -> input.
  """
  inv = tf.linalg.inv(matrix)
  inv = inv / inv[2, 2]
  transform = tf.reshape(inv, [9])[:8][None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(image, tf.float32)[None], transforms=transform,
      output_shape=tf.constant([out_size, out_size], tf.int32),
      fill_value=tf.constant(0.0, tf.float32), interpolation="BILINEAR", fill_mode="CONSTANT")
  return out[0]


def _stretch(image, fractions):
  """The colour "jetting" of `colour_jitter` with its fractions [2, 3] given."""
  lo_v = tf.reduce_min(image, axis=[0, 1])
  hi_v = tf.reduce_max(image, axis=[0, 1])
  rng = tf.maximum(hi_v - lo_v, 1e-3)
  lo = lo_v + fractions[0] * rng
  hi = hi_v - fractions[1] * rng
  return tf.clip_by_value((image - lo) / tf.maximum(hi - lo, 1e-3), 0.0, 1.0) * 255.0


def colour_jitter(key, image, clip_max):
  """Per-channel "jetting": clip a random part off both ends of each channel's range, then
  stretch back to [0, 255]."""
  return _stretch(image, _uniform(key, _COLOR, [2, 3], 0.0, clip_max))


def greyscale(image):
  g = 0.2989 * image[..., 0] + 0.587 * image[..., 1] + 0.114 * image[..., 2]
  return tf.stack([g, g, g], -1)


def _occlusion_rect(key, max_frac, size: int = CROP):
  """(x0, x1, y0, y1) float32 of the occlusion rectangle in a size x size crop."""
  u = _uniform(key, _OCC, [5])
  size = tf.constant(float(size), tf.float32)
  w, h = u[0] * max_frac * size, u[1] * max_frac * size
  x0, y0 = u[2] * (size - w), u[3] * (size - h)
  return tf.stack([x0, x0 + w, y0, y0 + h])


def occlusion_noise(key, shape):
  """The occlusion's uniform noise in [0, 255) of `shape`, drawn from key."""
  return tf.random.stateless_uniform(
      shape, seed=tf.random.experimental.stateless_fold_in(key, _OCC + 100), maxval=255.0)


def occlusion_mask(rect, size: int = CROP):
  """bool [size, size]: the pixels inside rect (x0, x1, y0, y1); rect [..., 4] gives
  [..., size, size]."""
  xs = tf.range(float(size))
  r = rect[..., None, None, :]
  return ((xs[None, :] >= r[..., 0]) & (xs[None, :] < r[..., 1])
          & (xs[:, None] >= r[..., 2]) & (xs[:, None] < r[..., 3]))


def occlude(key, image, max_frac):
  """A rectangle of uniform noise, sides up to max_frac of the crop, anywhere."""
  inside = occlusion_mask(_occlusion_rect(key, max_frac, image.shape[0]), image.shape[0])
  return tf.where(inside[..., None], occlusion_noise(key, tf.shape(image)), image)


def blur_radius(cfg: config_lib.DataConfig) -> int:
  """The Gaussian's half-width in px: 3 x the largest sigma the config draws."""
  return int(math.ceil(3.0 * cfg.blur_max_sigma))


def lowres_size(face_px):
  """The side (int32) of the low-resolution crop in which the face box (BOX_SIZE crop px)
  is face_px px: round(228 x face_px / 142), at least 1."""
  n = tf.round(CROP * tf.cast(face_px, tf.float32) / face_frame.BOX_SIZE)
  return tf.cast(tf.clip_by_value(n, 1.0, float(CROP)), tf.int32)


def gaussian_blur(images, sigma, radius: int):
  """images float32 [K, H, W, C] each blurred by its axis-aligned Gaussian, sigma float32
  [K, 2] (y, x) px: taps on [-radius, radius] normalised to sum 1, borders mirrored
  (SYMMETRIC), so a constant image stays constant and the mean brightness stays. One
  separable depthwise convolution for all K images (their channels side by side)."""
  _, h, w, c = images.shape
  k, t = tf.shape(images)[0], 2 * radius + 1
  offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
  taps = tf.exp(-0.5 * tf.square(offsets / tf.maximum(sigma, 1e-3)[..., None]))
  taps = taps / tf.reduce_sum(taps, -1, keepdims=True)                   # [K, 2, T]
  per_channel = tf.repeat(tf.transpose(taps, [1, 2, 0]), c, axis=2)      # [2, T, K * C]
  x = tf.pad(images, [[0, 0], [radius, radius], [radius, radius], [0, 0]], "SYMMETRIC")
  x = tf.reshape(tf.transpose(x, [1, 2, 0, 3]), [1, h + 2 * radius, w + 2 * radius, k * c])
  x = tf.nn.depthwise_conv2d(x, tf.reshape(per_channel[0], [t, 1, k * c, 1]),
                             [1, 1, 1, 1], "VALID")
  x = tf.nn.depthwise_conv2d(x, tf.reshape(per_channel[1], [1, t, k * c, 1]),
                             [1, 1, 1, 1], "VALID")
  return tf.transpose(tf.reshape(x, [h, w, k, c]), [2, 0, 1, 3])


def lowres(image, size):
  """image float32 [H, W, C] area-averaged down to [size, size] (each low-resolution pixel
  the mean of the crop area it covers, as a camera's pixel integrates its area) and
  bilinearly back up to [H, W] (half-pixel centres, as tf.image.resize and PIL)."""
  h, w = image.shape[0], image.shape[1]
  small = tf.image.resize(image, tf.stack([size, size]), method="area")
  return tf.image.resize(small, [h, w], method="bilinear")


def _on_drawn(images, drawn, fn, arg, in_place: bool):
  """images [B, ...] with images[i] := fn(images[i], arg[i]) (batched over the drawn i)
  where `drawn` [B]; the others pass bit for bit and cost nothing. in_place: written into
  images' own buffer (InplaceUpdate, no copy of the batch), for a caller whose `images`
  has no other reader; else a new tensor (tensor_scatter_nd_update)."""
  idx = tf.where(drawn)[:, 0]
  sub = tf.gather(images, idx)
  sub = tf.cond(tf.size(idx) > 0, lambda: fn(sub, tf.gather(arg, idx)), lambda: sub)
  if in_place:   # runs after the gather, which it depends on: it reads the old pixels
    return tf.raw_ops.InplaceUpdate(x=images, i=tf.cast(idx, tf.int32), v=sub)
  return tf.tensor_scatter_nd_update(images, idx[:, None], sub)


def degrade(cfg: config_lib.DataConfig, images, params, in_place: bool = False):
  """The image-quality augmentation of a batch of crops (images float32 [B, H, W, C], in
  0..255; params: sample_params' DEGRADE_KEYS stacked [B, ...]): the samples drawn for blur
  get `gaussian_blur`, then those drawn for low resolution get `lowres` (a camera blurs,
  then samples). Only drawn samples are computed. Both training paths call it (the
  per-sample path with a batch of one), so they compute the same from the same draws.
  in_place=True writes into images' buffer: only for a tensor nothing else reads."""
  if not cfg.augment:
    return images
  if cfg.blur_prob > 0:
    radius = blur_radius(cfg)
    images = _on_drawn(images, params["blur"], lambda x, s: gaussian_blur(x, s, radius),
                       params["blur_sigma"], in_place)
  if cfg.lowres_prob > 0:
    spec = tf.TensorSpec(images.shape[1:], tf.float32)
    images = _on_drawn(images, params["lowres"],
                       lambda x, n: tf.map_fn(lambda a: lowres(*a), (x, n),
                                              fn_output_signature=spec),
                       params["lowres_size"], in_place)
  return images


def standardise(image):
  """Zero mean, unit std per image (as tf.image.per_image_standardization)."""
  return tf.image.per_image_standardization(image)


def sample_params(cfg: config_lib.DataConfig, key, landmarks, box, flip_perm) -> dict:
  """Everything random about one training example, drawn from `key` alone (the draws of
  `augment_example`, which applies them to one photo; the cached training pipeline
  applies them to a batch, face_cache.render_batch):
    "matrix"     float32 [3, 3] image -> crop affine (box, rotation, shear, scale, flip)
    "landmarks"  float32 [N, 2] crop pixels (flip: label shift and left/right permutation)
    "colour"     bool, "colour_fractions" float32 [2, 3] (colour_jitter's draws)
    "occlusion"  bool, "occlusion_rect" float32 [4] (x0, x1, y0, y1 crop px)
    "greyscale"  bool
    "blur"       bool, "blur_sigma" float32 [2] (y, x) crop px (`degrade`)
    "lowres"     bool, "lowres_size" int32: the side of the low-resolution crop (`degrade`)
  Without cfg.augment: the face box's crop, no photometric change. Occlusion, blur and
  low resolution at probability 0 draw nothing (a constant False coin)."""
  landmarks = tf.cast(landmarks, tf.float32)
  if not cfg.augment:
    matrix = crop_matrix(box)
    false = tf.constant(False)
    return {"matrix": matrix, "landmarks": transform_points(matrix, landmarks),
            "colour": false, "colour_fractions": tf.zeros([2, 3]), "occlusion": false,
            "occlusion_rect": tf.zeros([4]), "greyscale": false, "blur": false,
            "blur_sigma": tf.zeros([2]), "lowres": false,
            "lowres_size": tf.constant(CROP, tf.int32)}
  landmark_box = tf.concat([tf.reduce_min(landmarks, 0), tf.reduce_max(landmarks, 0)], 0)
  matrix, flip = sample_geometry(cfg, key, box, landmark_box)
  # Label convention: labels sit flip_label_shift px right of the image content, in IMAGE
  # pixels (a property of the annotation, not of the crop: the offset measured on 300W
  # training faces is more constant per folder in image px than in crop px). One affine
  # mirrors content and labels alike, which turns that +shift into -shift relative to
  # the mirrored content; a mirrored face keeps the convention (labels +shift in ITS x)
  # when its labels move -2 * shift in the source image's x before the affine (= +2 *
  # shift in the mirrored image's x; rotation, shear and scale then carry the offset as
  # they carry the content).
  shifted = landmarks - tf.constant([2.0 * cfg.flip_label_shift, 0.0], tf.float32)
  points = transform_points(matrix, tf.where(flip, shifted, landmarks))
  points = tf.where(flip, tf.gather(points, flip_perm), points)
  occlusion = (_coin(key, _OCC_P, cfg.occlusion_prob) if cfg.occlusion_prob > 0
               else tf.constant(False))
  off = tf.constant(False)
  quality = {
      "blur": _coin(key, _BLUR_P, cfg.blur_prob) if cfg.blur_prob > 0 else off,
      "blur_sigma": (_uniform(key, _BLUR, [2], 0.0, cfg.blur_max_sigma)
                     if cfg.blur_prob > 0 else tf.zeros([2])),
      "lowres": _coin(key, _LOWRES_P, cfg.lowres_prob) if cfg.lowres_prob > 0 else off,
      "lowres_size": (lowres_size(_uniform(key, _LOWRES, (), cfg.lowres_min_px,
                                           cfg.lowres_max_px))
                      if cfg.lowres_prob > 0 else tf.constant(CROP, tf.int32))}
  return {"matrix": matrix, "landmarks": points, **quality,
          "colour": _coin(key, _COLOR_P, cfg.color_prob),
          "colour_fractions": _uniform(key, _COLOR, [2, 3], 0.0, cfg.color_clip_max),
          "occlusion": occlusion,
          "occlusion_rect": _occlusion_rect(key, cfg.occlusion_max_frac),
          "greyscale": _coin(key, _GREY_P, cfg.greyscale_prob)}


def augment_example(cfg: config_lib.DataConfig, key, image, landmarks, box, flip_perm):
  """Training crop of one decoded photo: (image float32 [228, 228, 3] in 0..255 before
  standardisation is applied by the caller, landmarks [N, 2] crop pixels)."""
  p = sample_params(cfg, key, landmarks, box, flip_perm)
  crop = warp(image, p["matrix"])
  crop = degrade(cfg, crop[None], {k: p[k][None] for k in DEGRADE_KEYS})[0]
  crop = tf.where(p["colour"], _stretch(crop, p["colour_fractions"]), crop)
  if cfg.occlusion_prob > 0:
    crop = tf.where(p["occlusion"] & occlusion_mask(p["occlusion_rect"])[..., None],
                    occlusion_noise(key, tf.shape(crop)), crop)
  crop = tf.where(p["greyscale"], greyscale(crop), crop)
  return crop, p["landmarks"]


def eval_example(image, landmarks, box):
  """Evaluation crop, no augmentation: (image [228, 228, 3], landmarks, matrix)."""
  matrix = crop_matrix(box)
  return warp(image, matrix), transform_points(matrix, tf.cast(landmarks, tf.float32)), matrix
