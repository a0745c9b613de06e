"""Photos in: reading a file (PIL, EXIF orientation, 16-bit greyscale), checking a photo
array and its face boxes, and turning the `Predictor.predict` forms of images + boxes into
one list of faces with their crop frames. numpy + PIL only.

Decoding: `read_image` decodes with PIL (exact IDCT for JPEG) and turns a photo upright by
its EXIF orientation tag (a phone photo stored sideways); `exif_transpose=False` gives
the stored pixels, as TensorFlow's decoders do (the dataset tools read dataset images so,
their .pts being in stored pixels). TensorFlow's default JPEG IDCT (INTEGER_FAST) differs
from PIL by a few grey levels; the training/eval pipeline matches PIL exactly when it
decodes with dct_method="INTEGER_ACCURATE".
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np

from musica_jax import face_frame


def read_image(path: str | os.PathLike | BinaryIO, exif_transpose: bool = True) -> np.ndarray:
  """A photo file (a path or a binary file object) as RGB uint8 [H, W, 3] (PIL;
  greyscale/RGBA converted to RGB; 16-bit greyscale scaled to 8 bits, see
  `_high_bit_depth_to_rgb8`), turned upright by its EXIF orientation tag (a phone photo
  stored sideways with Orientation=6 comes back as the camera saw it; see
  `read_image_and_orientation`). exif_transpose=False: the stored pixels, as TensorFlow's
  decoders give them (dataset images, whose .pts landmarks are in stored pixels)."""
  return read_image_and_orientation(path, exif_transpose)[0]


EXIF_ORIENTATION = 0x0112     # the EXIF tag (274); 1 = upright, 2..8 = flips / rotations


def read_image_and_orientation(path: str | os.PathLike | BinaryIO,
                               exif_transpose: bool = True) -> tuple[np.ndarray, int]:
  """(RGB uint8 [H, W, 3] as `read_image`, the EXIF orientation of the file: 1 when it
  has none; 2..8 when the stored pixels are flipped or rotated, undone with PIL's
  ImageOps.exif_transpose unless exif_transpose=False)."""
  from PIL import Image  # noqa: PLC0415
  from PIL import ImageOps  # noqa: PLC0415
  with Image.open(path) as im:
    im.load()
    try:
      orientation = int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block: no orientation
      orientation = 1
    if orientation not in range(1, 9):
      orientation = 1                 # out-of-range tags are ignored, as exif_transpose does
    fmt = im.format                   # the transposed copy has none
    if exif_transpose and orientation != 1:
      im = ImageOps.exif_transpose(im)
    if im.mode in HIGH_BIT_DEPTH_MODES:
      return _high_bit_depth_to_rgb8(im, path, fmt), orientation
    return np.asarray(im.convert("RGB")), orientation


def exif_transpose_points(points: Any, orientation: int, stored_size: Sequence[int]
                          ) -> np.ndarray:
  """Points [..., 2] (x, y pixel centres) of the stored pixels of a photo whose EXIF
  orientation is `orientation` and stored size (width, height) -> the same points on the
  upright photo `read_image` returns (e.g. a .pts file's landmarks, which datasets give in
  stored pixels)."""
  p = np.asarray(points, np.float64)
  x, y = p[..., 0], p[..., 1]
  w, h = float(stored_size[0]) - 1.0, float(stored_size[1]) - 1.0
  mapped = {1: (x, y), 2: (w - x, y), 3: (w - x, h - y), 4: (x, h - y), 5: (y, x),
            6: (h - y, x), 7: (h - y, w - x), 8: (y, w - x)}[int(orientation)]
  return np.stack(mapped, -1)


# PIL modes whose convert("RGB") clips every value above 255 to white.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _high_bit_depth_to_rgb8(im, path, fmt=None) -> np.ndarray:
  """16-bit greyscale (PIL modes I;16*, and I for a 16-bit PNG) -> RGB uint8 by value /
  257 (65535 -> 255); 32-bit integer or float images are refused: their range is unknown."""
  fmt = fmt or im.format
  sixteen = im.mode.startswith("I;16") or (im.mode == "I" and fmt == "PNG")
  if not sixteen:
    raise ValueError(f"{path}: {im.mode} image ({fmt}) with an unknown value range; "
                     f"convert it to 8-bit RGB first")
  grey = np.asarray(im, np.float64)
  if grey.min() < 0 or grey.max() > 65535:
    raise ValueError(f"{path}: 16-bit image with values outside 0..65535")
  grey = np.round(grey / 257.0).astype(np.uint8)
  return np.repeat(grey[..., None], 3, axis=-1)


def check_image(image: Any, where: str = "image") -> np.ndarray:
  """An HxWx3 RGB photo with values in 0..255 (uint8 preferred) -> the array.

  Float photos are taken in 0..255, as uint8 ones. A float photo whose values lie in
  0..1 (max <= 1, not all zero: the other common convention) is refused with a hint to
  multiply it by 255: the crop would pass it (it standardises each face) but the face
  detector would see a black photo and find no face, so the two would disagree. Both the
  predictor (`predict`, `find_faces`) and the detector (`detector.DlibHogDetector`) check
  their photo here."""
  if not isinstance(image, np.ndarray):
    try:
      image = np.asarray(image)
    except Exception as e:  # noqa: BLE001 - anything that is not array-like
      raise TypeError(f"{where}: expected an HxWx3 array, got {type(image).__name__}") from e
  if image.ndim != 3 or image.shape[-1] != 3:
    hint = (" (greyscale: stack it to 3 channels; RGBA: drop alpha; PIL: "
            "np.asarray(Image.open(p).convert('RGB')))")
    raise ValueError(f"{where}: expected an HxWx3 RGB array, got shape {image.shape}{hint}")
  if image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f"{where}: empty image of shape {image.shape}")
  if image.dtype == np.uint8:
    return image
  if image.dtype.kind not in "uif":
    raise TypeError(f"{where}: expected a numeric (uint8) array, got dtype {image.dtype}")
  if image.dtype.kind == "f" and not np.all(np.isfinite(image)):
    raise ValueError(f"{where}: image has non-finite values")
  lo, hi = float(image.min()), float(image.max())
  if lo < 0 or hi > 255:
    raise ValueError(f"{where}: values must be in 0..255 (uint8 RGB), got {lo}..{hi}")
  if image.dtype.kind == "f" and 0 < hi <= 1.0:
    raise ValueError(f"{where}: a float image with values in 0..1 (max {hi:g}); photos are "
                     f"taken in 0..255: multiply it by 255 (or pass uint8)")
  return image


def check_box_in_image(box: Any, image_shape: Sequence[int], where: str = "box") -> np.ndarray:
  """A finite non-empty box whose centre lies inside the photo (the crop is centred on it;
  a box may stick out of the photo, as detector boxes at the border do)."""
  box = face_frame.validate_box(box, where)
  h, w = image_shape[:2]
  cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
  if not (-0.5 <= cx <= w - 0.5 and -0.5 <= cy <= h - 0.5):
    raise ValueError(f"{where}: box {box.tolist()} is outside the {w}x{h} image (its centre "
                     f"({cx:.1f}, {cy:.1f}) is not in the image; boxes are x0,y0,x1,y1 in "
                     f"pixels)")
  check_face_box_size(box, image_shape, where)
  return box


# The smallest face box (sqrt(width x height), photo pixels) the model is asked about: the
# crop is 228 px, so a smaller face is blown up more than 10x and its landmarks are noise.
MIN_FACE_SIZE = 20.0
# The least fraction of a box's area that must lie inside the photo (a face at a corner, its
# box centred inside the photo, has about a quarter inside; detector boxes stick
# out a little at the border; a box mostly outside holds no face).
MIN_BOX_INSIDE = 0.25


def check_face_box_size(box: Any, image_shape: Sequence[int], where: str = "box") -> None:
  """Refuses face boxes below MIN_FACE_SIZE pixels, and boxes with less than
  MIN_BOX_INSIDE of their area inside the photo (a huge box, a tiny photo)."""
  h, w = image_shape[:2]
  bw, bh = float(box[2] - box[0]), float(box[3] - box[1])
  size = float(np.sqrt(bw * bh))
  if size < MIN_FACE_SIZE:
    raise ValueError(f"{where}: box {np.round(box, 1).tolist()} is a {size:.1f}-pixel face; "
                     f"the model needs at least {MIN_FACE_SIZE:g} pixels (image {w}x{h})")
  iw = max(0.0, min(float(box[2]), w) - max(float(box[0]), 0.0))
  ih = max(0.0, min(float(box[3]), h) - max(float(box[1]), 0.0))
  inside = iw * ih / (bw * bh)
  if inside < MIN_BOX_INSIDE:
    raise ValueError(f"{where}: box {np.round(box, 1).tolist()} lies {100 * (1 - inside):.0f}% "
                     f"outside the {w}x{h} image (at most {100 * (1 - MIN_BOX_INSIDE):.0f}% "
                     f"allowed)")


def photo_list(images: Any) -> tuple[list, bool]:
  """-> (the photos as a list, was the input a single photo?). An empty list is refused."""
  if isinstance(images, np.ndarray) and images.ndim == 4:
    images = list(images)          # a batch of same-size photos
  if isinstance(images, (list, tuple)):
    if not len(images):
      raise ValueError("images: an empty list; give one HxWx3 photo or a list of them")
    return list(images), False
  return [images], True


def _is_flat_box(boxes) -> bool:
  """True for one box given as 4 numbers (x0, y0, x1, y1) where a list per image is due."""
  try:
    arr = np.asarray(boxes, np.float64)
  except (TypeError, ValueError):
    return False                   # ragged: per-image entries
  return arr.ndim == 1 and arr.size == 4


def normalise_inputs(images: Any, boxes: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """-> (list of photos, list of [K_i, 4] box arrays)."""
  images, single = photo_list(images)
  if single:
    boxes = [boxes]
  elif _is_flat_box(boxes):
    n = len(images)
    raise ValueError(f"boxes: one box {np.asarray(boxes, np.float64).tolist()} for a list of "
                     f"{n} image{'s' if n > 1 else ''}: give one entry per image (a box, "
                     f"or a list of boxes), e.g. [box] * {n} for the same box in each")
  if not single and isinstance(boxes, np.ndarray) and boxes.ndim >= 2:
    boxes = list(boxes)            # [n, 4] (one box per image) or [n, K, 4]
  if not single and (not isinstance(boxes, (list, tuple)) or len(boxes) != len(images)):
    n = len(boxes) if isinstance(boxes, (list, tuple)) else "not a list"
    raise ValueError(f"boxes: one entry (a box or a list of boxes) per image expected: "
                     f"{len(images)} images, boxes: {n}")
  photos = [check_image(im, f"image {i}") for i, im in enumerate(images)]
  out = []
  for i, (photo, b) in enumerate(zip(photos, boxes)):
    arr = np.asarray(b, np.float64)
    if arr.size == 0:
      arr = arr.reshape(0, 4)      # no face in this image (e.g. none detected)
    if arr.ndim == 1:
      arr = arr[None]
    if arr.ndim != 2 or arr.shape[-1] != 4:
      raise ValueError(f"boxes of image {i}: expected (x0, y0, x1, y1) or a list of them, "
                       f"got shape {np.shape(b)}")
    for k in range(arr.shape[0]):
      check_box_in_image(arr[k], photo.shape, f"box {k} of image {i}")
    out.append(arr)
  return photos, out


def face_frames(images: Any, boxes: Any) -> tuple[list[np.ndarray], np.ndarray, np.ndarray,
                                                  np.ndarray, np.ndarray]:
  """-> (photos, image_index [F], boxes [F, 4], scale [F], offset [F, 2]) of every box of
  every image (checked)."""
  photos, box_lists = normalise_inputs(images, boxes)
  image_index = np.concatenate([np.full(len(b), i, np.int32) for i, b in enumerate(box_lists)])
  all_boxes = np.concatenate(box_lists, 0)
  scale, offset = face_frame.crop_frames(all_boxes)
  return photos, image_index, all_boxes, scale, offset
