"""The flags of the config dataclasses, defined once, on import: model, training, loop, data.

One absl flag per field, with the field's name and default (`flag_defs.define_from_dataclass`):
- model: --num_patches (a patch subset of the scheme, 0 = all; `config.for_scheme`) and
  the `ModelConfig` fields in MODEL_FIELDS, defaults from `ModelConfig()`;
- training: every `TrainConfig` field but `seed` (the data flag --seed sets it);
- loop: every `LoopConfig` field (cadence of experiments/train_lib.py);
  these three dataclasses are in `musica_jax/config.py`;
- data: every `DataConfig` field (`data_pipelines/config.py`): --dataset, --data_dir,
  --tfds_dir, --num_points, --train_split, --eval_split, --batch_size, --seed, ...;
  `data_config_from_flags` adds the per-dataset defaults.
A new field of these dataclasses becomes a flag by adding its help text below (and, for a
model field, its name to MODEL_FIELDS); a data field without one gets a pointer to
DataConfig. Range checks are the entry point's (experiments/train.py); the dataclasses
validate what they own. `experiments.common` imports this module, so every program
accepts the same flagfiles; do not define flags with these names elsewhere.
"""
from __future__ import annotations

import dataclasses

from absl import flags

from data_pipelines import config as data_config
from experiments import flag_defs
from musica_jax import config as config_lib
from musica_jax import schemes

FLAGS = flags.FLAGS

MODEL_FIELDS = ("levels", "use_attention", "extractor", "global_attention", "hidden_size",
                "recurrent_rank", "stage_patches")
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(config_lib.TrainConfig)
                     if f.name != "seed")
LOOP_FIELDS = tuple(f.name for f in dataclasses.fields(config_lib.LoopConfig))

_HELP = {
    # model
    "num_patches": "Patches per iteration (0 = one per landmark). Built-in subsets: "
                   "68/34/23/19 (68 points), 98/49/44 (98 points).",
    "levels": "Pyramid level read by each iteration.",
    "use_attention": "Local patch attention (paper 3.1).",
    "extractor": "Per-patch feature extractor: two 3x3 convs (the paper's) or MobileNetV2 "
                 "inverted bottlenecks (paper Table 4 ablation).",
    "global_attention": "Global patch attention over all patches of a face: none, fc or gcn "
                        "(k-nearest-patch graph; paper Table 4 ablation).",
    "hidden_size": "Recurrent state size.",
    "recurrent_rank": "Rank of the recurrent FC's kernel: 0 = one dense [P*D + H, H] kernel "
                      "(the paper's); r > 0 = factors u [P*D + H, r] @ v [r, H], computed as "
                      "(x @ u) @ v (fewer weights and MACs; fine-tune from a dense model with "
                      "--init_from).",
    "stage_patches": "Patches each iteration reads, one count per iteration (e.g. 9,17,34 "
                     "of 34: cheap coarse iterations, spread evenly over the patch list); "
                     "empty = all patches every iteration (the paper's). May differ from "
                     "--init_from's model.",
    # training
    "steps": "Total training steps.",
    "learning_rate": "Adam learning rate.",
    "decay_steps": "Learning rate x decay_factor every this many steps.",
    "decay_factor": "Staircase learning-rate decay factor (cosine: the final learning rate "
                    "is learning_rate x decay_factor).",
    "ema_decay": "EMA of the weights used for evaluation.",
    "compute_dtype": "Training products: bfloat16 = bf16 operands with float32 accumulation "
                     "(parameters, loss and Adam stay float32). Evaluation runs in float32.",
    "lr_schedule": "staircase: x decay_factor every decay_steps (the paper's); cosine: "
                   "linear warm-up over --warmup_steps, then cosine decay until --steps.",
    "warmup_steps": "--lr_schedule=cosine: linear warm-up steps.",
    "init_from": "Start a new run from a model's weights (parameters and EMA) instead of a "
                 "random initialisation: an exported model directory, 'default' (the shipped "
                 "model) or a training workdir (its latest EMA weights). The model flags must "
                 "match the source's but for --recurrent_rank (a dense source is factorised "
                 "by truncated SVD) and a grown patch set (--num_patches=68 from a 34-patch "
                 "model: the new patches start with zero recurrent weights) or a shrunk one "
                 "(--num_patches=34 from a 68-patch model: the others' rows are dropped). "
                 "Ignored when "
                 "--workdir holds a checkpoint (the run resumes). Steps, schedule and EMA "
                 "warm-up count from 0; the initial shape is this run's training mean shape.",
    "iteration_weights": "Weights of the iterations' landmark losses, one per iteration "
                         "(scaled to sum to the number of iterations); empty = all equal "
                         "(the paper's). E.g. 3,2,1 favours the early iterations, which the "
                         "budget dial stops at.",
    "all_patches_every": "With --stage_patches: every this many steps the cascade trains "
                         "reading all patches at every iteration, so the same weights also "
                         "run the full schedule (2 = alternate); 0 = never.",
    "train_stages": "Only these iterations' parameters are trained (e.g. 0,1; empty = all). "
                    "With --stage_patches and --init_from, the cheap schedule's own early "
                    "stages for an unchanged model (experiments.attach_schedule).",
    # loop
    "log_every": "Steps between progress lines.",
    "eval_every": "Steps between evaluations on --eval_split (0: only at the end; -1: never).",
    "checkpoint_every": "Steps between checkpoints.",
    "keep_checkpoints": "Latest checkpoints kept (plus the best by eval NME).",
    "divergence_factor": "Divergence guard: stop training (nothing saved) when the moving "
                         "average of the loss (decay 0.9) exceeds this many times its lowest "
                         "value in the run; 0 disables it.",
    # data
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
    "lowres_prob": "Training: probability that a crop is brought down to a face of "
                   "U(--lowres_min_px, --lowres_max_px) px (area average) and bilinearly "
                   "back up to 228 (low-resolution video, webcams); 0 = off.",
    "lowres_min_px": "--lowres_prob: the smallest face size drawn, px (the face box is 142 "
                     "px in the crop).",
    "lowres_max_px": "--lowres_prob: the largest face size drawn, px (<= 142).",
    "blur_prob": "Training: probability that a crop is blurred by an axis-aligned Gaussian, "
                 "sigma_y and sigma_x each U(0, --blur_max_sigma) (defocus, motion); before "
                 "--lowres_prob's resampling when both fire; 0 = off.",
    "blur_max_sigma": "--blur_prob: the largest Gaussian sigma, in crop px (the face box is "
                      "142 px: 3 px ~ 2% of the face).",
    "box_jitter": "Evaluation only: move each face box by U(-F, F) x its size and resize "
                  "it by 1 + U(-F, F), seeded by --seed and the file id; 0 = off.",
    "skip_bad": "Skip (count and report) bad annotations/images instead of failing.",
    "num_parallel_calls": "tf.data parallel map calls; -1 = AUTOTUNE.",
    "train_cache_mb": "Training photos decoded once and kept in memory (uint8, the region "
                      "of each face any augmented crop can read) up to this many MB; each "
                      "batch is then warped from the cache in one XLA program. Over it, or "
                      "0: each sample decodes its photo (slower).",
}

