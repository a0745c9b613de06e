r"""The accuracy / compute dial of one trained model, measured: working points and speed.

  python -m experiments.dial_benchmark --flagfile=300w19.flags --model=default \
      --output_json=benchmarks/dial_300w19_common_cpu_2core.json \
      --calibration_png=results/default_model_calibration.png

For every working point (a budget of mean iterations per face, or a threshold Ts on the
quitting score) on the faces of --split: mean iterations, MMACs per face, NME
(inter-pupil / inter-ocular) and wall-clock ms/face at batch --batch_size and at batch 1,
each beside the full cascade (the masked `cascade.run_cascade`, what every face paid
before early exit saved time) timed in the same run, interleaved round by round (this
machine is noisy: only ratios from one run are compared; each path's fastest round).
Then the same through `Predictor.predict` from decoded photos and boxes (crop included),
and a reliability plot of the estimated error E (the per-face quality score that Tf thresholds).
The JSON names the model ("model_path": its resolved directory, or "default"), so
`experiments.dial_compare --time` can reload it.

Batch 1 with a budget: one face cannot run a fraction of an iteration, so it quits on a
threshold the predictor adapts face by face to keep the stream's mean iterations at the
budget (`budget.BudgetStream`, starting from the validation faces' threshold); the
batch-1 row is the split's faces as one such stream, in order.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags

from experiments import common
from experiments import config_flags
from experiments import dial_benchmark_lib
from musica_jax import atomic_io

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when run as a program)."""
  d = common.define_flag
  d("string", "model", "default", "Exported model directory, or 'default'.")
  d("string", "split", "common", "Faces to measure on.")
  d("list", "budgets", ["2.75", "2.5", "2.25", "2.0", "1.75", "1.5"],
    "Budget working points (mean iterations per face).")
  d("list", "ts_for_budgets", ["2.5", "2.0"], "Threshold working points: the Ts whose mean "
    "iterations on the validation faces is this.")
  d("integer", "rounds", 5, "Timing rounds (each times every path once, interleaved).")
  d("integer", "batch1_faces", 0, "Faces timed one by one (0 = all of --split).")
  d("string", "output_json", None, "Where to write the JSON (required unless --from_json).")
  d("string", "calibration_png", None, "Reliability plot of the estimated error.")
  d("string", "output_md", None, "Also write the working-point table (markdown).")
  d("string", "from_json", None, "Only render --output_md from this earlier JSON.")


def main(argv):
  common.start(argv)
  if FLAGS.from_json:
    res = json.loads(pathlib.Path(FLAGS.from_json).read_text())
  else:
    if not FLAGS.output_json:
      raise app.UsageError("--output_json is required (or --from_json to render a table)")
    cfg = dial_benchmark_lib.DialConfig(
        output_json=FLAGS.output_json, model=FLAGS.model, split=FLAGS.split,
        budgets=common.float_list_flag("budgets", FLAGS.budgets),
        ts_for_budgets=common.float_list_flag("ts_for_budgets", FLAGS.ts_for_budgets),
        rounds=FLAGS.rounds,
        batch1_faces=FLAGS.batch1_faces, calibration_png=FLAGS.calibration_png)
    res = dial_benchmark_lib.run(cfg, config_flags.data_config_from_flags(),
                                 "python -m experiments.dial_benchmark " + " ".join(sys.argv[1:]))
  if FLAGS.output_md:
    atomic_io.write_text(FLAGS.output_md, dial_benchmark_lib.markdown_table(res))
    print(f"wrote {FLAGS.output_md}")


if __name__ == "__main__":
  define_flags()
  common.run(main)
