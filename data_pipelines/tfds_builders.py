"""tensorflow-datasets builders reading local folders (manual dir; nothing is downloaded).

Builders: `ibug300w`, `wflw`, `pts_folder`, `synthetic_faces`. Each example stores
  image       the encoded file bytes (JPEG/PNG as found; synthetic: PNG)
  landmarks   float32 [N, 2], 0-based, original image coordinates
  box         float32 [4] x0 y0 x1 y1 face box (300W/pts/synthetic: landmark box;
              WFLW: the annotation box)
  attributes  int64 [6] WFLW attribute flags (pose, expression, illumination, make-up,
              occlusion, blur); zeros where unknown
  subsets     int64 [6] WFLW: 1 where the face is on that official attribute test list
  file_id     text, path relative to the source folder without extension (WFLW:
              "<image>#<k>", k-th face of that image in the list)
  source      text, the stored split / source folder

The builder config is made per source (see `make_config`): its name holds a fingerprint
of the source folder, so a changed source gets a fresh config directory and is prepared
again automatically; an unchanged one is reused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os

import inspect

import numpy as np
from data_pipelines.tf_setup import tf  # noqa: F401  (first: hides GPUs)
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from data_pipelines import readers
from data_pipelines import sources
from data_pipelines import synthetic_faces
from musica_jax import atomic_io
from musica_jax import strict_json

_VERSION = tfds.core.Version("1.0.0")

# TFDS reserves "all" as a split name: pts_folder's split "all" is stored as "all_faces".
_STORED = {"all": "all_faces"}


def stored_split_name(split: str) -> str:
  return _STORED.get(split, split)


def public_split_name(stored: str) -> str:
  return {v: k for k, v in _STORED.items()}.get(stored, stored)


@dataclasses.dataclass(eq=False)
class MusicaBuilderConfig(tfds.core.BuilderConfig):
  source_dir: str = ""
  num_points: int = 68
  skip_bad: bool = False
  report_path: str = ""
  synthetic_train_size: int = 0
  synthetic_test_size: int = 0
  synthetic_image_size: int = 192
  synthetic_seed: int = 0


def _features(num_points: int):
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "landmarks": tfds.features.Tensor(shape=(num_points, 2), dtype=np.float32),
      "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
      "attributes": tfds.features.Tensor(shape=(6,), dtype=np.int64),
      "subsets": tfds.features.Tensor(shape=(6,), dtype=np.int64),
      "file_id": tfds.features.Text(),
      "source": tfds.features.Text(),
  })


def _example(item: sources.FaceItem) -> dict:
  with open(item.image_path, "rb") as f:
    encoded = f.read()
  return {
      "image": io.BytesIO(encoded), "landmarks": item.landmarks.astype(np.float32),
      "box": item.box.astype(np.float32), "attributes": item.attributes.astype(np.int64),
      "subsets": item.subsets.astype(np.int64), "file_id": item.file_id,
      "source": item.source,
  }


def _write_report(config: MusicaBuilderConfig, scan: sources.ScanResult):
  if not config.report_path:
    return
  os.makedirs(os.path.dirname(config.report_path), exist_ok=True)
  report = {
      "source_dir": config.source_dir,
      "stored_splits": {k: len(v) for k, v in scan.splits.items()},
      "skipped": scan.skips.items,
      "notes": scan.notes,
  }
  atomic_io.write(config.report_path, lambda f: strict_json.dump(report, f, indent=1))


class _LocalBuilder(tfds.core.GeneratorBasedBuilder):
  """Base of our builders.

  TFDS's own `code_path` needs the `importlib_resources` package for builders defined
  outside tensorflow_datasets, which this environment lacks; our builders live in plain
  files, so the file path is all it needs.
  """

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(inspect.getfile(cls))


class _FolderBuilder(_LocalBuilder):
  """Shared parts: features, manual dir, report."""
  VERSION = _VERSION
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Point --data_dir at the local folder (official layout)."

  def _info(self):
    return self.dataset_info_from_configs(features=_features(self.builder_config.num_points))

  def _scan(self, root: str) -> sources.ScanResult:
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    root = str(dl_manager.manual_dir)
    scan = self._scan(root)
    _write_report(self.builder_config, scan)
    return {stored_split_name(name): self._generate_examples(items)
            for name, items in scan.splits.items()}

  def _generate_examples(self, items):
    for item in items:
      yield item.file_id, _example(item)


with tfds.core.registered.skip_registration():

  class Ibug300w(_FolderBuilder):
    """300W (official folder layout); stored splits = source folders."""
    name = "ibug300w"

    def _scan(self, root):
      return sources.scan_ibug300w(root, self.builder_config.skip_bad)

  class Wflw(_FolderBuilder):
    """WFLW (official layout): train and test; attribute subsets as `subsets` flags."""
    name = "wflw"

    def _scan(self, root):
      return sources.scan_wflw(root, self.builder_config.skip_bad)

  class PtsFolder(_FolderBuilder):
    """Any tree of images with `.pts` beside them: one split "all"."""
    name = "pts_folder"

    def _scan(self, root):
      c = self.builder_config
      return sources.scan_pts_folder(root, c.num_points, c.skip_bad)

  class SyntheticFaces(_LocalBuilder):
    """Procedural faces (synthetic_faces.py), generated locally: train and test."""
    name = "synthetic_faces"
    VERSION = _VERSION

    def _info(self):
      return self.dataset_info_from_configs(features=_features(self.builder_config.num_points))

    def _split_generators(self, dl_manager):
      c = self.builder_config
      # Test faces use indices after the training ones: the two never overlap.
      return {"train": self._generate_examples(0, c.synthetic_train_size),
              "test": self._generate_examples(c.synthetic_train_size, c.synthetic_test_size)}

    def _generate_examples(self, start, count):
      c = self.builder_config
      face_cfg = synthetic_faces.SyntheticFaceConfig(image_size=c.synthetic_image_size)
      for index in range(start, start + count):
        face = synthetic_faces.make_face(c.synthetic_seed, index, c.num_points, face_cfg)
        box = np.concatenate([face.landmarks.min(0), face.landmarks.max(0)]).astype(np.float32)
        yield f"{index:07d}", {
            "image": io.BytesIO(synthetic_faces.encode_png(face.image)),
            "landmarks": face.landmarks, "box": box,
            "attributes": face.attributes, "subsets": np.zeros(6, np.int64),
            "file_id": f"synthetic_{c.synthetic_seed}_{index:07d}", "source": "synthetic",
        }


BUILDERS = {"ibug300w": Ibug300w, "wflw": Wflw, "pts_folder": PtsFolder,
            "synthetic_faces": SyntheticFaces}


def make_config(dataset: str, data_dir: str, num_points: int, skip_bad: bool,
                tfds_dir: str, synthetic: dict | None = None) -> MusicaBuilderConfig:
  """The builder config for one source; its name changes whenever the source does."""
  if dataset not in BUILDERS:
    raise ValueError(f"--dataset: unknown dataset {dataset!r}; known: {sorted(BUILDERS)}")
  if dataset == "synthetic_faces":
    s = synthetic or {}
    key = json.dumps({"v": sources.FORMAT_VERSION, "n": num_points, **s}, sort_keys=True)
    name = f"p{num_points}_" + hashlib.sha1(key.encode()).hexdigest()[:12]
    fields = {f"synthetic_{k}": v for k, v in s.items()}
    source_dir = ""
  else:
    if not os.path.isdir(data_dir):
      raise readers.DataError(data_dir or "--data_dir",
                              f"not a directory (--data_dir for --dataset={dataset})")
    if not any(os.scandir(data_dir)):
      raise readers.DataError(data_dir, f"empty directory (--data_dir for --dataset={dataset})")
    source_dir = os.path.abspath(data_dir)
    fp = sources.fingerprint(source_dir, f"{num_points}|{skip_bad}")
    name = f"p{num_points}_{'skip' if skip_bad else 'strict'}_{fp}"
    fields = {}
  report = os.path.join(tfds_dir, "musica_reports", dataset, name + ".json")
  return MusicaBuilderConfig(name=name, version=_VERSION, source_dir=source_dir,
                             num_points=num_points, skip_bad=skip_bad, report_path=report,
                             description=f"{dataset} from {source_dir or 'generator'}",
                             **fields)


def prepared_builder(dataset: str, config: MusicaBuilderConfig, tfds_dir: str):
  """Returns the builder, preparing the data first if this config is not on disk yet."""
  # Reuses the prepared data when this config (source fingerprint) is already on disk.
  dl_config = tfds.download.DownloadConfig(
      manual_dir=config.source_dir or None,
      download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  # Two runs started together on one machine would both prepare the same config and the
  # second rename fails ("Directory not empty"): one prepares, the others wait, then reuse.
  # The builder is made inside the lock: one made before it reads the dataset info of a
  # folder not yet prepared (no splits) and keeps it after the other process finishes.
  with _preparation_lock(os.path.join(tfds_dir, "musica_locks", f"{dataset}_{config.name}")):
    builder = BUILDERS[dataset](config=config, data_dir=tfds_dir)
    builder.download_and_prepare(download_config=dl_config)
  return builder


@contextlib.contextmanager
def _preparation_lock(path: str):
  """An exclusive lock on the file `path` (created) while preparing; says when it waits.
  Where the lock file cannot be made (a read-only data folder of prepared data on a
  cluster) there is nothing to prepare either: it goes on without the lock."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    f = open(path + ".lock", "a")  # noqa: SIM115  (closed below)
  except OSError:
    yield
    return
  with f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"waiting for another process preparing the data ({path}.lock)", flush=True)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
