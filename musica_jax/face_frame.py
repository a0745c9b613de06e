"""The face frame: how a face box maps to the level-0 crop the cascade reads.

Coordinate convention (used everywhere in the project): continuous pixel coordinates,
x to the right and y down, pixel centres at integers, 0-based. `.pts` files are 1-based
and are converted by the readers. Resizing by a factor s maps x -> (x + 0.5) * s - 0.5.

The crop (reference notes): the face box grown by a margin of 0.3 x box size on each
side, scaled so the box's longer side is 142 px; 142 * 1.6 = 227.2, rounded up to 228 so
that the pyramid levels are exactly 228 / 114 / 57 px. The box centre is the crop centre.
"""
from __future__ import annotations

import numpy as np

BOX_SIZE = 142.0
MARGIN = 0.3
CROP_SIZE = 228


def validate_box(box, where: str = "box") -> np.ndarray:
  """Checks a box (x0, y0, x1, y1): finite with positive width and height."""
  box = np.asarray(box, np.float64)
  if box.shape[-1] != 4:
    raise ValueError(f"{where}: a box has 4 numbers (x0, y0, x1, y1), got shape {box.shape}")
  if not np.all(np.isfinite(box)):
    raise ValueError(f"{where}: box has non-finite values: {box.tolist()}")
  if np.any(box[..., 2] <= box[..., 0]) or np.any(box[..., 3] <= box[..., 1]):
    raise ValueError(f"{where}: empty box (x1 <= x0 or y1 <= y0): {box.tolist()}")
  return box


def box_from_landmarks(points: np.ndarray) -> np.ndarray:
  """The tight box (x0, y0, x1, y1) around landmarks [..., N, 2]."""
  points = np.asarray(points, np.float64)
  return np.concatenate([points.min(-2), points.max(-2)], -1)


def crop_transform(box, crop_size: int = CROP_SIZE, box_size: float = BOX_SIZE, xp=np):
  """Returns (scale, offset [2]) with crop_xy = image_xy * scale + offset.

  The box centre goes to the crop centre ((crop_size - 1) / 2) and the box's longer side
  becomes `box_size` pixels. `xp`: the array module; numpy (default, float64, the box is
  validated) or `tf.experimental.numpy` inside a tf.data graph (the input pipeline's
  augmentation computes the same formula in its own dtype).
  """
  if xp is np:
    box = validate_box(box)
  centre = (box[..., :2] + box[..., 2:]) / 2.0
  longer = xp.max(box[..., 2:] - box[..., :2], axis=-1)
  scale = box_size / longer
  offset = (crop_size - 1) / 2.0 - centre * scale[..., None]
  return scale, offset


def crop_frames(boxes) -> tuple[np.ndarray, np.ndarray]:
  """Per face (scale [F] float32, offset [F, 2] float32) of `crop_transform` for boxes
  [F, 4] (or [4]): the frames the input pipeline and the predictor both crop with."""
  scale, offset = crop_transform(np.asarray(boxes, np.float64).reshape(-1, 4))
  return scale.astype(np.float32), offset.astype(np.float32)


def to_crop(points, scale, offset):
  return np.asarray(points) * np.asarray(scale)[..., None, None] + np.asarray(offset)[..., None, :]


def from_crop(points, scale, offset):
  shifted = np.asarray(points) - np.asarray(offset)[..., None, :]
  return shifted / np.asarray(scale)[..., None, None]
