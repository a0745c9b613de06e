r"""Robustness validation of one model on the validation faces, and a failure threshold Tf
that stays honest on them (issue #28 items 1 and 4).

  nice -n 19 python -m experiments.robust_val --flagfile=300w34.flags --model=default \
      --output_json=results/robust_val_default.json \
      --output_md=results/robust_val_default.md \
      --ced_png=results/robust_val_default_ced.png

Each face of --split (val: carved from the 300W training faces by the flagfile; a test
split is refused) under every --conditions (data_pipelines.robust_val: downscaled face,
JPEG, motion / defocus blur, in-plane rotation, strong yaw + mirrored, occlusion, box
jitter; seeded by --seed), through Predictor.predict: per condition NME (inter-ocular,
inter-pupil, box), FR / AUC at 0.08 and 0.10, NME per iteration, the estimated error E
against the truth, one CED plot with a curve per condition; then per condition what
today's Tf (model.json's default_t_fail) and a Tf chosen on these faces flag
(experiments.robust_val_lib). Nothing is written into the model.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags

from data_pipelines import robust_val
from experiments import common
from experiments import config_flags
from experiments import robust_val_lib
from musica_jax import atomic_io

FLAGS = flags.FLAGS


def define_condition_flags(split_help: str) -> None:
  """The flags of the faces, conditions and quality target (shared with
  experiments.quality_score)."""
  d = common.define_flag
  d("string", "model", "default", "Exported model directory, or 'default'.")
  d("string", "split", "val", split_help)
  d("list", "conditions", list(robust_val.CONDITIONS),
    "Conditions (data_pipelines.robust_val): clean, downscale_<px>px, jpeg_q<Q>, "
    "motion_blur, defocus_blur, rotate_<deg>, strong_yaw, occlusion_<percent>, "
    "box_jitter_<fraction>.")
  d("integer", "max_faces", 0, "Only the first N faces of --split by file id (0: all).")
  d("float", "yaw_fraction", robust_val.YAW_FRACTION,
    "strong_yaw: this fraction of the faces, the most asymmetric, plus their mirrors.")
  d("float", "quality_fail_nme", 0.10, "Quality score: a face failed above this "
    "inter-ocular NME.")
  d("float", "min_flagged", 0.5, "Quality score target: at least this fraction of the "
    "failed faces flagged in every condition.")
  d("float", "max_false_alarms", 0.02, "Quality score target: at most this fraction of "
    "the other faces flagged in every condition.")


def check_condition_flags() -> None:
  """One line naming the flag for a bad value of `define_condition_flags`' flags."""
  common.int_flag_at_least("max_faces", FLAGS.max_faces, 0)
  for name in ("quality_fail_nme", "min_flagged", "max_false_alarms", "yaw_fraction"):
    common.finite_flag(name, getattr(FLAGS, name), positive=True)
  for name in ("min_flagged", "max_false_alarms", "yaw_fraction"):
    if getattr(FLAGS, name) > 1:
      raise app.UsageError(f"--{name}={getattr(FLAGS, name)}: a fraction, at most 1")


def define_flags() -> None:
  """The command's flags (defined only when run as a program)."""
  define_condition_flags("Faces to build the conditions from (a validation split).")
  d = common.define_flag
  d("bool", "per_iteration", True, "Also NME and E after every iteration (a second pass "
    "through the model's own full cascade; off with --budget_mmacs).")
  d("float", "budget_mmacs", None, "Run Predictor.predict(budget_mmacs=X): the schedule "
    "that serves X MMACs per face on val, with its escalation; reports MMACs per face per "
    "condition.")
  d("string", "output_json", None, "Where to write the JSON (required unless --from_json).")
  d("string", "output_md", None, "Also write the report (markdown).")
  d("string", "ced_png", None, "CED plot, one curve per condition.")
  d("string", "from_json", None, "Only render --output_md from this earlier JSON.")


def config_from_flags() -> robust_val_lib.RobustValConfig:
  check_condition_flags()
  common.finite_flag("budget_mmacs", FLAGS.budget_mmacs, positive=True)
  return robust_val_lib.RobustValConfig(
      output_json=FLAGS.output_json, model=FLAGS.model, split=FLAGS.split,
      conditions=tuple(FLAGS.conditions), max_faces=FLAGS.max_faces,
      yaw_fraction=FLAGS.yaw_fraction,
      per_iteration=FLAGS.per_iteration and FLAGS.budget_mmacs is None,
      budget_mmacs=FLAGS.budget_mmacs,
      ced_png=FLAGS.ced_png, quality_fail_nme=FLAGS.quality_fail_nme,
      min_flagged=FLAGS.min_flagged, max_false_alarms=FLAGS.max_false_alarms)


def main(argv):
  common.start(argv)
  if FLAGS.from_json:
    res = json.loads(pathlib.Path(FLAGS.from_json).read_text())
  else:
    if not FLAGS.output_json:
      raise app.UsageError("--output_json is required (or --from_json to render a report)")
    if FLAGS.ced_png:
      common.check_output(FLAGS.ced_png, "ced_png")
    res = robust_val_lib.run(config_from_flags(), config_flags.data_config_from_flags(),
                             "python -m experiments.robust_val " + " ".join(sys.argv[1:]))
  if FLAGS.output_md:
    atomic_io.write_text(FLAGS.output_md, robust_val_lib.markdown_report(res))
    print(f"wrote {FLAGS.output_md}")


if __name__ == "__main__":
  define_flags()
  common.run(main)
