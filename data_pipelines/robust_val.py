"""Robustness validation: validation faces under conditions that model deployment.

numpy + PIL + scipy only (no TensorFlow): every transform takes a `Face` (photo, landmarks,
box, file id) and returns the transformed `Face`, its landmarks moved with the pixels and
its box re-made, so any model can be scored on it with the ground truth it implies.
`experiments.robust_val_lib` reads the faces (the project's one reader,
`data_pipelines.datasets.load_split`), builds every condition with `apply` and scores the
shipped predictor on each.

Conditions (`CONDITIONS`; a name is a kind and a level, e.g. "downscale_48px"):
- clean: the face as stored (the reference row).
- downscale_<S>px: the photo resized so the landmark box's longer side is S px (PIL,
  antialiased bilinear) and back to its own size (bilinear): the detail of an S-px face in
  the original's pixels. Faces already at most S px are left as they are (counted).
- jpeg_q<Q>: JPEG at quality Q (PIL, 4:2:0) and decoded.
- motion_blur: a line kernel of length MOTION_BLUR_FRAC x the face size in a direction
  drawn per face (seeded); defocus_blur: a disk of radius DEFOCUS_RADIUS_FRAC x the face
  size. The face size is the landmark box's longer side.
- rotate_<D>: in-plane rotation by +D or -D degrees (sign drawn per face, seeded) about
  the landmark box's centre; the photo's borders are reflected into the corners. The
  landmarks rotate with the photo and the box is the ROTATED LANDMARKS' box (the jittered
  box is a condition of its own).
- strong_yaw: the val faces with the most asymmetric shapes (`yaw_asymmetry`: ratio of the
  wider to the narrower half-face, nose tip to jaw ends) plus their mirrored copies
  (`mirror`: the scheme's flip permutation and the labels' x offset kept).
- occlusion_<P>: a rectangle of P % of the box area (aspect 1:2 to 2:1, anywhere inside
  the box, seeded), filled with mid grey or uniform noise (a seeded coin per face).
- box_jitter_<F>: the box moved and resized by the evaluation jitter rule of
  `DataConfig.box_jitter` (data_pipelines.datasets.jitter_boxes(boxes, file_ids, F, seed),
  which the caller passes in as `box_jitter_fn`: that module imports TensorFlow); the
  photo untouched.

Determinism: every random draw comes from `face_rng(seed, condition, file_id)`, a function
of those three only, so a face gets the same condition whatever the order or the other
faces, and the same seed gives the same photos bit for bit.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import math
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from musica_jax import face_frame

MOTION_BLUR_FRAC = 0.06     # motion blur length / face size (9.6 px on a 160-px face)
DEFOCUS_RADIUS_FRAC = 0.03  # defocus disk radius / face size (4.8 px on a 160-px face)
YAW_FRACTION = 0.25         # strong_yaw: this fraction of the faces (most asymmetric) + mirrors
NOSE_TIP, JAW_ENDS = 30, (0, 16)   # iBUG 68 indices used by `yaw_asymmetry`

CONDITIONS = ("clean", "downscale_80px", "downscale_48px", "jpeg_q50", "jpeg_q30",
              "motion_blur", "defocus_blur", "rotate_20", "rotate_40", "strong_yaw",
              "occlusion_25", "box_jitter_0.1", "box_jitter_0.2")


@dataclasses.dataclass
class Face:
  """One face: photo uint8 [H, W, 3] RGB, landmarks float64 [N, 2] (0-based, pixel
  centres at integers: musica_jax.face_frame), box float64 [4] (x0, y0, x1, y1)."""
  image: np.ndarray
  landmarks: np.ndarray
  box: np.ndarray
  file_id: str
  info: dict = dataclasses.field(default_factory=dict)   # what the transform drew


def make_face(image, landmarks, file_id: str, box=None) -> Face:
  """A Face from a photo and its landmarks; the box defaults to the landmarks' box (the
  300W convention)."""
  lm = np.asarray(landmarks, np.float64)
  return Face(np.ascontiguousarray(np.asarray(image, np.uint8)), lm,
              face_frame.box_from_landmarks(lm) if box is None else np.asarray(box, np.float64),
              str(file_id))


def face_rng(seed: int, condition: str, file_id: str) -> np.random.Generator:
  """The generator of one face's draws in one condition: a function of the three only."""
  digest = hashlib.sha256(f"robust_val|{seed}|{condition}|{file_id}".encode()).digest()
  return np.random.default_rng(int.from_bytes(digest[:16], "big"))


