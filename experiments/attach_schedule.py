r"""Gives a model a cheap schedule with its own early stages, leaving the model's weights as
they are (issue #25: a dial that does not cost the full cascade any accuracy).

  python -m experiments.train --flagfile=300w34.flags --workdir=R/cheap \
      --init_from=R/soup34 --stage_patches=9,17,34 --train_stages=0,1 ...
  python -m experiments.attach_schedule --model=MODEL_DIR --workdir=R/cheap --checkpoint=best
  python -m experiments.fit_quit_head --flagfile=300w34.flags --model=MODEL_DIR \
      --stage_patches=9,17,34 --install --test_split=

The run trained only the stages in its --train_stages (the last one frozen, shared with
the model) reading its --stage_patches; this writes those stages beside MODEL_DIR as
stages@9_17_34.npz (`musica_jax.schedules.save_stages`), which every loader of
MODEL_DIR@9_17_34 then puts in place (`predict(budget_mmacs=)`, evaluate, dial_benchmark).
MODEL_DIR's own files do not change. The run must start from MODEL_DIR's weights (or the
float32 weights it was exported from): its frozen stages are checked against the model's.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from absl import app
from absl import flags

from experiments import common
from musica_jax import run_config
from musica_jax import schedules

FLAGS = flags.FLAGS


def define_flags() -> None:
  d = common.define_flag
  d("string", "model", None, "Exported model directory to give the schedule to.",
    required=True)
  d("string", "workdir", None, "The --train_stages run whose stages to attach.", required=True)
  d("string", "checkpoint", "best", "Its checkpoint: a step, 'latest' or 'best'.")


def attach(model: str, workdir: str, checkpoint: str = "best"):
  """Writes the run's trained stages beside `model`; returns (path, schedule, stages)."""
  if schedules.split_model_name(model)[1] is not None:
    raise app.UsageError(f"--model={model}: name a model directory (without a schedule)")
  base = common.load_model(None, model)
  run = common.load_model(workdir, None, checkpoint)
  stages = run_config.load(workdir)["train_config"].train_stages
  cfg = run.model_config
  if not stages:
    raise app.UsageError(f"--workdir={workdir}: the run trained every stage (no "
                         f"--train_stages): its weights are a model of their own, not a schedule")
  if cfg != dataclasses.replace(base.model_config, stage_patches=cfg.stage_patches):
    raise app.UsageError(f"--workdir={workdir}: its model config differs from "
                         f"--model={model}'s beyond --stage_patches")
  if not np.allclose(run.mean_shape, base.mean_shape, atol=1e-2):
    raise app.UsageError(f"--workdir={workdir}: its initial shape differs from "
                         f"--model={model}'s (the run did not start from the model)")
  try:
    path = schedules.save_stages(base, run.params, cfg, stages)
  except ValueError as e:
    raise app.UsageError(f"--workdir={workdir}: {e}") from None
  return path, cfg.patches_per_stage, stages


def main(argv):
  common.start(argv)
  path, schedule, stages = attach(FLAGS.model, FLAGS.workdir, FLAGS.checkpoint)
  print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB): stages {list(stages)} of the "
        f"schedule {schedule}; next: experiments.fit_quit_head --model={FLAGS.model} "
        f"--stage_patches={','.join(map(str, schedule))} --install")


if __name__ == "__main__":
  define_flags()
  common.run(main)
