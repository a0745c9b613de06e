"""Prepared datasets held in memory: split names, loading, reports, cached statistics.

The input pipeline works from in-memory arrays of one split (encoded image bytes,
landmarks, boxes): random access by example index is what makes the training stream a
pure function of (seed, step) and resuming exact. Memory is the size of the encoded
images (300W train: ~40 MB); full WFLW train is ~1 GB of JPEGs.

Named splits per dataset:
  ibug300w: train, common, challenging, full (unions of source folders; only those whose
            folders are all present) and each source folder alone (lfpw_trainset, ...).
  wflw: train, test, test_largepose, test_expression, test_illumination, test_makeup,
        test_occlusion, test_blur (attribute subsets of test).
  pts_folder: all.
  synthetic_faces: train, test.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipelines import config as config_lib
from data_pipelines import readers
from data_pipelines import sources
from data_pipelines import tfds_builders
from musica_jax import face_frame

tfds.disable_progress_bar()


@dataclasses.dataclass
class SplitData:
  """One split in memory, sorted by file_id (a fixed order, whatever TFDS's order)."""
  name: str
  images: np.ndarray       # object [M] encoded bytes
  landmarks: np.ndarray    # float32 [M, N, 2] image coordinates
  boxes: np.ndarray        # float32 [M, 4] face boxes, image coordinates
  attributes: np.ndarray   # int64 [M, 6]
  file_ids: np.ndarray     # object [M] str

  def __len__(self):
    return len(self.file_ids)


def _synthetic_fields(cfg) -> dict:
  return {"train_size": cfg.synthetic_train_size, "test_size": cfg.synthetic_test_size,
          "image_size": cfg.synthetic_image_size, "seed": cfg.synthetic_seed}


def builder_config(cfg: config_lib.DataConfig) -> tfds_builders.MusicaBuilderConfig:
  config_lib.validate(cfg)
  return tfds_builders.make_config(
      cfg.dataset, cfg.data_dir, cfg.num_points, cfg.skip_bad,
      config_lib.resolve_tfds_dir(cfg), _synthetic_fields(cfg))


# In-process caches keyed by (dataset, builder config name, tfds_dir): the config name
# holds the source fingerprint, so a changed source misses the cache.
_BUILDERS: dict = {}
_ARRAYS: dict = {}


def prepare(cfg: config_lib.DataConfig):
  """Prepares the data if needed (cheap when already prepared); returns the builder."""
  bc = builder_config(cfg)
  tfds_dir = config_lib.resolve_tfds_dir(cfg)
  key = (cfg.dataset, bc.name, tfds_dir)
  if key not in _BUILDERS:
    _BUILDERS[key] = tfds_builders.prepared_builder(cfg.dataset, bc, tfds_dir)
  return _BUILDERS[key]


def report(cfg: config_lib.DataConfig) -> dict:
  """What the preparation of this source skipped (empty for synthetic data)."""
  bc = builder_config(cfg)
  prepare(cfg)
  if cfg.dataset == "synthetic_faces" or not os.path.exists(bc.report_path):
    return {"skipped": [], "notes": [], "stored_splits": {}}
  with open(bc.report_path) as f:
    return json.load(f)


def split_spec(cfg: config_lib.DataConfig, split: str) -> tuple[str, int | None]:
  """(TFDS split expression, WFLW subset flag index or None) for a named split."""
  builder = prepare(cfg)
  stored = set(builder.info.splits.keys())
  if cfg.dataset == "ibug300w":
    if split in sources.IBUG300W_SPLITS:
      parts = sources.IBUG300W_SPLITS[split]
      missing = [p for p in parts if p not in stored]
      if missing:
        raise ValueError(
            f"300W split {split!r} needs the folders "
            f"{[sources.IBUG300W_FOLDERS[p] for p in missing]}, not found under "
            f"{cfg.data_dir} (--data_dir)")
      return "+".join(parts), None
    if split in sources.IBUG300W_FOLDERS:
      if split not in stored:
        raise ValueError(f"300W folder {sources.IBUG300W_FOLDERS[split]} not found under "
                         f"{cfg.data_dir} (--data_dir)")
      return split, None
  elif cfg.dataset == "wflw" and split in sources.WFLW_SUBSETS:
    return "test", sources.WFLW_SUBSETS[split][1]
  elif tfds_builders.stored_split_name(split) in stored:
    return tfds_builders.stored_split_name(split), None
  raise ValueError(f"--{cfg.dataset}: unknown split {split!r}; available: "
                   f"{available_splits(cfg)}")


def available_splits(cfg: config_lib.DataConfig) -> list[str]:
  builder = prepare(cfg)
  stored = list(builder.info.splits.keys())
  if cfg.dataset == "ibug300w":
    named = [s for s, parts in sources.IBUG300W_SPLITS.items()
             if all(p in stored for p in parts)]
    return named + [s for s in sources.IBUG300W_FOLDERS if s in stored]
  if cfg.dataset == "wflw":
    return stored + list(sources.WFLW_SUBSETS)
  return [tfds_builders.public_split_name(s) for s in stored]


def _load(builder, num_points: int, split_expr: str, subset: int | None) -> dict:
  ds = builder.as_dataset(split=split_expr, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  cols = {k: [] for k in ("image", "landmarks", "box", "attributes", "subsets", "file_id")}
  for ex in ds.batch(256).as_numpy_iterator():
    for k in cols:
      cols[k].extend(list(ex[k]))
  file_ids = np.array([f.decode() if isinstance(f, bytes) else f for f in cols["file_id"]],
                      dtype=object)
  order = np.argsort(file_ids, kind="stable")
  keep = order
  if subset is not None:
    flags = np.asarray(cols["subsets"], np.int64).reshape(-1, 6)
    keep = order[flags[order, subset] == 1]
  n = num_points
  images = np.empty(len(keep), dtype=object)
  images[:] = [cols["image"][i] for i in keep]
  return {
      "images": images,
      "landmarks": np.asarray(cols["landmarks"], np.float32).reshape(-1, n, 2)[keep],
      "boxes": np.asarray(cols["box"], np.float32).reshape(-1, 4)[keep],
      "attributes": np.asarray(cols["attributes"], np.int64).reshape(-1, 6)[keep],
      "file_ids": file_ids[keep],
  }


def load_split(cfg: config_lib.DataConfig, split: str, allow_empty: bool = False) -> SplitData:
  """The faces of a named split, in memory. An empty split is an error."""
  bc = builder_config(cfg)
  expr, subset = split_spec(cfg, split)
  key = (cfg.dataset, bc.name, config_lib.resolve_tfds_dir(cfg), expr, subset)
  if key not in _ARRAYS:
    _ARRAYS[key] = _load(prepare(cfg), cfg.num_points, expr, subset)
  data = SplitData(name=split, **_ARRAYS[key])
  if not len(data) and not allow_empty:
    skipped = [s for s in report(cfg)["skipped"] if s.get("split") == split]
    raise readers.DataError(
        cfg.data_dir or cfg.dataset,
        f"empty split {split!r} ({len(skipped)} faces skipped, e.g. "
        f"{skipped[0]['reason'] + ': ' + skipped[0]['file'] if skipped else 'none'})")
  return data


def split_size(cfg: config_lib.DataConfig, split: str) -> int:
  if cfg.dataset == "wflw" and split in sources.WFLW_SUBSETS:
    return len(load_split(cfg, split, allow_empty=True))
  builder = prepare(cfg)
  expr, _ = split_spec(cfg, split)
  return sum(builder.info.splits[p].num_examples for p in expr.split("+"))


def crop_frames(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per face (scale [M], offset [M, 2]) of the crop transform (face_frame)."""
  scale, offset = face_frame.crop_transform(np.asarray(boxes, np.float64))
  return scale.astype(np.float32), offset.astype(np.float32)


def stats_path(cfg: config_lib.DataConfig, split: str) -> str:
  bc = builder_config(cfg)
  return os.path.join(config_lib.resolve_tfds_dir(cfg), "musica_stats", cfg.dataset,
                      bc.name, f"{split}.npz")


def compute_statistics(data: SplitData) -> dict:
  scale, offset = crop_frames(data.boxes)
  crop = face_frame.to_crop(data.landmarks, scale, offset)
  return {"mean_shape": crop.mean(0).astype(np.float32),
          "std_shape": crop.std(0).astype(np.float32),
          "num_faces": np.int64(len(data))}