def face_size(landmarks) -> float:
  """The landmark box's longer side (px)."""
  lm = np.asarray(landmarks, np.float64)
  return float(np.max(lm.max(0) - lm.min(0)))


def _with(face: Face, image=None, landmarks=None, box=None, **info) -> Face:
  lm = face.landmarks if landmarks is None else np.asarray(landmarks, np.float64)
  if box is None:
    box = face_frame.box_from_landmarks(lm) if landmarks is not None else face.box
  return Face(face.image if image is None else image, lm, np.asarray(box, np.float64),
              face.file_id, {**face.info, **info})


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# Photometric transforms (landmarks and box unchanged).


def downscale(face: Face, target_px: float) -> Face:
  """The photo at a face size (landmark box's longer side) of target_px and back to its
  own size. PIL's resize is centre-aligned (x -> (x + 0.5) s - 0.5), so down and back to
  the exact original size keeps every coordinate: the landmarks stay. A face already at
  most target_px is returned unchanged (info["downscaled"] False)."""
  size = face_size(face.landmarks)
  s = target_px / size
  h, w = face.image.shape[:2]
  small = (max(1, round(w * s)), max(1, round(h * s)))
  if s >= 1.0 or small == (w, h):
    return _with(face, downscaled=False, scale=1.0)
  im = Image.fromarray(face.image)
  back = im.resize(small, Image.Resampling.BILINEAR).resize((w, h), Image.Resampling.BILINEAR)
  return _with(face, image=np.asarray(back, np.uint8), downscaled=True, scale=float(s))


def jpeg(face: Face, quality: int) -> Face:
  """The photo through JPEG at `quality` (PIL, 4:2:0 chroma subsampling)."""
  buf = io.BytesIO()
  Image.fromarray(face.image).save(buf, format="JPEG", quality=int(quality), subsampling=2)
  buf.seek(0)
  return _with(face, image=np.asarray(Image.open(buf).convert("RGB"), np.uint8),
               jpeg_quality=int(quality))


