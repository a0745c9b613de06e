"""Annotation readers: iBUG `.pts` files and WFLW annotation lists, plus image checks.

All landmarks come out 0-based with pixel centres at integers (musica_jax.face_frame):
`.pts` files are 1-based and get 1 subtracted here; WFLW lists are already 0-based.

Errors are `DataError`s naming the file (and line). Callers that were asked to skip bad
items catch them and record the skip in a `SkipLog` (counted, with reasons); nothing is
dropped silently.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Iterable

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
WFLW_NUM_POINTS = 98
WFLW_ATTRIBUTES = ("pose", "expression", "illumination", "make_up", "occlusion", "blur")


class SplitError(ValueError):
  """A split the data folder or the flags do not provide; the message names the folder or
  flag (entry points report it as one line, as any user error)."""


class DataError(ValueError):
  """A bad annotation or image; the message names the file (and line)."""

  def __init__(self, path: str, reason: str, line: int | None = None):
    where = f"{path}:{line}" if line is not None else str(path)
    super().__init__(f"{where}: {reason}")
    self.path = str(path)
    self.line = line
    self.reason = reason


@dataclasses.dataclass
class SkipLog:
  """Skipped items, counted per reason, each with the file that caused it."""
  items: list[dict] = dataclasses.field(default_factory=list)

  def add(self, path: str, reason: str, line: int | None = None, split: str | None = None):
    self.items.append({"file": str(path), "line": line, "reason": reason, "split": split})

  def add_error(self, err: DataError, split: str | None = None):
    self.add(err.path, err.reason, err.line, split)

  def __len__(self):
    return len(self.items)

  def counts(self) -> dict[str, int]:
    return dict(collections.Counter(_reason_kind(i["reason"]) for i in self.items))

  def for_split(self, split: str) -> "SkipLog":
    return SkipLog([i for i in self.items if i["split"] in (split, None)])

  def to_json(self, max_items: int = 50) -> dict:
    return {"count": len(self.items), "by_reason": self.counts(),
            "items": self.items[:max_items]}


def _reason_kind(reason: str) -> str:
  return reason.split(":")[0]


# ---------------------------------------------------------------------------------------
# iBUG .pts


def parse_pts(text: str, path: str = "<pts>",
              num_points: int | None = None) -> np.ndarray:
  """Parses the text of a `.pts` file -> float32 [N, 2], 0-based.

  Accepts the standard header (`version: 1`, `n_points: N`, `{`, N lines, `}`) or just
  the `x y` lines. Raises DataError naming `path` on any problem.
  """
  lines = [(i + 1, l.strip()) for i, l in enumerate(text.splitlines())]
  lines = [(i, l) for i, l in lines if l and not l.startswith("#")]
  declared = None
  body = []
  in_braces = None
  for lineno, l in lines:
    low = l.lower()
    if low.startswith("version"):
      continue
    if low.startswith("n_points"):
      try:
        declared = int(l.split(":", 1)[1])
      except (IndexError, ValueError):
        raise DataError(path, f"bad n_points header {l!r}", lineno) from None
      continue
    if l == "{":
      in_braces = True
      continue
    if l == "}":
      in_braces = False
      continue
    if in_braces is False:
      raise DataError(path, f"text after the closing brace: {l!r}", lineno)
    parts = l.replace(",", " ").split()
    if len(parts) != 2:
      raise DataError(path, f"expected 'x y', got {l!r}", lineno)
    try:
      body.append((float(parts[0]), float(parts[1])))
    except ValueError:
      raise DataError(path, f"not a number: {l!r}", lineno) from None
  pts = np.asarray(body, np.float64).reshape(-1, 2)
  if in_braces:
    raise DataError(path, "missing closing brace '}'")
  if declared is not None and declared != len(pts):
    raise DataError(path, f"wrong point count: header says n_points {declared}, "
                    f"file has {len(pts)} points")
  if num_points is not None and len(pts) != num_points:
    raise DataError(path, f"wrong point count: {len(pts)} points, the scheme needs "
                    f"{num_points}")
  if not np.all(np.isfinite(pts)):
    bad = np.nonzero(~np.all(np.isfinite(pts), -1))[0]
    raise DataError(path, f"non-finite coordinates at points {bad[:10].tolist()}")
  return (pts - 1.0).astype(np.float32)   # 1-based -> 0-based


def read_pts(path: str, num_points: int | None = None) -> np.ndarray:
  """Reads a `.pts` file -> float32 [N, 2], 0-based. Raises DataError naming the file."""
  try:
    with open(path, "r", encoding="utf-8", errors="strict") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(path, f"cannot read: {e}") from None
  return parse_pts(text, path, num_points)


def write_pts(path: str, points: np.ndarray) -> None:
  """Writes 0-based points as a standard 1-based `.pts` file."""
  points = np.asarray(points, np.float64) + 1.0
  with open(path, "w") as f:
    f.write(f"version: 1\nn_points: {len(points)}\n{{\n")
    for x, y in points:
      f.write(f"{x:.6f} {y:.6f}\n")
    f.write("}\n")


# ---------------------------------------------------------------------------------------
# WFLW


@dataclasses.dataclass
class WflwRecord:
  landmarks: np.ndarray          # float32 [98, 2], 0-based
  box: np.ndarray | None         # float32 [4] x0 y0 x1 y1 (None in the attribute lists)
  attributes: np.ndarray         # int64 [6] (zeros when the list has none)
  image: str                     # path relative to WFLW_images
  line: int


def parse_wflw_line(line: str, path: str = "<wflw>", lineno: int | None = None) -> WflwRecord:
  """One WFLW annotation line.

  Two formats: the main lists (196 coordinates, box x_min y_min x_max y_max, 6 attribute
  flags, image path: 207 fields) and the attribute test lists (196 coordinates, image
  path: 197 fields).
  """
  parts = line.split()
  n = 2 * WFLW_NUM_POINTS
  if len(parts) not in (n + 11, n + 1):
    raise DataError(path, f"expected {n + 11} fields (196 coordinates, 4 box, 6 "
                    f"attributes, image) or {n + 1} (coordinates, image), got "
                    f"{len(parts)}", lineno)
  try:
    nums = np.asarray([float(v) for v in parts[:-1]], np.float64)
  except ValueError as e:
    raise DataError(path, f"not a number: {e}", lineno) from None
  pts = nums[:n].reshape(WFLW_NUM_POINTS, 2)
  if not np.all(np.isfinite(pts)):
    bad = np.nonzero(~np.all(np.isfinite(pts), -1))[0]
    raise DataError(path, f"non-finite coordinates at points {bad[:10].tolist()}", lineno)
  box = None
  attrs = np.zeros(6, np.int64)
  if len(parts) == n + 11:
    box = nums[n:n + 4]
    if not (np.all(np.isfinite(box)) and box[2] > box[0] and box[3] > box[1]):
      raise DataError(path, f"bad box {box.tolist()} (need x_min < x_max, y_min < y_max)",
                      lineno)
    flags = nums[n + 4:n + 10]
    if not np.all(np.isin(flags, (0, 1))):
      raise DataError(path, f"attribute flags must be 0/1, got {flags.tolist()}", lineno)
    attrs = flags.astype(np.int64)
    box = box.astype(np.float32)
  return WflwRecord(landmarks=pts.astype(np.float32), box=box, attributes=attrs,
                    image=parts[-1], line=lineno or 0)


def read_wflw_list(path: str, skip_bad: bool = False,
                   skips: SkipLog | None = None, split: str | None = None) -> list[WflwRecord]:
  """All records of a WFLW list file. Bad lines raise, or are logged when skip_bad."""
  try:
    with open(path, "r", encoding="utf-8") as f:
      raw = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(path, f"cannot read: {e}") from None
  out = []
  for i, line in enumerate(raw, start=1):
    if not line.strip():
      continue
    try:
      out.append(parse_wflw_line(line, path, i))
    except DataError as e:
      if not skip_bad:
        raise
      if skips is not None:
        skips.add_error(e, split)
  return out


# ---------------------------------------------------------------------------------------
# Images


def check_image(path: str) -> tuple[int, int]:
  """Fully decodes an image; returns (width, height). Raises DataError naming the file."""
  if not os.path.exists(path):
    raise DataError(path, "missing image")
  try:
    with Image.open(path) as im:
      im.load()
      w, h = im.size
  except Exception as e:  # noqa: BLE001  (PIL raises many kinds for corrupt files)
    raise DataError(path, f"corrupt image: {type(e).__name__}: {e}") from None
  if w < 2 or h < 2:
    raise DataError(path, f"corrupt image: size {w}x{h}")
  return w, h


def find_images(root: str) -> Iterable[str]:
  """Image files under `root`, sorted, any depth."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for f in sorted(filenames):
      if f.lower().endswith(IMAGE_EXTENSIONS):
        out.append(os.path.join(dirpath, f))
  return out


def check_landmarks_in_image(points: np.ndarray, size: tuple[int, int], path: str,
                             tolerance: float = 0.5) -> None:
  """Landmarks far outside the image mean a wrong annotation/image pairing."""
  w, h = size
  lo = -tolerance * np.array([w, h])
  hi = (1 + tolerance) * np.array([w, h])
  if np.any(points < lo) or np.any(points > hi):
    raise DataError(path, f"landmarks far outside the {w}x{h} image")
