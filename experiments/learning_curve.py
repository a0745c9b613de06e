r"""Learning curves of training runs: what more steps would give.

  python -m experiments.learning_curve --workdirs=$HOME/musica_runs/300w34_val \
      [--labels=34-patch] [--output_png=results/learning_curve.png] [--output_json=...]

Reads each workdir's metrics.jsonl (written by experiments.train) and run_config.json:
the periodic evaluation NME (on the split the run evaluates on, normally `val`) and the
training-batch NME, against steps and training samples. The summary per run: the best
evaluation and its step, and the change of the evaluation NME per doubling of steps over
the last `--fit_points` evaluations (a least-squares line in log2(step)), which is what a
longer run at the same learning rate would give if the trend holds (it does not hold
across a learning-rate decay: the fit uses only evaluations after the last decay, or all
before it when there is none yet).
"""
from __future__ import annotations

import json
import pathlib
import sys

from absl import app
from absl import flags
import numpy as np

from experiments import common
from musica_jax import strict_json

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when run as a program, so tests can import the
  functions beside other entry points)."""
  d = common.define_flag
  d("list", "workdirs", [], "Training workdirs (each with metrics.jsonl).")
  d("list", "labels", [], "Legend labels, one per workdir (default: folder names).")
  d("enum", "metric", "nme_interocular", "Evaluation metric to plot and fit.",
    enum_values=["nme_interocular", "nme_interpupil"])
  d("integer", "fit_points", 4, "Evaluations (the last ones) the per-doubling fit uses.")
  d("string", "output_png", None, "Plot here.")
  d("string", "output_json", None, "Summary JSON here.")


def read_run(workdir) -> dict:
  """{"eval": [(step, {metric: value})], "train": [(step, nme %)], "lr": [(step, lr)],
  "batch_size", "eval_split"} of one workdir."""
  wd = pathlib.Path(workdir)
  log = wd / "metrics.jsonl"
  if not log.is_file():
    raise app.UsageError(f"--workdirs: {wd} has no metrics.jsonl (not a training workdir)")
  evals, train, lr = {}, {}, {}
  for n, line in enumerate(log.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      r = json.loads(line)
    except json.JSONDecodeError:
      raise app.UsageError(f"{log}:{n}: not a JSON line") from None
    step = int(r["step"])            # a resumed run logs a step again: the last one counts
    if any(k.startswith("eval/") for k in r):
      evals[step] = {k[5:]: v for k, v in r.items() if k.startswith("eval/")}
    if "train/nme" in r:
      train[step] = 100.0 * r["train/nme"]
    if "train/learning_rate" in r:
      lr[step] = r["train/learning_rate"]
  cfg_path = wd / "run_config.json"
  cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
  return {"eval": sorted(evals.items()), "train": sorted(train.items()),
          "lr": sorted(lr.items()), "batch_size": cfg.get("data", {}).get("batch_size"),
          "eval_split": cfg.get("data", {}).get("eval_split")}


def per_doubling(steps, values) -> float | None:
  """Slope of values against log2(steps) (least squares): the change per doubling."""
  steps, values = np.asarray(steps, np.float64), np.asarray(values, np.float64)
  if len(steps) < 2 or np.ptp(np.log2(steps)) == 0:
    return None
  return float(np.polyfit(np.log2(steps), values, 1)[0])


def summarise(run: dict, metric: str, fit_points: int) -> dict:
  evals = [(s, m[metric]) for s, m in run["eval"] if metric in m]
  out = {"eval_split": run["eval_split"], "batch_size": run["batch_size"],
         "last_step": run["train"][-1][0] if run["train"] else None, "evaluations": len(evals)}
  if not evals:
    return out
  best = min(evals, key=lambda e: e[1])
  out.update(best_step=best[0], best=best[1], last_eval_step=evals[-1][0], last=evals[-1][1])
  # Evaluations since the last learning-rate change (a decay breaks the trend).
  changes = [s for (s, a), (_, b) in zip(run["lr"], run["lr"][1:]) if not np.isclose(a, b)]
  since = [e for e in evals if not changes or e[0] > changes[-1]]
  fit = since[-fit_points:]
  slope = per_doubling([s for s, _ in fit], [v for _, v in fit])
  out.update(fit_steps=[s for s, _ in fit], per_doubling=slope)
  return out


def plot(runs: dict, metric: str, path) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for (label, run), colour in zip(runs.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
    if run["train"]:
      s, v = np.array(run["train"]).T
      k = max(1, len(v) // 60)     # a running mean keeps the batch noise readable
      ax.plot(s[k - 1:], np.convolve(v, np.ones(k) / k, "valid"), color=colour, alpha=0.35,
              label=f"{label}: training batches (augmented)")
    ev = [(s, m[metric]) for s, m in run["eval"] if metric in m]
    if ev:
      s, v = np.array(ev).T
      ax.plot(s, v, "o-", color=colour, label=f"{label}: {run['eval_split']} ({metric})")
  ax.set_xscale("log", base=2)
  tops = [m[metric] for r in runs.values() for _, m in r["eval"] if metric in m]
  if tops:                         # the first training batches are far above: keep the end readable
    ax.set_ylim(0, 2.5 * max(tops))
  ax.set_xlabel("training step (batch %s)" % ", ".join(str(r["batch_size"]) for r in runs.values()))
  ax.set_ylabel("NME % (training batches: inter-ocular)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  common.start(argv)
  if not FLAGS.workdirs:
    raise app.UsageError("--workdirs: give one or more training workdirs")
  if FLAGS.labels and len(FLAGS.labels) != len(FLAGS.workdirs):
    raise app.UsageError(f"--labels: {len(FLAGS.labels)} labels for "
                         f"{len(FLAGS.workdirs)} workdirs")
  labels = FLAGS.labels or [pathlib.Path(w).name for w in FLAGS.workdirs]
  runs = {label: read_run(w) for label, w in zip(labels, FLAGS.workdirs)}
  summary = {label: {"workdir": w, **summarise(runs[label], FLAGS.metric, FLAGS.fit_points)}
             for label, w in zip(labels, FLAGS.workdirs)}
  command = "python -m experiments.learning_curve " + " ".join(sys.argv[1:])
  summary = {"metric": FLAGS.metric, "command": command, "runs": summary}
  print(strict_json.dumps(summary, indent=1))
  if FLAGS.output_json:
    common.write_json(FLAGS.output_json, summary)
  if FLAGS.output_png:
    plot(runs, FLAGS.metric, FLAGS.output_png)


if __name__ == "__main__":
  define_flags()
  common.run(main)
