"""Face detection for box-free prediction, and the fit between box conventions.

The cascade was trained on the tight box of the ground-truth landmarks. A detector's box
sits differently on the face (dlib's HOG box: square, larger, lower), so a detected box is
mapped to the landmark-box convention by a linear fit learned on training faces
(`BoxMapping`, `fit_box_mapping`; the same fit, the other way round, maps landmark boxes
to dlib's convention for the dlib comparison, experiments.compare_dlib):
    out_cx = cx + a * w          out_w = c * w + d * h
    out_cy = cy + b * h          out_h = e * w + f * h
(cx, cy, w, h: centre and size of the input box; least squares per line; translation and
scale equivariant).

The detector: dlib's HOG frontal face detector (`dlib.get_frontal_face_detector`), from
the optional peers extra (`pip install 'musica-jax[peers]'`): it ships inside the pip
package (no weight file to download), runs on the CPU in tens of milliseconds per photo,
is the detector dlib's own 68-point model was trained with, and its boxes on the 300W
training faces are the ones our fit already uses. dlib is imported lazily: musica_jax works
without it, and box-free prediction without it raises one clear ImportError.

The fitted mappings ship in `detector_boxes.json` beside this file (written by
`python -m experiments.fit_detector_box`), keyed by detector and landmark count.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from musica_jax import images as images_lib

INSTALL_HINT = ("install the optional peers extra: pip install 'musica-jax[peers]' "
                "(dlib-bin and face-recognition-models)")
FITS_FILE = pathlib.Path(__file__).resolve().parent / "detector_boxes.json"
DLIB_HOG = "dlib_hog"


def import_dlib():
  try:
    import dlib  # noqa: PLC0415
  except ImportError as e:
    raise ImportError(f"dlib is not installed: {INSTALL_HINT}") from e
  return dlib


# ---------------------------------------------------------------------------------------
# The box mapping.


def _cwh(boxes):
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  c = (boxes[:, :2] + boxes[:, 2:]) / 2.0
  s = boxes[:, 2:] - boxes[:, :2]
  return c, s


@dataclasses.dataclass
class BoxMapping:
  """One box convention -> another (see the module docstring)."""
  a: float = 0.0
  b: float = 0.0
  c: float = 1.0
  d: float = 0.0
  e: float = 0.0
  f: float = 1.0
  faces: int = 0
  residual_rms: float = 0.0    # RMS residual of the fit, in units of the input box size

  def apply(self, boxes) -> np.ndarray:
    (cx, cy), (w, h) = (v.T for v in _cwh(boxes))
    dcx, dcy = cx + self.a * w, cy + self.b * h
    dw, dh = self.c * w + self.d * h, self.e * w + self.f * h
    return np.stack([dcx - dw / 2, dcy - dh / 2, dcx + dw / 2, dcy + dh / 2], -1)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def fit_box_mapping(input_boxes, target_boxes) -> BoxMapping:
  """Least-squares fit of the mapping input -> target on paired boxes [M, 4]."""
  lb = np.asarray(input_boxes, np.float64).reshape(-1, 4)
  db = np.asarray(target_boxes, np.float64).reshape(-1, 4)
  if len(lb) != len(db):
    raise ValueError(f"{len(lb)} input boxes but {len(db)} target boxes")
  if len(lb) < 3:
    raise ValueError(f"need at least 3 box pairs to fit the mapping, got {len(lb)}")
  (cx, cy), (w, h) = (v.T for v in _cwh(lb))
  (dcx, dcy), (dw, dh) = (v.T for v in _cwh(db))
  if np.any(w <= 0) or np.any(h <= 0):
    raise ValueError("input boxes must have positive width and height")
  # Centre offsets in units of the box size: one parameter each (mean of the ratios in the
  # least-squares sense).
  a = float(np.sum((dcx - cx) * w) / np.sum(w * w))
  b = float(np.sum((dcy - cy) * h) / np.sum(h * h))
  wh = np.stack([w, h], -1)
  (c, d), *_ = np.linalg.lstsq(wh, dw, rcond=None)
  (e, f), *_ = np.linalg.lstsq(wh, dh, rcond=None)
  m = BoxMapping(a, b, float(c), float(d), float(e), float(f), faces=len(lb))
  size = np.sqrt(w * h)[:, None]
  m.residual_rms = float(np.sqrt(np.mean(((m.apply(lb) - db) / size) ** 2)))
  return m


def iou(box, boxes) -> np.ndarray:
  box = np.asarray(box, np.float64)
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  x0, y0 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
  x1, y1 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
  inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
  area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
  return inter / (area(box) + area(boxes) - inter)


def match_detection(landmark_box, detections, min_iou: float = 0.3):
  """Index of the detection that is this face (largest IoU >= min_iou), or None."""
  if len(detections) == 0:
    return None
  overlaps = iou(landmark_box, detections)
  k = int(np.argmax(overlaps))
  return k if overlaps[k] >= min_iou else None


def load_fit(detector: str = DLIB_HOG, num_landmarks: int = 68, path=None) -> BoxMapping:
  """The shipped detector-box -> landmark-box mapping for models of `num_landmarks`."""
  path = pathlib.Path(path or FITS_FILE)
  fits = json.loads(path.read_text()) if path.is_file() else {}
  entry = fits.get(detector, {}).get(str(num_landmarks))
  if entry is None:
    raise ValueError(f"no {detector} box fit for {num_landmarks}-landmark models in {path}: "
                     f"give face boxes, or fit one with `python -m "
                     f"experiments.fit_detector_box`")
  return BoxMapping(**entry["mapping"])


# ---------------------------------------------------------------------------------------
# Detectors.


class DlibHogDetector:
  """dlib's HOG frontal face detector: image -> detector boxes [K, 4] (x0, y0, x1, y1,
  image pixels, dlib's convention), strongest first. `upsample`: the upsampling levels
  tried in order until a face is found (0 finds faces from ~80 px; 1 from ~40 px)."""

  name = DLIB_HOG

  def __init__(self, upsample=(0, 1)):
    self._dlib = import_dlib()
    self._detector = self._dlib.get_frontal_face_detector()
    self.upsample = tuple(int(u) for u in upsample)

  def __call__(self, image) -> np.ndarray:
    """image: HxWx3 RGB, uint8 or numbers in 0..255 (`images.check_image`: a float
    photo in 0..1 is refused, never silently read as black); non-uint8 values are rounded
    to uint8, which is what dlib reads."""
    image = images_lib.check_image(image)
    if image.dtype != np.uint8:
      image = np.round(image).astype(np.uint8)      # in 0..255 (checked): no wrap-around
    image = np.ascontiguousarray(image)
    for up in self.upsample:
      rects, scores, _ = self._detector.run(image, up, 0.0)
      if len(rects):
        order = np.argsort(-np.asarray(scores))
        return np.asarray([[rects[k].left(), rects[k].top(), rects[k].right(),
                            rects[k].bottom()] for k in order], np.float64)
    return np.zeros((0, 4), np.float64)


class FaceFinder:
  """Detector + its fitted mapping: image -> face boxes in the landmark-box convention
  the cascade expects ([K, 4])."""

  def __init__(self, num_landmarks: int = 68, detector=None, mapping: BoxMapping | None = None):
    self.mapping = mapping or load_fit(getattr(detector, "name", DLIB_HOG), num_landmarks)
    self.detector = detector or DlibHogDetector()

  def __call__(self, image) -> np.ndarray:
    found = self.detector(image)
    return self.mapping.apply(found) if len(found) else np.zeros((0, 4), np.float64)