def motion_kernel(length: float, angle_deg: float) -> np.ndarray:
  """A normalised line kernel of `length` px at `angle_deg` (0: along x), anti-aliased
  (points along the segment splatted bilinearly)."""
  length = max(float(length), 1.0)
  half = int(math.ceil(length / 2.0)) + 1
  k = np.zeros((2 * half + 1, 2 * half + 1), np.float64)
  t = np.linspace(-length / 2.0, length / 2.0, max(int(length * 8), 2))
  a = math.radians(angle_deg)
  xs, ys = half + t * math.cos(a), half + t * math.sin(a)
  x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
  fx, fy = xs - x0, ys - y0
  for dx, dy, wgt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                      (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
    np.add.at(k, (y0 + dy, x0 + dx), wgt)
  return k / k.sum()


def disk_kernel(radius: float) -> np.ndarray:
  """A normalised disk of `radius` px, anti-aliased by 8x8 supersampling."""
  radius = max(float(radius), 0.5)
  half = int(math.ceil(radius))
  sub = (np.arange(8) + 0.5) / 8.0 - 0.5
  c = np.arange(-half, half + 1, dtype=np.float64)
  yy = c[:, None, None, None] + sub[None, None, :, None]
  xx = c[None, :, None, None] + sub[None, None, None, :]
  k = ((xx ** 2 + yy ** 2) <= radius ** 2).mean((2, 3))
  return k / k.sum()


def _convolve(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  x = image.astype(np.float64)
  return _to_uint8(np.stack([ndimage.convolve(x[..., c], kernel, mode="reflect")
                             for c in range(x.shape[-1])], -1))


def motion_blur(face: Face, rng: np.random.Generator,
                length_frac: float = MOTION_BLUR_FRAC) -> Face:
  """Linear motion blur: length length_frac x face size, direction U(0, 180) deg."""
  length = length_frac * face_size(face.landmarks)
  angle = float(rng.uniform(0.0, 180.0))
  return _with(face, image=_convolve(face.image, motion_kernel(length, angle)),
               blur_length_px=length, blur_angle_deg=angle)


def defocus_blur(face: Face, radius_frac: float = DEFOCUS_RADIUS_FRAC) -> Face:
  """Defocus: a disk kernel of radius radius_frac x face size."""
  radius = radius_frac * face_size(face.landmarks)
  return _with(face, image=_convolve(face.image, disk_kernel(radius)), blur_radius_px=radius)


# ---------------------------------------------------------------------------------------
# Geometric transforms (landmarks move with the pixels).


def rotation_matrix(degrees: float) -> np.ndarray:
  """2x2 rotation of image coordinates (x right, y down) by `degrees`: positive turns
  the face clockwise as displayed."""
  a = math.radians(degrees)
  return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def rotate(face: Face, degrees: float) -> Face:
  """The photo rotated by `degrees` about the landmark box's centre (bilinear, borders
  reflected), landmarks rotated with it, the box the rotated landmarks' box."""
  c = face_frame.box_from_landmarks(face.landmarks)
  c = (c[:2] + c[2:]) / 2.0
  r = rotation_matrix(degrees)
  h, w = face.image.shape[:2]
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
  # out(p) = in(R^-1 (p - c) + c); R^-1 = R^T.
  dx, dy = xs - c[0], ys - c[1]
  src_x = r[0, 0] * dx + r[1, 0] * dy + c[0]
  src_y = r[0, 1] * dx + r[1, 1] * dy + c[1]
  x = face.image.astype(np.float64)
  out = np.stack([ndimage.map_coordinates(x[..., k], [src_y, src_x], order=1, mode="reflect")
                  for k in range(x.shape[-1])], -1)
  points = (face.landmarks - c) @ r.T + c
  return _with(face, image=_to_uint8(out), landmarks=points, rotation_deg=float(degrees))


def mirror(face: Face, flip_permutation: Sequence[int], label_shift: float = 0.0) -> Face:
  """The photo mirrored left-right; landmark i of the result is the mirror of landmark
  flip_permutation[i]. label_shift: the labels sit this many px right of the image content
  (`DataConfig.flip_label_shift`, 300W 0.52; data_pipelines.augment): a mirrored label
  keeps that convention, x' = (W - 1) - (x - 2 shift)."""
  w = face.image.shape[1]
  perm = np.asarray(flip_permutation, np.int64)
  pts = face.landmarks.copy()
  pts[:, 0] = (w - 1.0) - (pts[:, 0] - 2.0 * label_shift)
  return _with(face, image=np.ascontiguousarray(face.image[:, ::-1]), landmarks=pts[perm],
               mirrored=True)


def yaw_asymmetry(landmarks) -> float:
  """Ratio of the wider to the narrower half-face: horizontal distances from the nose tip
  to the two jaw ends (iBUG 68 indices 30, 0, 16); >= 1, large for strong yaw."""
  lm = np.asarray(landmarks, np.float64)
  left = lm[NOSE_TIP, 0] - lm[JAW_ENDS[0], 0]
  right = lm[JAW_ENDS[1], 0] - lm[NOSE_TIP, 0]
  a, b = max(left, right), min(left, right)
  return float(a / max(b, 1.0))


def most_asymmetric(faces: Sequence[Face], fraction: float = YAW_FRACTION) -> list[int]:
  """Indices of the round(fraction x M) (at least 1) faces of highest `yaw_asymmetry`
  (ties by file id)."""
  k = max(1, int(round(fraction * len(faces))))
  keyed = sorted(range(len(faces)), key=lambda i: (-yaw_asymmetry(faces[i].landmarks),
                                                   faces[i].file_id))
  return sorted(keyed[:k])


# ---------------------------------------------------------------------------------------
# Occlusion.


def occlusion_rect(box, area_frac: float, rng: np.random.Generator) -> np.ndarray:
  """(x0, y0, x1, y1) in whole pixels: a rectangle of area_frac x the box area, aspect
  U(log 1/2, log 2), anywhere inside the box. Pixel (i, j) is covered when x0 <= j < x1
  and y0 <= i < y1."""
  box = np.asarray(box, np.float64)
  bw, bh = box[2] - box[0], box[3] - box[1]
  area = area_frac * bw * bh
  aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
  w = min(math.sqrt(area * aspect), bw)
  h = min(area / w, bh)
  w = min(area / h, bw)
  x0 = box[0] + rng.uniform(0.0, bw - w)
  y0 = box[1] + rng.uniform(0.0, bh - h)
  return np.array([round(x0), round(y0), round(x0 + w), round(y0 + h)], np.int64)


def occlude(face: Face, rng: np.random.Generator, area_frac: float = 0.25) -> Face:
  """A rectangle of area_frac x the box area (`occlusion_rect`), mid grey or uniform noise
  (a coin per face)."""
  x0, y0, x1, y1 = occlusion_rect(face.box, area_frac, rng)
  noise = bool(rng.uniform() < 0.5)
  h, w = face.image.shape[:2]
  xa, xb, ya, yb = max(x0, 0), min(x1, w), max(y0, 0), min(y1, h)
  image = face.image.copy()
  if xb > xa and yb > ya:
    image[ya:yb, xa:xb] = (rng.integers(0, 256, (yb - ya, xb - xa, image.shape[2]),
                                        dtype=np.uint8) if noise else 128)
  return _with(face, image=image, occlusion_rect=[int(v) for v in (x0, y0, x1, y1)],
               occlusion_fill="noise" if noise else "grey")


# ---------------------------------------------------------------------------------------
# Conditions.


BoxJitterFn = Callable[[np.ndarray, Sequence[str], float, int], np.ndarray]


def _level(name: str, prefix: str, suffix: str = "") -> float:
  text = name[len(prefix):len(name) - len(suffix) if suffix else None]
  try:
    return float(text)
  except ValueError:
    raise ValueError(f"robust_val condition {name!r}: expected {prefix}<number>{suffix}") from None


def check_condition(name: str) -> str:
  """The condition's name, checked (ValueError naming it)."""
  if name in ("clean", "motion_blur", "defocus_blur", "strong_yaw"):
    return name
  for prefix, suffix in (("downscale_", "px"), ("jpeg_q", ""), ("rotate_", ""),
                         ("occlusion_", ""), ("box_jitter_", "")):
    if name.startswith(prefix) and name.endswith(suffix):
      v = _level(name, prefix, suffix)
      ok = {"downscale_": v >= 8, "jpeg_q": 1 <= v <= 95, "rotate_": 0 <= v <= 180,
            "occlusion_": 0 < v < 100, "box_jitter_": 0 < v < 1}[prefix]
      if not ok:
        raise ValueError(f"robust_val condition {name!r}: level out of range")
      return name
  raise ValueError(f"unknown robust_val condition {name!r}; known kinds: clean, "
                   "downscale_<px>px, jpeg_q<quality>, motion_blur, defocus_blur, "
                   "rotate_<deg>, strong_yaw, occlusion_<percent>, box_jitter_<fraction>")


def apply(condition: str, faces: Sequence[Face], seed: int, *,
          flip_permutation: Sequence[int] | None = None, label_shift: float = 0.0,
          box_jitter_fn: BoxJitterFn | None = None,
          yaw_fraction: float = YAW_FRACTION) -> list[Face]:
  """The faces of one condition, in input order (strong_yaw: the chosen faces, then their
  mirrored copies, whose file ids end in "#mirror"). Deterministic for (condition, seed,
  faces)."""
  check_condition(condition)
  rng = lambda f: face_rng(seed, condition, f.file_id)  # noqa: E731
  if condition == "clean":
    return [_with(f) for f in faces]
  if condition.startswith("downscale_"):
    px = _level(condition, "downscale_", "px")
    return [downscale(f, px) for f in faces]
  if condition.startswith("jpeg_q"):
    return [jpeg(f, int(_level(condition, "jpeg_q"))) for f in faces]
  if condition == "motion_blur":
    return [motion_blur(f, rng(f)) for f in faces]
  if condition == "defocus_blur":
    return [defocus_blur(f) for f in faces]
  if condition.startswith("rotate_"):
    deg = _level(condition, "rotate_")
    return [rotate(f, deg if rng(f).uniform() < 0.5 else -deg) for f in faces]
  if condition == "strong_yaw":
    if flip_permutation is None:
      raise ValueError("strong_yaw needs the scheme's flip_permutation")
    chosen = [faces[i] for i in most_asymmetric(faces, yaw_fraction)]
    out = [_with(f, yaw_asymmetry=yaw_asymmetry(f.landmarks)) for f in chosen]
    for f in out[:]:
      m = mirror(f, flip_permutation, label_shift)
      m.file_id = f.file_id + "#mirror"
      out.append(m)
    return out
  if condition.startswith("occlusion_"):
    frac = _level(condition, "occlusion_") / 100.0
    return [occlude(f, rng(f), frac) for f in faces]
  if condition.startswith("box_jitter_"):
    if box_jitter_fn is None:
      raise ValueError("box_jitter needs box_jitter_fn (data_pipelines.datasets.jitter_boxes)")
    amount = _level(condition, "box_jitter_")
    boxes = np.asarray(box_jitter_fn(np.stack([f.box for f in faces]),
                                     [f.file_id for f in faces], amount, seed), np.float64)
    return [_with(f, box=b, box_jitter=amount) for f, b in zip(faces, boxes)]
  raise AssertionError(condition)
