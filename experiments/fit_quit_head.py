r"""Fits and compares quitting signals on a trained cascade; installs the chosen one.

  python -m experiments.fit_quit_head --flagfile=300w19.flags --model=default \
      --output_json=results/quit_signal_study_300w19.json --install

The cascade's weights are frozen: each design is a small head (`musica_jax.quit_head`) on
the state the cascade already computes, so the full cascade's landmarks (and NME) do not
change. Every design gets the same budget: the same cached features of
`--fit_batches` x `--batch_size` augmented training faces (the training augmentation,
seed --fit_seed), the same steps and seed. Designs are compared on a validation stream:
`--val_batches` batches of training faces with a different augmentation seed (the
training faces are all the base model has; it has seen them, but not these draws). The
test split (`--test_split`, default the 300W common set) is evaluated once, at the end,
for the report; nothing is chosen on it.

Per design: full-cascade NME; the quitting policy at 2 mean iterations vs the random
assignment with the same per-iteration counts and the oracle (`early_exit_oracle`); the
fraction of the oracle's gain it captures; the mean iterations it needs to stay within 1%
and 2% of the full cascade's NME; Spearman of the score vs what it predicts, per
iteration. `--install` writes the design that is best on validation (the fewest mean
iterations that keep the NME within 2% of the full cascade's; a learned head must beat the
network's own E to replace it) beside the model (`quit_head.npz/.json`, with the validation profile
that maps a budget of mean iterations to per-stage capacities).
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags

from experiments import common
from experiments import config_flags
from experiments import fit_quit_head_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when run as a program)."""
  d = common.define_flag
  d("string", "model", "default", "Exported model directory, or 'default'.")
  d("string", "output_json", None, "Where to write the study JSON.")
  d("integer", "fit_batches", 120, "Augmented training batches whose features fit "
    "every head (x --batch_size faces).")
  d("integer", "val_batches", 40, "Augmented training batches (another seed) that "
    "choose the design.")
  d("integer", "fit_seed", 101, "Augmentation seed of the fitting stream.")
  d("integer", "val_seed_stream", 202, "Augmentation seed of the validation stream.")
  d("float", "mild_fraction", 0.5, "Fraction of the fit/validation batches drawn with "
    "the geometric augmentations (rotation, shear, axis scale) off: the box "
    "perturbation, flip and colour stay. Test faces are mostly upright; the "
    "training augmentation alone would make every face harder than they are.")
  d("string", "test_split", "common", "Reported once at the end ('' = none).")
  d("integer", "head_steps", 3000, "Optimiser steps per head (same for every design).")
  d("bool", "install", False, "Write the best design on validation into --model's "
    "directory (quit_head.npz + quit_head.json).")
  d("string", "install_design", None, "With --install: install this design (E, "
    "error_head, gain_head, gain_head_rank) instead of the validation rule's "
    "choice; the JSON records both.")
  flags.mark_flags_as_required(["output_json"])


def main(argv):
  common.start(argv)
  try:
    schedule = (config_flags.stage_patches_from_flags() if FLAGS["stage_patches"].present
                else None)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  cfg = fit_quit_head_lib.QuitStudyConfig(
      output_json=FLAGS.output_json, model=FLAGS.model, fit_batches=FLAGS.fit_batches,
      val_batches=FLAGS.val_batches, fit_seed=FLAGS.fit_seed, val_seed=FLAGS.val_seed_stream,
      test_split=FLAGS.test_split, head_steps=FLAGS.head_steps, install=FLAGS.install,
      mild_fraction=FLAGS.mild_fraction, install_design=FLAGS.install_design,
      stage_patches=schedule)
  fit_quit_head_lib.run(cfg, config_flags.data_config_from_flags(),
                        "python -m experiments.fit_quit_head " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
  define_flags()
  common.run(main)