_ENUMS = {
    "extractor": config_lib.EXTRACTORS,
    "global_attention": config_lib.GLOBAL_ATTENTIONS,
    "compute_dtype": config_lib.COMPUTE_DTYPES,
    "lr_schedule": config_lib.LR_SCHEDULES,
}


def _define():
  flag_defs.define_flag("integer", "num_patches", 0, _HELP["num_patches"])
  flag_defs.define_from_dataclass(config_lib.ModelConfig, _HELP, names=MODEL_FIELDS,
                                  enums=_ENUMS)
  flag_defs.define_from_dataclass(config_lib.TrainConfig, _HELP, names=TRAIN_FIELDS,
                                  enums=_ENUMS)
  flag_defs.define_from_dataclass(config_lib.LoopConfig, _HELP, enums=_ENUMS)
  flag_defs.define_from_dataclass(data_config.DataConfig, _HELP)


_define()


def model_config_from_flags(num_points: int) -> config_lib.ModelConfig:
  """ModelConfig for `num_points` landmarks from the parsed model flags (ValueError naming
  the flag when they do not fit)."""
  scheme = schemes.get_scheme(num_points)
  try:
    levels = tuple(int(l) for l in FLAGS.levels)
  except ValueError as e:
    raise ValueError(f"--levels: comma-separated integers expected, got {FLAGS.levels}") from e
  stage_patches = stage_patches_from_flags()
  values = {name: getattr(FLAGS, name) for name in MODEL_FIELDS}
  try:
    return config_lib.for_scheme(scheme, FLAGS.num_patches or None,
                                 **{**values, "levels": levels,
                                    "stage_patches": stage_patches})
  except ValueError as e:
    named = [f"--{n}" for n in MODEL_FIELDS if n in str(e) and n != "levels"]
    raise ValueError(f"{'/'.join(named) or '--num_patches/--levels'}: {e}") from e


def stage_patches_from_flags() -> tuple[int, ...]:
  """--stage_patches as a tuple of ints (ValueError naming the flag)."""
  try:
    return tuple(int(k) for k in FLAGS.stage_patches)
  except ValueError as e:
    raise ValueError(f"--stage_patches: comma-separated integers expected, got "
                     f"{FLAGS.stage_patches}") from e


def train_config_from_flags(seed: int) -> config_lib.TrainConfig:
  """TrainConfig from the parsed training flags; `seed` is the data config's."""
  return config_lib.TrainConfig(seed=seed,
                                **{name: getattr(FLAGS, name) for name in TRAIN_FIELDS})


def loop_config_from_flags() -> config_lib.LoopConfig:
  return config_lib.LoopConfig(**{name: getattr(FLAGS, name) for name in LOOP_FIELDS})


# Per-dataset defaults used when the flag was not given on the command line.
_DATASET_DEFAULTS = {
    "wflw": {"num_points": 98, "eval_split": "test"},
    "synthetic_faces": {"eval_split": "test"},
    "pts_folder": {"train_split": "all", "eval_split": "all", "val_source": "all"},
}


def data_config_from_flags(**overrides) -> data_config.DataConfig:
  """DataConfig from the parsed absl flags (plus keyword overrides), validated.

  Flags not given on the command line take per-dataset defaults: wflw -> --num_points=98,
  --eval_split=test; synthetic_faces -> --eval_split=test; pts_folder -> --train_split=all,
  --eval_split=all, --val_source=all.
  """
  values = {f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(data_config.DataConfig)}
  dataset = overrides.get("dataset", values["dataset"])
  for name, value in _DATASET_DEFAULTS.get(dataset, {}).items():
    if not FLAGS[name].present:
      values[name] = value
  values.update(overrides)
  return data_config.validate(data_config.DataConfig(**values))
