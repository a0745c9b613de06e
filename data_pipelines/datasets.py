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
  every dataset, with --val_fraction > 0: val and train_fit, a seeded carve of
            --val_source (default train; see `carve`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

import numpy as np
from data_pipelines.tf_setup import tf  # noqa: F401  (first: hides GPUs)
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


def hash_uniforms(file_ids, seed: int, salt: str, count: int = 1) -> np.ndarray:
  """float64 [M, count] uniforms in [0, 1), each a function of (seed, salt, file id) only:
  the same face gets the same numbers whatever the order or the other faces."""
  if not 1 <= count <= 4:
    raise ValueError(f"hash_uniforms: 1 to 4 numbers per face, asked {count}")
  out = np.empty((len(file_ids), count), np.float64)
  for i, f in enumerate(file_ids):
    digest = hashlib.sha256(f"{seed}|{salt}|{f}".encode()).digest()
    words = np.frombuffer(digest, ">u8")[:count] >> np.uint64(11)   # 53 bits each
    out[i] = words.astype(np.float64) / float(1 << 53)
  return out


def val_count(num_faces: int, fraction: float) -> int:
  """Faces carved into `val`: round(fraction * M), at least 1 and leaving at least 1."""
  if fraction <= 0 or num_faces < 2:
    return 0
  return int(min(max(round(fraction * num_faces), 1), num_faces - 1))


def photo_id(file_id: str) -> str:
  """The photo a face comes from: faces of one photo go to the same side of the carve.
  300W AFW/HELEN name the k-th face of photo <id> `<id>_<k>`; WFLW file ids are
  `<image>#<k>`; anything else is its own photo."""
  m = re.fullmatch(r"(.*)#\d+", file_id)
  if m:
    return m.group(1)
  m = re.fullmatch(r"(.*/)?(\d+)_\d+", file_id)
  return f"{m.group(1) or ''}{m.group(2)}" if m else file_id


def carve(file_ids, fraction: float, seed: int) -> np.ndarray:
  """bool [M]: True for the faces of `val`. Photos (photo_id) in the order of a hash of
  (seed, photo id) go to val until it holds val_count(M, fraction) faces (a photo with k
  faces can overshoot by k - 1). A function of the set of file ids and the seed only."""
  ids = [str(f) for f in file_ids]
  target = val_count(len(ids), fraction)
  photos = sorted({photo_id(f) for f in ids})
  keys = hash_uniforms(photos, seed, "val")[:, 0]
  faces_of = {}
  for i, f in enumerate(ids):
    faces_of.setdefault(photo_id(f), []).append(i)
  mask = np.zeros(len(ids), bool)
  taken = 0
  for j in sorted(range(len(photos)), key=lambda j: (keys[j], photos[j])):
    if taken >= target:
      break
    mask[faces_of[photos[j]]] = True
    taken += len(faces_of[photos[j]])
  if target and mask.all():   # one photo holds every face: nothing would be left to train
    raise ValueError(f"cannot carve a validation split: all {len(ids)} faces share a photo")
  return mask


def _is_carved(split: str) -> bool:
  return split in (config_lib.VAL_SPLIT, config_lib.FIT_SPLIT)


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
  """(TFDS split expression, WFLW subset flag index or None) for a named split (for the
  carved splits: that of --val_source)."""
  if _is_carved(split):
    if cfg.val_fraction <= 0:
      raise readers.SplitError(f"split {split!r} needs --val_fraction > 0")
    return split_spec(cfg, cfg.val_source)
  builder = prepare(cfg)
  stored = set(builder.info.splits.keys())
  if cfg.dataset == "ibug300w":
    if split in sources.IBUG300W_SPLITS:
      parts = sources.IBUG300W_SPLITS[split]
      missing = [p for p in parts if p not in stored]
      if missing:
        raise readers.SplitError(
            f"300W split {split!r} needs the folders "
            f"{[sources.IBUG300W_FOLDERS[p] for p in missing]}, not found under "
            f"{cfg.data_dir} (--data_dir)")
      return "+".join(parts), None
    if split in sources.IBUG300W_FOLDERS:
      if split not in stored:
        raise readers.SplitError(f"300W folder {sources.IBUG300W_FOLDERS[split]} not found under "
                         f"{cfg.data_dir} (--data_dir)")
      return split, None
  elif cfg.dataset == "wflw" and split in sources.WFLW_SUBSETS:
    return "test", sources.WFLW_SUBSETS[split][1]
  elif tfds_builders.stored_split_name(split) in stored:
    return tfds_builders.stored_split_name(split), None
  raise readers.SplitError(f"--{cfg.dataset}: unknown split {split!r}; available: "
                   f"{available_splits(cfg)}")


def available_splits(cfg: config_lib.DataConfig) -> list[str]:
  named = _stored_named_splits(cfg)
  if (cfg.val_fraction > 0 and cfg.val_source in named
      and split_size(cfg, cfg.val_source) >= 2):
    named += [config_lib.FIT_SPLIT, config_lib.VAL_SPLIT]
  return named


def _stored_named_splits(cfg: config_lib.DataConfig) -> list[str]:
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
  if _is_carved(split):
    source = load_split(cfg, cfg.val_source, allow_empty)
    keep = carve(source.file_ids, cfg.val_fraction, cfg.val_seed)
    if split == config_lib.FIT_SPLIT:
      keep = ~keep
    if not keep.any() and not allow_empty:
      raise readers.DataError(cfg.data_dir or cfg.dataset,
                              f"empty split {split!r}: {len(source)} faces in "
                              f"--val_source={cfg.val_source}, --val_fraction="
                              f"{cfg.val_fraction:g}")
    return SplitData(name=split, images=source.images[keep],
                     landmarks=source.landmarks[keep], boxes=source.boxes[keep],
                     attributes=source.attributes[keep], file_ids=source.file_ids[keep])
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
  if _is_carved(split):   # photos are kept whole: the count needs the file ids
    return len(load_split(cfg, split, allow_empty=True))
  if cfg.dataset == "wflw" and split in sources.WFLW_SUBSETS:
    return len(load_split(cfg, split, allow_empty=True))
  builder = prepare(cfg)
  expr, _ = split_spec(cfg, split)
  return sum(builder.info.splits[p].num_examples for p in expr.split("+"))


def jitter_boxes(boxes: np.ndarray, file_ids, jitter: float, seed: int) -> np.ndarray:
  """Evaluation box jitter (DataConfig.box_jitter): float32 [M, 4]. Each box's centre moves
  by U(-jitter, jitter) x (width, height) and its size is multiplied by 1 + U(-jitter,
  jitter); the draws depend on (seed, file id) only. jitter 0: the boxes unchanged."""
  boxes = np.asarray(boxes, np.float64)
  if jitter <= 0:
    return boxes.astype(np.float32)
  u = 2.0 * hash_uniforms([str(f) for f in file_ids], seed, "box_jitter", 3) - 1.0
  size = boxes[:, 2:] - boxes[:, :2]
  centre = (boxes[:, :2] + boxes[:, 2:]) / 2.0 + jitter * u[:, :2] * size
  half = size * (1.0 + jitter * u[:, 2:3]) / 2.0
  return np.concatenate([centre - half, centre + half], 1).astype(np.float32)


def stats_path(cfg: config_lib.DataConfig, split: str) -> str:
  bc = builder_config(cfg)
  name = split
  if _is_carved(split):   # the carve is part of what the statistics are of
    name = f"{split}_{cfg.val_source}_f{cfg.val_fraction:g}_s{cfg.val_seed}"
  return os.path.join(config_lib.resolve_tfds_dir(cfg), "musica_stats", cfg.dataset,
                      bc.name, f"{name}.npz")


def compute_statistics(data: SplitData) -> dict:
  scale, offset = face_frame.crop_frames(data.boxes)
  crop = face_frame.to_crop(data.landmarks, scale, offset)
  return {"mean_shape": crop.mean(0).astype(np.float32),
          "std_shape": crop.std(0).astype(np.float32),
          "num_faces": np.int64(len(data))}
