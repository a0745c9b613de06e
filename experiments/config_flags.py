"""The model, training and loop flags, defined once from their dataclasses.

One absl flag per field, with the field's name and default, as the data flags
(`data_pipelines/flags.py`):
- model: --num_patches (a patch subset of the scheme, 0 = all; `config.for_scheme`) and
  the `ModelConfig` fields in MODEL_FIELDS, defaults from `ModelConfig()`;
- training: every `TrainConfig` field but `seed` (the data flag --seed sets it);
- loop: every `LoopConfig` field (cadence of experiments/train_lib.py);
all three dataclasses in `musica_jax/config.py`.
A new field of these dataclasses becomes a flag by adding its help text below (and, for a
model field, its name to MODEL_FIELDS). Range checks are the entry point's
(experiments/train.py); the dataclasses validate what they own.
"""
from __future__ import annotations

import dataclasses

from absl import flags

from data_pipelines import flags as data_flags
from musica_jax import config as config_lib
from musica_jax import schemes

FLAGS = flags.FLAGS

MODEL_FIELDS = ("levels", "use_attention", "extractor", "global_attention", "hidden_size",
                "recurrent_rank")
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
                 "by truncated SVD). Ignored when --workdir holds a checkpoint (the run "
                 "resumes). Steps, schedule and EMA warm-up count from 0; the initial shape "
                 "is this run's training mean shape.",
    "iteration_weights": "Weights of the iterations' landmark losses, one per iteration "
                         "(scaled to sum to the number of iterations); empty = all equal "
                         "(the paper's). E.g. 3,2,1 favours the early iterations, which the "
                         "budget dial stops at.",
    # loop
    "log_every": "Steps between progress lines.",
    "eval_every": "Steps between evaluations on --eval_split (0: only at the end; -1: never).",
    "checkpoint_every": "Steps between checkpoints.",
    "keep_checkpoints": "Latest checkpoints kept (plus the best by eval NME).",
    "divergence_factor": "Divergence guard: stop training (nothing saved) when the moving "
                         "average of the loss (decay 0.9) exceeds this many times its lowest "
                         "value in the run; 0 disables it.",
}

_ENUMS = {
    "extractor": config_lib.EXTRACTORS,
    "global_attention": config_lib.GLOBAL_ATTENTIONS,
    "compute_dtype": config_lib.COMPUTE_DTYPES,
    "lr_schedule": config_lib.LR_SCHEDULES,
}


def _define():
  if "num_patches" in FLAGS:         # imported twice (e.g. as __main__ and as a module)
    return
  flags.DEFINE_integer("num_patches", 0, _HELP["num_patches"])
  data_flags.define_from_dataclass(config_lib.ModelConfig, _HELP, names=MODEL_FIELDS,
                                   enums=_ENUMS)
  data_flags.define_from_dataclass(config_lib.TrainConfig, _HELP, names=TRAIN_FIELDS,
                                   enums=_ENUMS)
  data_flags.define_from_dataclass(config_lib.LoopConfig, _HELP, enums=_ENUMS)


_define()


def model_config_from_flags(num_points: int) -> config_lib.ModelConfig:
  """ModelConfig for `num_points` landmarks from the parsed model flags (ValueError naming
  the flag when they do not fit)."""
  scheme = schemes.get_scheme(num_points)
  try:
    levels = tuple(int(l) for l in FLAGS.levels)
  except ValueError as e:
    raise ValueError(f"--levels: comma-separated integers expected, got {FLAGS.levels}") from e
  values = {name: getattr(FLAGS, name) for name in MODEL_FIELDS}
  try:
    return config_lib.for_scheme(scheme, FLAGS.num_patches or None,
                                 **{**values, "levels": levels})
  except ValueError as e:
    named = [f"--{n}" for n in MODEL_FIELDS if n in str(e) and n != "levels"]
    raise ValueError(f"{'/'.join(named) or '--num_patches/--levels'}: {e}") from e


def train_config_from_flags(seed: int) -> config_lib.TrainConfig:
  """TrainConfig from the parsed training flags; `seed` is the data config's."""
  return config_lib.TrainConfig(seed=seed,
                                **{name: getattr(FLAGS, name) for name in TRAIN_FIELDS})


def loop_config_from_flags() -> config_lib.LoopConfig:
  return config_lib.LoopConfig(**{name: getattr(FLAGS, name) for name in LOOP_FIELDS})
