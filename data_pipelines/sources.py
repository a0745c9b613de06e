"""Scanning local dataset folders into per-split face lists (no TensorFlow here).

A "source" turns a folder in an official layout into `FaceItem`s per stored split, with
every skipped item logged in a `SkipLog`. The TFDS builders (tfds_builders.py) write what
the scan returns; the scan is also where all validation happens, so errors name the file.

Stored splits versus named splits: the 300W builder stores one split per source folder
(lfpw_trainset, ..., afw, ibug) and the named splits (train, common, challenging, full)
are unions of them, so nothing is stored twice. WFLW stores train and test; the six
attribute subsets are test faces with a membership flag (`subsets`), matched line by line
against the official attribute lists.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

from data_pipelines import readers
from musica_jax import face_frame

# Bump when what the builders store changes: prepared data with another version is
# rebuilt automatically.
FORMAT_VERSION = 1

IBUG300W_FOLDERS = {
    "lfpw_trainset": "lfpw/trainset",
    "helen_trainset": "helen/trainset",
    "afw": "afw",
    "lfpw_testset": "lfpw/testset",
    "helen_testset": "helen/testset",
    "ibug": "ibug",
}
IBUG300W_SPLITS = {
    "train": ("lfpw_trainset", "helen_trainset", "afw"),
    "common": ("lfpw_testset", "helen_testset"),
    "challenging": ("ibug",),
    "full": ("lfpw_testset", "helen_testset", "ibug"),
}

WFLW_LIST_DIR = "WFLW_annotations/list_98pt_rect_attr_train_test"
WFLW_ATTR_DIR = "WFLW_annotations/list_98pt_test"
WFLW_IMAGE_DIR = "WFLW_images"
# Subset split name -> (attribute list file, index into the 6 attribute flags).
WFLW_SUBSETS = {
    "test_largepose": ("list_98pt_test_largepose.txt", 0),
    "test_expression": ("list_98pt_test_expression.txt", 1),
    "test_illumination": ("list_98pt_test_illumination.txt", 2),
    "test_makeup": ("list_98pt_test_makeup.txt", 3),
    "test_occlusion": ("list_98pt_test_occlusion.txt", 4),
    "test_blur": ("list_98pt_test_blur.txt", 5),
}


@dataclasses.dataclass
class FaceItem:
  file_id: str
  image_path: str
  landmarks: np.ndarray                 # float32 [N, 2], 0-based image coordinates
  box: np.ndarray                       # float32 [4] x0 y0 x1 y1, image coordinates
  attributes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(6, np.int64))
  subsets: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(6, np.int64))
  source: str = ""


@dataclasses.dataclass
class ScanResult:
  splits: dict[str, list[FaceItem]]     # stored split -> faces
  skips: readers.SkipLog
  notes: list[str] = dataclasses.field(default_factory=list)


def fingerprint(root: str, extra: str = "") -> str:
  """A short hash of every file under `root` (relative path, size, mtime) plus `extra`."""
  h = hashlib.sha1()
  h.update(f"v{FORMAT_VERSION}|{os.path.abspath(root)}|{extra}".encode())
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for f in sorted(filenames):
      p = os.path.join(dirpath, f)
      try:
        st = os.stat(p)
      except OSError as e:   # a broken link or symlink loop: the reader skips or names it
        h.update(f"{os.path.relpath(p, root)}|unreadable {e.errno}\n".encode())
        continue
      h.update(f"{os.path.relpath(p, root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:12]


def _check_dir(path: str, what: str):
  if not path:
    raise readers.DataError("--data_dir", f"empty: set it to the {what} folder")
  if not os.path.isdir(path):
    raise readers.DataError(path, f"not a directory (expected the {what} folder; --data_dir)")


def _annotated_item(image_path: str, pts_path: str, root: str, num_points: int,
                    source: str) -> FaceItem:
  points = readers.read_pts(pts_path, num_points)
  size = readers.check_image(image_path)
  readers.check_landmarks_in_image(points, size, pts_path)
  box = face_frame.box_from_landmarks(points).astype(np.float32)
  face_frame.validate_box(box, pts_path)
  rel = os.path.splitext(os.path.relpath(image_path, root))[0]
  return FaceItem(file_id=rel, image_path=image_path, landmarks=points, box=box, source=source)


def _scan_pts_tree(folder: str, root: str, num_points: int, skip_bad: bool,
                   skips: readers.SkipLog, split: str, source: str) -> list[FaceItem]:
  """Every image with a .pts beside it under `folder` (any depth)."""
  items = []
  images = readers.find_images(folder)
  stems = {os.path.splitext(p)[0] for p in images}
  for image_path in images:
    pts_path = os.path.splitext(image_path)[0] + ".pts"
    if not os.path.exists(pts_path):
      # Not a bad item: an image nobody annotated. Counted, never fatal.
      skips.add(image_path, "no_annotation: no .pts beside the image", split=split)
      continue
    try:
      items.append(_annotated_item(image_path, pts_path, root, num_points, source))
    except readers.DataError as e:
      if not skip_bad:
        raise
      skips.add_error(e, split)
  for dirpath, _, filenames in os.walk(folder):
    for f in sorted(filenames):
      if f.endswith(".pts") and os.path.join(dirpath, f[:-4]) not in stems:
        e = readers.DataError(os.path.join(dirpath, f), "missing image: .pts without an image")
        if not skip_bad:
          raise e
        skips.add_error(e, split)
  return items


def ibug300w_parts(split: str) -> tuple[str, ...]:
  """The 300W source folders (IBUG300W_FOLDERS keys) of a named or stored split."""
  if split in IBUG300W_SPLITS:
    return IBUG300W_SPLITS[split]
  if split in IBUG300W_FOLDERS:
    return (split,)
  raise readers.DataError("--split", f"unknown 300W split {split!r}; known: "
                          f"{sorted(IBUG300W_SPLITS)} + {sorted(IBUG300W_FOLDERS)}")


def scan_ibug300w(root: str, skip_bad: bool = False, parts=None) -> ScanResult:
  """300W in the official layout: one stored split per source folder present (`parts`:
  only these folders, each of which must then exist)."""
  _check_dir(root, "300W")
  skips = readers.SkipLog()
  splits, notes = {}, []
  for name, rel in IBUG300W_FOLDERS.items():
    if parts is not None and name not in parts:
      continue
    if parts is not None and not os.path.isdir(os.path.join(root, rel)):
      raise readers.DataError(os.path.join(root, rel), "300W folder not found (--data_dir)")
    folder = os.path.join(root, rel)
    if not os.path.isdir(folder):
      notes.append(f"300W folder {rel} not found under {root}")
      continue
    items = _scan_pts_tree(folder, root, 68, skip_bad, skips, name, name)
    if not items:
      raise readers.DataError(folder, "empty split: no annotated faces in this 300W folder")
    splits[name] = items
  if not splits:
    raise readers.DataError(root, "no 300W folders found (expected some of "
                            f"{sorted(IBUG300W_FOLDERS.values())}; --data_dir)")
  return ScanResult(splits, skips, notes)


def scan_pts_folder(root: str, num_points: int, skip_bad: bool = False) -> ScanResult:
  """Any tree of images with .pts files beside them: one split, "all"."""
  _check_dir(root, "images-with-.pts")
  skips = readers.SkipLog()
  items = _scan_pts_tree(root, root, num_points, skip_bad, skips, "all", "pts_folder")
  if not items:
    raise readers.DataError(root, f"empty split: no image with a {num_points}-point .pts "
                            "beside it under this folder")
  return ScanResult({"all": items}, skips)


def _wflw_items(root: str, list_path: str, split: str, skip_bad: bool,
                skips: readers.SkipLog) -> list[FaceItem]:
  records = readers.read_wflw_list(list_path, skip_bad, skips, split)
  items, per_image = [], {}
  for rec in records:
    image_path = os.path.join(root, WFLW_IMAGE_DIR, rec.image)
    k = per_image.get(rec.image, 0)
    per_image[rec.image] = k + 1
    where = f"{list_path}:{rec.line}"
    if not os.path.exists(image_path):
      skips.add(image_path, "missing image", rec.line, split)   # always counted
      continue
    try:
      size = readers.check_image(image_path)
      readers.check_landmarks_in_image(rec.landmarks, size, where)
    except readers.DataError as e:
      if not skip_bad:
        raise
      skips.add_error(e, split)
      continue
    items.append(FaceItem(
        file_id=f"{os.path.splitext(rec.image)[0]}#{k}", image_path=image_path,
        landmarks=rec.landmarks, box=rec.box, attributes=rec.attributes, source=split))
  return items


def scan_wflw(root: str, skip_bad: bool = False) -> ScanResult:
  """WFLW in the official layout: train, test; attribute subsets as flags on test faces."""
  _check_dir(root, "WFLW")
  skips = readers.SkipLog()
  splits = {}
  for split in ("train", "test"):
    path = os.path.join(root, WFLW_LIST_DIR, f"list_98pt_rect_attr_{split}.txt")
    if not os.path.exists(path):
      raise readers.DataError(path, f"missing WFLW {split} list (official layout expected "
                              "under --data_dir)")
    items = _wflw_items(root, path, split, skip_bad, skips)
    if not items:
      raise readers.DataError(path, f"empty split {split}: no face with an existing image "
                              f"({len(skips.for_split(split))} skipped)")
    splits[split] = items
  notes = []
  by_image = {}
  for i, item in enumerate(splits["test"]):
    by_image.setdefault(os.path.relpath(item.image_path, os.path.join(root, WFLW_IMAGE_DIR)),
                        []).append(i)
  for subset, (fname, flag) in WFLW_SUBSETS.items():
    path = os.path.join(root, WFLW_ATTR_DIR, fname)
    if not os.path.exists(path):
      notes.append(f"attribute list {path} not found: split {subset} unavailable")
      continue
    for rec in readers.read_wflw_list(path, skip_bad, skips, subset):
      match = None
      for i in by_image.get(rec.image, []):
        if np.max(np.abs(splits["test"][i].landmarks - rec.landmarks)) < 1e-3:
          match = i
          break
      if match is not None:
        splits["test"][match].subsets[flag] = 1
      elif not os.path.exists(os.path.join(root, WFLW_IMAGE_DIR, rec.image)):
        skips.add(os.path.join(root, WFLW_IMAGE_DIR, rec.image), "missing image", rec.line,
                  subset)
      else:
        skips.add(f"{path}", "not_in_test_list: attribute-list face not found in the test "
                  "list", rec.line, subset)
  return ScanResult(splits, skips, notes)
