"""Procedural face-like images with exact 68- or 98-point landmarks (numpy + PIL only).

For unit tests and the offline demo: every landmark lies on drawn structure (the face
outline, brows, eyes, nose, lips), so a small CNN can learn to find them. Nothing here is
a real face.

How a face is made (all deterministic from (seed, index)):
  1. A canonical symmetric shape in "face units" (half face width = 1, y down), built from
     expression parameters (mouth opening, smile, brow raise, eye opening, gaze). The left
     and right halves get slightly different parameters; the right half is the mirror of a
     second canonical shape through the scheme's flip permutation, so left/right indices
     follow the scheme exactly.
  2. A pseudo-3D yaw (x' = x cos(yaw) + depth * sin(yaw)) moves the features sideways.
  3. A similarity (in-plane rotation, scale, shift) places it in the image.
  4. Drawing goes through the final landmarks (Catmull-Rom splines pass through their
     control points), at 2x resolution then box-downsampled, so each landmark is on the
     rendered edge/stroke up to ~0.3 px.
  5. Lighting gradient, textured background, pixel noise, optional blur.

Coordinates: 0-based, pixel centres at integers (musica_jax.face_frame convention).
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from musica_jax import schemes as schemes_lib

# WFLW-style attribute flags stored with every example (same order as WFLW lists).
ATTRIBUTE_NAMES = ("pose", "expression", "illumination", "make_up", "occlusion", "blur")

_SUPERSAMPLE = 2


@dataclasses.dataclass(frozen=True)
class SyntheticFaceConfig:
  """Ranges of the random face generator."""
  image_size: int = 192
  face_size_range: tuple[float, float] = (64.0, 112.0)  # face width in px
  max_shift_frac: float = 0.08      # of image size, face centre shift
  max_roll_deg: float = 30.0        # in-plane rotation
  max_yaw_deg: float = 30.0         # pseudo-3D yaw
  blur_prob: float = 0.1


# ---------------------------------------------------------------------------------------
# Canonical shapes.


def _eye_points(p, num_points):
  """Left eye (image left, x < 0). Returns (points, pupil)."""
  cx, cy, half_w = -0.42, -0.28 - 0.02 * p["brow_raise"], 0.19
  open_up = 0.10 * p["eye_open"]
  open_dn = 0.06 * p["eye_open"] + 0.01
  outer = np.array([cx - half_w, cy + 0.01])
  inner = np.array([cx + half_w, cy + 0.02])

  def lid(u, up):  # u in [0, 1] from the outer corner to the inner corner
    base = outer + (inner - outer) * u
    bulge = np.sin(np.pi * u) ** 0.8
    return base + np.array([0.0, -open_up * bulge if up else open_dn * bulge])

  if num_points == 68:   # 36 outer, 37, 38 upper, 39 inner, 40, 41 lower (inner->outer)
    pts = [outer, lid(1 / 3, True), lid(2 / 3, True), inner, lid(2 / 3, False), lid(1 / 3, False)]
  else:                  # 60 outer, 61-63 upper, 64 inner, 65-67 lower (inner->outer)
    pts = ([outer] + [lid(u, True) for u in (0.25, 0.5, 0.75)] + [inner]
           + [lid(u, False) for u in (0.75, 0.5, 0.25)])
  pupil = np.array([cx + 0.06 * p["gaze_x"], cy - 0.25 * open_up + 0.02 * p["gaze_y"]])
  return np.array(pts), pupil


def _brow_points(p, num_points):
  """Left brow from its outer end to the inner end; 98 points add the lower edge."""
  lift = 0.12 * p["brow_raise"]
  def centre(u):
    x = -0.82 + 0.64 * u
    y = -0.55 - lift - 0.09 * np.sin(np.pi * (0.3 + 0.7 * u)) + 0.03 * u
    return np.stack([x, y], -1)
  us = np.linspace(0.0, 1.0, 5)
  if num_points == 68:
    return centre(us)
  half = 0.035 * np.sin(np.pi * (0.15 + 0.7 * us)) + 0.015
  upper = centre(us) - np.stack([0 * half, half], -1)
  lower_u = np.linspace(0.85, 0.1, 4)     # inner -> outer
  lh = 0.035 * np.sin(np.pi * (0.15 + 0.7 * lower_u)) + 0.015
  lower = centre(lower_u) + np.stack([0 * lh, lh], -1)
  return np.concatenate([upper, lower])   # 33-37 upper outer->inner, 38-41 lower inner->outer


def _contour_points(p, n):
  """Jaw/contour from the left temple through the chin to the right temple."""
  theta = np.deg2rad(np.linspace(188.0, -8.0, n))
  a, b = 1.0, p["face_height"]
  drop = 0.6 * p["mouth_open"]
  x = a * np.cos(theta) * (1 - 0.12 * np.clip(np.sin(theta), 0, 1) * p["jaw_narrow"])
  y = b * np.sin(theta) + drop * np.clip(np.sin(theta), 0, 1) ** 2
  return np.stack([x, y], -1)


def _forehead_points(p, n=24):
  theta = np.deg2rad(np.linspace(-8.0, -172.0, n))
  return np.stack([np.cos(theta), 1.05 * np.sin(theta) * p["face_height"]], -1)


def _nose_points(p, num_points):
  bridge = np.stack([np.zeros(4), np.linspace(-0.3, 0.16, 4)], -1)
  xs = np.linspace(-0.2, 0.2, 5)
  nostrils = np.stack([xs, 0.3 + 0.06 * (1 - (xs / 0.2) ** 2)], -1)
  return bridge, nostrils


def _mouth_points(p, num_points):
  cy = 0.62 + 0.3 * p["mouth_open"] * 0.5
  w = 0.36 + 0.08 * max(p["smile"], 0.0)
  corner_lift = 0.1 * p["smile"]
  o = p["mouth_open"]

  def curve(frac, offset, thickness):
    # frac in [-1, 1] left->right; offset: y of the centre relative to the corner line.
    x = frac * w
    shape = (1 - frac ** 2) ** 0.7
    y = cy - corner_lift * frac ** 2 + (offset + thickness) * shape
    return np.stack([x, y], -1)

  def inner_curve(frac, offset):
    x = frac * w * 0.82
    shape = (1 - frac ** 2) ** 0.7
    y = cy - corner_lift * (frac * 0.82) ** 2 + offset * shape
    return np.stack([x, y], -1)

  up_in, dn_in = -o / 2, o / 2
  up_out_t, dn_out_t = -0.07, 0.09
  if num_points == 68:
    up = np.array([-1.0, -2 / 3, -1 / 3, 0.0, 1 / 3, 2 / 3, 1.0])      # 48..54
    dn = np.array([2 / 3, 1 / 3, 0.0, -1 / 3, -2 / 3])                   # 55..59
    iu = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])                           # 60..64
    idn = np.array([0.5, 0.0, -0.5])                                     # 65..67
  else:
    up = np.array([-1.0, -0.7, -0.35, 0.0, 0.35, 0.7, 1.0])             # 76..82
    dn = np.array([0.7, 0.35, 0.0, -0.35, -0.7])                         # 83..87
    iu = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])                           # 88..92
    idn = np.array([0.5, 0.0, -0.5])                                     # 93..95
  outer = np.concatenate([curve(up, up_in, up_out_t), curve(dn, dn_in, dn_out_t)])
  # Cupid's bow: a slight dip at the upper centre.
  centre_idx = 3
  outer[centre_idx, 1] += 0.02
  inner = np.concatenate([inner_curve(iu, up_in), inner_curve(idn, dn_in)])
  return outer, inner


def canonical_shape(params: dict, num_points: int) -> tuple[np.ndarray, np.ndarray]:
  """A symmetric canonical face: (landmarks [N, 2], left pupil [2]) in face units."""
  pts = np.zeros((num_points, 2))
  eye, pupil = _eye_points(params, num_points)
  brow = _brow_points(params, num_points)
  bridge, nostrils = _nose_points(params, num_points)
  outer, inner = _mouth_points(params, num_points)
  mirror = lambda a: a * np.array([-1.0, 1.0])
  if num_points == 68:
    pts[0:17] = _contour_points(params, 17)
    pts[17:22] = brow
    pts[22:27] = mirror(brow[::-1])
    pts[27:31] = bridge
    pts[31:36] = nostrils
    pts[36:42] = eye
    # Right eye 42 inner, 43, 44 upper, 45 outer, 46, 47 lower (outer->inner).
    pts[42:48] = mirror(eye[[3, 2, 1, 0, 5, 4]])
    pts[48:60] = outer
    pts[60:68] = inner
  elif num_points == 98:
    pts[0:33] = _contour_points(params, 33)
    pts[33:42] = brow
    # Right brow: 42-46 upper inner->outer, 47-50 lower outer->inner.
    pts[42:47] = mirror(brow[4::-1])
    pts[47:51] = mirror(brow[[8, 7, 6, 5]])
    pts[51:55] = bridge
    pts[55:60] = nostrils
    pts[60:68] = eye
    # Right eye: 68 inner, 69-71 upper inner->outer, 72 outer, 73-75 lower outer->inner.
    pts[68:76] = mirror(eye[[4, 3, 2, 1, 0, 7, 6, 5]])
    pts[76:88] = outer
    pts[88:96] = inner
    pts[96] = pupil
    pts[97] = mirror(pupil)
  else:
    raise ValueError(f"synthetic faces support 68 or 98 points, got {num_points}")
  return pts, pupil


def _combine_sides(left: np.ndarray, right: np.ndarray, perm: np.ndarray) -> np.ndarray:
  """Left-side points from `left`, right-side points mirrored from `right`'s left side."""
  out = left.copy()
  mirrored = right[perm] * np.array([-1.0, 1.0])
  is_right = left[:, 0] > left[perm, 0] + 1e-9
  out[is_right] = mirrored[is_right]
  midline = perm == np.arange(len(perm))
  out[midline] = 0.5 * (left[midline] + right[midline])
  return out


