"""The data flags, defined once: one absl flag per DataConfig field, same name and default.

Usage (trainer, experiments):
    from data_pipelines import flags as data_flags   # defines the flags on import
    ...
    cfg = data_flags.config_from_flags()            # after absl parsed argv

Importing twice is harmless (flags are defined once per process). Do not define flags
with these names elsewhere: --dataset, --data_dir, --tfds_dir, --num_points,
--train_split, --eval_split, --batch_size, --eval_batch_size, --seed, --balancing, and the
rest of DataConfig's fields.
"""
from __future__ import annotations

import dataclasses

from absl import flags

from data_pipelines import config as config_lib

FLAGS = flags.FLAGS

_HELP = {
    "dataset": "ibug300w | wflw | pts_folder | synthetic_faces.",
    "data_dir": "Source folder in the official layout (the TFDS manual dir); unused for "
                "synthetic_faces.",
    "tfds_dir": "Where prepared data, skip reports and statistics go; empty = "
                "$TFDS_DATA_DIR or ~/tensorflow_datasets.",
    "num_points": "Landmarks per face (68: iBUG/300W, 98: WFLW).",
    "train_split": "Training split (pts_folder: all; train_fit: --val_source less val).",
    "eval_split": "Evaluation split: common/challenging/full (300W), test or test_<attr> "
                  "(WFLW), test (synthetic), all (pts_folder); val: carved from "
                  "--val_source (see --val_fraction).",
    "batch_size": "GLOBAL training batch; each host gets batch_size // process_count.",
    "eval_batch_size": "GLOBAL evaluation batch.",
    "seed": "Seed of the sampling and augmentation stream, and of --box_jitter.",
    "balancing": "gdb (Mahalanobis, paper 3.4) | pdb (first principal axis) | none.",
    "gdb_components": "GDB: PCA components K of the Mahalanobis distance.",
    "gdb_mapping": "GDB: weight = d (linear, default) | d**2 (square) | d**0.5 (sqrt).",
    "val_fraction": "Fraction of --val_source's faces carved out as the split 'val' (the "
                    "rest: 'train_fit'), chosen by hashing file ids with --val_seed; 0 = "
                    "no carve.",
    "val_seed": "Seed of the val / train_fit carve (independent of --seed).",
    "val_source": "The split carved into train_fit and val (pts_folder: all).",
    "flip_label_shift": "The labels' x offset from the image content, in image pixels; "
                        "mirrored faces keep it (300W: experiments.estimate_flip_shift).",
    "box_jitter": "Evaluation only: move each face box by U(-F, F) x its size and resize "
                  "it by 1 + U(-F, F), seeded by --seed and the file id; 0 = off.",
    "skip_bad": "Skip (count and report) bad annotations/images instead of failing.",
    "num_parallel_calls": "tf.data parallel map calls; -1 = AUTOTUNE.",
    "train_cache_mb": "Training photos decoded once and kept in memory (uint8, the region "
                      "of each face any augmented crop can read) up to this many MB; each "
                      "batch is then warped from the cache in one XLA program. Over it, or "
                      "0: each sample decodes its photo (slower).",
}

_DEFINED = False


def define_from_dataclass(cls, help_: dict, *, names=None, enums=None, defaults=None) -> None:
  """One absl flag per field of dataclass `cls` (or per field in `names`): the field's
  name, its default (or `defaults[name]`), the flag type from the default's type (bool,
  int, float, str; a tuple becomes a comma-separated list), `enums[name]` as the choices
  of a string field, the help text from `help_` (or a pointer to the dataclass)."""
  enums, defaults = enums or {}, defaults or {}
  for f in dataclasses.fields(cls):
    if names is not None and f.name not in names:
      continue
    default = defaults.get(f.name, f.default)
    text = help_.get(f.name, f"{cls.__name__}.{f.name} (see {cls.__module__}).")
    if f.name in enums:
      flags.DEFINE_enum(f.name, default, list(enums[f.name]), text)
    elif isinstance(default, bool):
      flags.DEFINE_boolean(f.name, default, text)
    elif isinstance(default, int):
      flags.DEFINE_integer(f.name, default, text)
    elif isinstance(default, float):
      flags.DEFINE_float(f.name, default, text)
    elif isinstance(default, str):
      flags.DEFINE_string(f.name, default, text)
    elif isinstance(default, tuple):
      flags.DEFINE_list(f.name, [str(x) for x in default], text)
    else:
      raise TypeError(f"{cls.__name__}.{f.name}: no flag type for {type(default)}")


def _define():
  global _DEFINED
  if _DEFINED or "dataset" in FLAGS:
    _DEFINED = True
    return
  define_from_dataclass(config_lib.DataConfig, _HELP)
  _DEFINED = True


_define()


# Per-dataset defaults used when the flag was not given on the command line.
_DATASET_DEFAULTS = {
    "wflw": {"num_points": 98, "eval_split": "test"},
    "synthetic_faces": {"eval_split": "test"},
    "pts_folder": {"train_split": "all", "eval_split": "all", "val_source": "all"},
}


def config_from_flags(**overrides) -> config_lib.DataConfig:
  """DataConfig from the parsed absl flags (plus keyword overrides), validated.

  Flags not given on the command line take per-dataset defaults: wflw -> --num_points=98,
  --eval_split=test; synthetic_faces -> --eval_split=test; pts_folder -> --train_split=all,
  --eval_split=all, --val_source=all.
  """
  values = {f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(config_lib.DataConfig)}
  dataset = overrides.get("dataset", values["dataset"])
  for name, value in _DATASET_DEFAULTS.get(dataset, {}).items():
    if not FLAGS[name].present:
      values[name] = value
  values.update(overrides)
  return config_lib.validate(config_lib.DataConfig(**values))
