r"""Early-exit analysis ("knowing when to quit", paper 3.2): Ts sweep, Tf, Figures 1, 2, 7.

  python -m experiments.sweep_thresholds --flagfile=300w68.flags \
      (--workdir=W | --model=DIR|default) --output_json=sweep.json --plot=figure2.png
      [--eval_split=common]
      [--figure7_workdirs=W19,W34 [--figure7_plot=P --figure7_json=J]]
      [--figure1=figure1.png --figure1_faces=6 --figure1_ts=0.03]
      [--target_nme=3.5,4 --working_iterations=1.5,2 --working_mmacs=100]

Evaluates the model once on the (first) evaluation split, keeping per face the landmarks
and estimated error after every iteration of the full cascade; every early-exit policy is
then a choice of one of those iterations per face (`experiments.early_exit_policies`).
Writes the JSON (Ts sweep of ours / random / oracle, comparison at --compare_iterations
mean iterations, Tf curve, working points, calibration of E) and the Figure-2 plot, plus
`<plot>.t_fail.png` and `<plot>.calibration.png` next to it. NMEs are in percent (with
--nme_normalisation); Ts, Tf and E are in the units of the estimated error (the training
target: rectified L1 / (N * outer-eye distance), a fraction).
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags

from experiments import common
from experiments import config_flags
from experiments import sweep_thresholds_lib

FLAGS = flags.FLAGS
_EVALUATE_ONLY = ("ts", "t_fail", "budget", "budget_mmacs")


def define_flags() -> None:
  """The command's flags (defined only when run as a program, so tests can import the
  library beside other entry points)."""
  d = common.define_flag
  d("string", "output_json", None, "Where to write the sweep JSON.")
  d("string", "checkpoint", "latest", "Checkpoint step to analyse, 'latest', or 'best'.")
  d("string", "eval_dataset", None, "Analyse this dataset instead of the flagfile's "
    "(ibug300w | wflw | pts_folder | synthetic_faces), with --data_dir.")
  d("string", "model", None, "An exported model directory instead of a --workdir "
    "checkpoint; 'default' = the model shipped in musica_jax/default_model.")
  for name in _EVALUATE_ONLY:    # experiments.evaluate's: refused here with a pointer
    d("float", name, None, "experiments.evaluate's flag; not used here.")
  d("string", "plot", None, "Figure 2 PNG (default: next to --output_json).")
  d("integer", "num_ts", 300, "At most this many Ts values in a sweep (0: every "
    "distinct decision of the policy).")
  d("integer", "draws", 50, "Random-baseline draws per Ts.")
  d("integer", "policy_seed", 0, "Seed of the random baseline's draws.")
  d("enum", "nme_normalisation", "interocular", "NME reported and optimised by the oracle.",
    enum_values=["interocular", "interpupil", "box"])
  d("float", "compare_iterations", 2.0, "Mean iterations of the paper's comparison "
    "point (ours vs random at equal cost, and the cost to match random).")
  d("list", "target_nme", [], "Working points: Ts for these target NMEs (percent); "
    "default: the full cascade's NME + 1%, 5%, 10% (relative).")
  d("list", "working_iterations", [], "Working points: Ts for these budgets of mean "
    "iterations per face; default 1.25, 1.5, 2, 2.5.")
  d("list", "working_mmacs", [], "Working points: Ts for these budgets of mean "
    "multiply-adds per face (millions).")
  d("float", "t_fail_ts", None, "Ts under which the Tf analysis runs (the final estimate "
    "is that of each face's exit iteration); default: the full cascade.")
  d("list", "figure7_workdirs", [], "Figure 7: more trained variants (workdirs); "
    "--workdir (or --model) is always one of the lines.")
  d("string", "figure7_plot", None, "Figure 7 PNG (default: next to --output_json).")
  d("string", "figure7_json", None, "Figure 7 JSON (default: next to --output_json).")
  d("string", "figure1", None, "Figure 1 PNG (a grid of faces x iterations).")
  d("integer", "figure1_faces", 6, "Figure 1: number of faces (columns).")
  d("float", "figure1_ts", None, "Figure 1: Ts; default: the swept Ts nearest to "
    "--compare_iterations mean iterations.")
  flags.mark_flags_as_required(["output_json"])


def config_from_flags() -> sweep_thresholds_lib.SweepConfig:
  return sweep_thresholds_lib.SweepConfig(
      output_json=FLAGS.output_json, workdir=FLAGS.workdir, model=FLAGS.model,
      checkpoint=FLAGS.checkpoint, plot=FLAGS.plot, num_ts=FLAGS.num_ts, draws=FLAGS.draws,
      seed=FLAGS.policy_seed, norm=FLAGS.nme_normalisation,
      compare_iterations=FLAGS.compare_iterations,
      target_nme=common.float_list_flag("target_nme", FLAGS.target_nme),
      budget_iterations=common.float_list_flag("working_iterations", FLAGS.working_iterations),
      budget_mmacs=common.float_list_flag("working_mmacs", FLAGS.working_mmacs),
      t_fail_ts=FLAGS.t_fail_ts,
      figure7_workdirs=tuple(FLAGS.figure7_workdirs), figure7_plot=FLAGS.figure7_plot,
      figure7_json=FLAGS.figure7_json, figure1=FLAGS.figure1,
      figure1_faces=FLAGS.figure1_faces, figure1_ts=FLAGS.figure1_ts)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if any(FLAGS[f].present for f in _EVALUATE_ONLY):
    raise app.UsageError("--ts/--t_fail/--budget/--budget_mmacs are evaluate's flags; here use "
                         "--t_fail_ts / --figure1_ts (every Ts is swept) and --working_iterations "
                         "/ --working_mmacs (the Ts of a budget)")
  common.quiet_libraries()
  overrides = {}
  if FLAGS.eval_dataset:
    overrides["dataset"] = FLAGS.eval_dataset
  data_cfg = config_flags.data_config_from_flags(**overrides)
  sweep_thresholds_lib.run(config_from_flags(), data_cfg)


if __name__ == "__main__":
  define_flags()
  common.run(main)