# ---------------------------------------------------------------------------------------
# Drawing helpers.


def _catmull_rom(points: np.ndarray, closed: bool, samples: int = 8) -> np.ndarray:
  """A spline through every control point (so landmarks stay on the drawn curve)."""
  p = np.asarray(points, np.float64)
  if len(p) < 2:
    return p
  if closed:
    ext = np.concatenate([p[-1:], p, p[:2]])
    segs = len(p)
  else:
    ext = np.concatenate([2 * p[:1] - p[1:2], p, 2 * p[-1:] - p[-2:-1]])
    segs = len(p) - 1
  t = np.linspace(0, 1, samples, endpoint=False)[:, None]
  out = []
  for i in range(segs):
    p0, p1, p2, p3 = ext[i], ext[i + 1], ext[i + 2], ext[i + 3]
    out.append(0.5 * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                      + (-p0 + 3 * p1 - 3 * p2 + p3) * t ** 3))
  if not closed:
    out.append(p[-1:])
  return np.concatenate(out)


def _xy(points):
  return [tuple(map(float, q)) for q in points]


def _background(rng, size):
  """Low-frequency colour noise plus texture."""
  coarse = rng.uniform(0, 255, (rng.integers(3, 8), rng.integers(3, 8), 3)).astype(np.uint8)
  bg = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), np.float32)
  fine = rng.normal(0, rng.uniform(5, 25), (size // 4 + 1, size // 4 + 1, 3))
  fine = np.kron(fine, np.ones((4, 4, 1)))[:size, :size]
  stripes = 12 * np.sin(np.arange(size)[None, :, None] * rng.uniform(0.1, 0.6)
                        + np.arange(size)[:, None, None] * rng.uniform(0.1, 0.6))
  return np.clip(bg + fine + stripes * rng.integers(0, 2), 0, 255)


def _sample_params(rng) -> dict:
  mouth_open = rng.uniform(0.0, 0.28) if rng.random() < 0.4 else rng.uniform(0.0, 0.02)
  return {
      "mouth_open": mouth_open,
      "smile": rng.uniform(-0.4, 1.0),
      "brow_raise": rng.uniform(-0.4, 1.0),
      "eye_open": rng.uniform(0.35, 1.1),
      "gaze_x": rng.uniform(-1, 1),
      "gaze_y": rng.uniform(-1, 1),
      "face_height": rng.uniform(1.2, 1.45),
      "jaw_narrow": rng.uniform(0.0, 1.0),
  }


def _side_params(rng, params) -> dict:
  side = dict(params)
  side["smile"] += rng.uniform(-0.15, 0.15)
  side["brow_raise"] += rng.uniform(-0.15, 0.15)
  side["eye_open"] = float(np.clip(side["eye_open"] + rng.uniform(-0.15, 0.15), 0.2, 1.2))
  side["jaw_narrow"] = float(np.clip(side["jaw_narrow"] + rng.uniform(-0.1, 0.1), 0, 1))
  return side


def _depth(points: np.ndarray) -> np.ndarray:
  """Pseudo depth for the yaw: a rounded face plus a protruding nose."""
  z = 0.55 * np.sqrt(np.clip(1.0 - points[:, 0] ** 2, 0.0, None))
  return z


@dataclasses.dataclass
class SyntheticFace:
  image: np.ndarray          # uint8 [H, W, 3]
  landmarks: np.ndarray      # float32 [N, 2], 0-based pixel coordinates
  attributes: np.ndarray     # int64 [6], ATTRIBUTE_NAMES
  params: dict


def make_face(seed: int, index: int, num_points: int = 68,
              config: SyntheticFaceConfig = SyntheticFaceConfig()) -> SyntheticFace:
  """Renders face `index` of the stream `seed` (pure function of its arguments)."""
  scheme = schemes_lib.get_scheme(num_points)
  perm = np.asarray(scheme.flip_permutation)
  rng = np.random.default_rng([int(seed), int(index), int(num_points)])
  params = _sample_params(rng)
  left_p, right_p = _side_params(rng, params), _side_params(rng, params)
  left, left_pupil = canonical_shape(left_p, num_points)
  right, right_pupil = canonical_shape(right_p, num_points)
  pts = _combine_sides(left, right, perm)
  pts += rng.normal(0, 0.006, pts.shape)                       # per-point idiosyncrasy
  pupils = np.stack([left_pupil, right_pupil * np.array([-1.0, 1.0])])
  forehead = _forehead_points(params)
  nose_tip_idx = {68: (30, 33), 98: (54, 57)}[num_points]

  # Pseudo-3D yaw.
  yaw = np.deg2rad(rng.uniform(-config.max_yaw_deg, config.max_yaw_deg))
  def apply_yaw(q, extra=None):
    z = _depth(q) if extra is None else extra
    out = q.copy()
    out[:, 0] = q[:, 0] * np.cos(yaw) + z * np.sin(yaw)
    return out
  z = _depth(pts)
  z[list(nose_tip_idx)] += 0.25
  z[list(range(*{68: (27, 30), 98: (51, 54)}[num_points]))] += 0.12
  pts = apply_yaw(pts, z)
  pupils = apply_yaw(pupils)
  forehead = apply_yaw(forehead)

  # Similarity into the image.
  size = config.image_size
  face_w = rng.uniform(*config.face_size_range)
  roll = np.deg2rad(rng.uniform(-config.max_roll_deg, config.max_roll_deg))
  rot = np.array([[np.cos(roll), -np.sin(roll)], [np.sin(roll), np.cos(roll)]])
  centre = (size - 1) / 2 + rng.uniform(-1, 1, 2) * config.max_shift_frac * size
  centre[1] += 0.1 * face_w   # the face ellipse is centred above the landmark centre
  # Keep every landmark (and the forehead) at least 4 px inside the image: shrink the face
  # if needed, then shift it in.
  extent = np.concatenate([pts, forehead]) @ rot.T
  span = (extent.max(0) - extent.min(0)) * face_w / 2
  face_w *= min(1.0, (size - 8) / span.max())
  lo = extent.min(0) * face_w / 2 + centre
  hi = extent.max(0) * face_w / 2 + centre
  centre = centre + np.maximum(0, 4 - lo) - np.maximum(0, hi - (size - 5))
  place = lambda q: (q * (face_w / 2)) @ rot.T + centre
  pts, pupils, forehead = place(pts), place(pupils), place(forehead)
  centre_pt = place(np.zeros((1, 2)))[0]

  # --- Draw at _SUPERSAMPLE x resolution. ---
  ss = _SUPERSAMPLE
  up = lambda q: (np.asarray(q) + 0.5) * ss - 0.5
  big = size * ss
  bg = _background(rng, size)
  canvas = Image.fromarray(bg.astype(np.uint8)).resize((big, big), Image.NEAREST)
  draw = ImageDraw.Draw(canvas)
  skin = np.array([rng.uniform(150, 245), rng.uniform(100, 200), rng.uniform(70, 170)])
  skin_c = tuple(int(v) for v in skin)
  dark = tuple(int(v) for v in skin * rng.uniform(0.2, 0.45))
  lw = max(2, int(round(face_w * ss / 70)))

  contour_idx = scheme.groups["jaw" if num_points == 68 else "contour"]
  contour = pts[list(contour_idx)]
  outline = np.concatenate([_catmull_rom(contour, closed=False), forehead[1:-1]])
  draw.polygon(_xy(up(outline)), fill=skin_c)
  draw.line(_xy(up(_catmull_rom(contour, closed=False))), fill=dark, width=lw)

  # Brows.
  brow_col = tuple(int(v) for v in np.array(dark) * rng.uniform(0.4, 1.0))
  for g in ("left_brow", "right_brow"):
    b = pts[list(scheme.groups[g])]
    if num_points == 68:
      draw.line(_xy(up(_catmull_rom(b, closed=False))), fill=brow_col,
                width=max(3, int(round(face_w * ss * 0.05))), joint="curve")
    else:
      draw.polygon(_xy(up(_catmull_rom(b, closed=True))), fill=brow_col)

  # Eyes: white almond, iris clipped to it, dark lid line.
  iris_col = tuple(int(v) for v in rng.uniform(30, 140, 3))
  for g, pupil in (("left_eye", pupils[0]), ("right_eye", pupils[1])):
    e = up(_catmull_rom(pts[list(scheme.groups[g])], closed=True))
    mask = Image.new("L", (big, big), 0)
    ImageDraw.Draw(mask).polygon(_xy(e), fill=255)
    layer = Image.new("RGB", (big, big), (235, 235, 230))
    ld = ImageDraw.Draw(layer)
    r_iris = face_w * ss * 0.055
    pc = up(pupil[None])[0]
    ld.ellipse([pc[0] - r_iris, pc[1] - r_iris, pc[0] + r_iris, pc[1] + r_iris], fill=iris_col)
    ld.ellipse([pc[0] - r_iris / 2.2, pc[1] - r_iris / 2.2, pc[0] + r_iris / 2.2,
                pc[1] + r_iris / 2.2], fill=(10, 10, 10))
    canvas.paste(layer, (0, 0), mask)
    draw.line(_xy(np.concatenate([e, e[:1]])), fill=dark, width=max(2, lw // 2 + 1))

  # Nose: bridge shadow and nostril curve.
  bridge = pts[list(scheme.groups["nose_bridge"])]
  shadow = tuple(int(v) for v in skin * 0.72)
  draw.line(_xy(up(bridge)), fill=shadow, width=lw)
  nos = pts[list(scheme.groups["nostrils"])]
  draw.line(_xy(up(_catmull_rom(nos, closed=False))), fill=dark, width=lw)
  for k in (1, 3):
    c = up(nos[k:k + 1])[0]
    r = face_w * ss * 0.02
    draw.ellipse([c[0] - r, c[1] - r * 0.6, c[0] + r, c[1] + r * 0.6], fill=dark)

  # Lips: outer polygon, inner mouth (dark when open, a line when closed).
  lip_col = tuple(int(v) for v in np.clip(skin * np.array([1.0, 0.55, 0.6])
                                          * rng.uniform(0.7, 1.0), 0, 255))
  outer = pts[list(scheme.groups["outer_mouth"])]
  inner = pts[list(scheme.groups["inner_mouth"])]
  draw.polygon(_xy(up(_catmull_rom(outer, closed=True))), fill=lip_col)
  draw.line(_xy(up(_catmull_rom(np.concatenate([outer, outer[:1]]), closed=False))),
            fill=tuple(int(v * 0.7) for v in lip_col), width=max(2, lw // 2))
  inner_curve = up(_catmull_rom(inner, closed=True))
  draw.polygon(_xy(inner_curve), fill=(40, 10, 15))
  draw.line(_xy(np.concatenate([inner_curve, inner_curve[:1]])), fill=(40, 10, 15),
            width=max(2, lw // 2))

  img = np.asarray(canvas.reduce(ss), np.float32)

  # Lighting gradient over the whole image, then noise.
  ang = rng.uniform(0, 2 * np.pi)
  strength = rng.uniform(0.0, 0.6)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  proj = ((xx - centre_pt[0]) * np.cos(ang) + (yy - centre_pt[1]) * np.sin(ang)) / face_w
  img = img * np.clip(1.0 + strength * proj, 0.3, 1.7)[..., None]
  img = img + rng.normal(0, rng.uniform(1, 6), img.shape)
  img = np.clip(img, 0, 255).astype(np.uint8)
  blurred = rng.random() < config.blur_prob
  if blurred:
    img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(rng.uniform(0.7, 1.5))))

  attributes = np.array([
      abs(np.rad2deg(yaw)) > 20 or abs(np.rad2deg(roll)) > 25,
      params["mouth_open"] > 0.15 or params["smile"] > 0.7,
      strength > 0.45, 0, 0, blurred], np.int64)
  return SyntheticFace(image=img, landmarks=pts.astype(np.float32),
                       attributes=attributes, params=params)


def encode_png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()
