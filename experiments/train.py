r"""Trains a MuSiCa cascade.

  python -m experiments.train --flagfile=wflw98.flags --data_dir=/data/WFLW --workdir=/ckpt/wflw98

Flagfiles live in experiments/configs/ (looked up there when not found in the working
directory); flags after the flagfile override it. A run restarted on the same --workdir
resumes from its latest checkpoint with the same data order. See WORKSPACE.md. The
training itself is experiments/train_lib.py; this file turns flags into its Config.
"""
from __future__ import annotations

import os

# TensorFlow (input pipeline only) must never take the accelerators from JAX.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags
from absl import logging

from experiments import common
from experiments import config_flags
from experiments import train_lib
from musica_jax import parallel

FLAGS = flags.FLAGS


def initialise_distributed() -> None:
  """--distributed: auto-detected cluster, the manual flags, or one process."""
  try:
    how = parallel.initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address,
                                          FLAGS.num_processes, FLAGS.process_id)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  logging.info("distributed: %s", how)


def check_ranges(train_cfg, loop_cfg) -> None:
  """Every training and loop flag checked against its range (UsageError naming it)."""
  for cfg, name in ((train_cfg, "steps"), (train_cfg, "decay_steps"), (loop_cfg, "log_every"),
                    (loop_cfg, "checkpoint_every"), (loop_cfg, "keep_checkpoints")):
    common.int_flag_at_least(name, getattr(cfg, name), 1)
  common.int_flag_at_least("eval_every", loop_cfg.eval_every, -1)
  common.int_flag_at_least("warmup_steps", train_cfg.warmup_steps, 0)
  if train_cfg.lr_schedule == "cosine" and train_cfg.warmup_steps >= train_cfg.steps:
    raise app.UsageError(f"--warmup_steps={train_cfg.warmup_steps}: must be below --steps="
                         f"{train_cfg.steps}")
  common.finite_flag("learning_rate", train_cfg.learning_rate, positive=True)
  common.finite_flag("decay_factor", train_cfg.decay_factor, positive=True)
  common.finite_flag("ema_decay", train_cfg.ema_decay)
  if not 0 <= train_cfg.ema_decay < 1:
    raise app.UsageError(f"--ema_decay={train_cfg.ema_decay}: must be in [0, 1)")
  common.finite_flag("divergence_factor", loop_cfg.divergence_factor)
  if 0 < loop_cfg.divergence_factor <= 1:
    raise app.UsageError(f"--divergence_factor={loop_cfg.divergence_factor}: must be > 1 "
                         f"(or 0 to disable the guard)")


def config_from_flags() -> train_lib.Config:
  """The run's Config from the parsed flags; a flag out of range or inconsistent is a
  UsageError (one line, before anything is created)."""
  try:
    data_cfg = config_flags.data_config_from_flags()
    model_cfg = config_flags.model_config_from_flags(data_cfg.num_points)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  try:
    train_cfg = config_flags.train_config_from_flags(seed=data_cfg.seed)
  except ValueError as e:
    raise app.UsageError(f"--iteration_weights: {e}" if "iteration_weights" in str(e)
                         else str(e)) from None
  if train_cfg.iteration_weights and len(train_cfg.iteration_weights) != model_cfg.num_stages:
    raise app.UsageError(f"--iteration_weights: {len(train_cfg.iteration_weights)} values for "
                         f"{model_cfg.num_stages} iterations (--levels)")
  if train_cfg.all_patches_every and not model_cfg.stage_patches:
    raise app.UsageError("--all_patches_every: needs --stage_patches (without it every "
                         "iteration reads all patches already)")
  if train_cfg.train_stages and max(train_cfg.train_stages) >= model_cfg.num_stages:
    raise app.UsageError(f"--train_stages={','.join(map(str, train_cfg.train_stages))}: the "
                         f"model has {model_cfg.num_stages} iterations (0 to "
                         f"{model_cfg.num_stages - 1}, --levels)")
  loop_cfg = config_flags.loop_config_from_flags()
  check_ranges(train_cfg, loop_cfg)
  return train_lib.Config(model=model_cfg, train=train_cfg, data=data_cfg, loop=loop_cfg)


def main(argv):
  common.start(argv)
  initialise_distributed()
  train_lib.train_and_evaluate(config_from_flags(), FLAGS.workdir)


if __name__ == "__main__":
  # Required when run as the program only: importing this module (tests, other programs
  # in one process) must not make --workdir required for every parse.
  flags.mark_flag_as_required("workdir")
  common.run(main)
