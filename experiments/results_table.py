r"""The 300W results table (README, results/accuracy_300w.md), made from evaluation JSONs
(experiments.evaluate).

  python -m experiments.results_table \
      --evals=results/300w68_common.json,results/300w34_common.json [--split=common]
      [--output_md=results/300w_common_table.md]

One row per evaluation (and dlib's row once, from the first JSON that holds a side by side),
with the training budget read from the run's workdir when it still exists: steps, batch
size, the split the run evaluated on during training (where "the best checkpoint" was chosen;
or the JSON's `checkpoint_chosen_on`), and training time from metrics.jsonl: the sum of the
logged intervals ("train/interval_s"), i.e. the wall time of the training processes from
start-up to the step (periodic evaluations included; steps redone after a resume counted once). Runs
logged before 2026-11-28 have no intervals but a running-average speed since their process
started; their time is (steps since the process started) / (that speed), per process, a
new process being recognised by a step that does not increase.
The paper column is the paper's 300W common-set inter-pupil NME for that patch count
(trained on 3,148 faces; see ../shared/docs/reference_notes.md).
"""
from __future__ import annotations

import json
import os
import pathlib

from absl import app
from absl import flags

from experiments import common
from musica_jax import atomic_io

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when run as a program, or by experiments.ablation,
  which writes its table with --output_md)."""
  d = common.define_flag
  d("list", "evals", [], "Evaluation JSONs written by experiments.evaluate.")
  d("string", "split", "common", "Which split of those JSONs to tabulate.")
  d("string", "output_md", None, "Also write the table (markdown) here.")


PAPER_300W_COMMON_INTERPUPIL = {68: 4.63, 34: 4.95, 19: 5.22}


def training_budget(workdir: str | None, step: int | None) -> dict:
  """{"batch_size", "train_hours"} of a run up to `step`, or {} when the workdir is gone."""
  if not workdir or not os.path.isdir(workdir):
    return {}
  wd = pathlib.Path(workdir)
  out = {}
  cfg = wd / "run_config.json"
  if cfg.is_file():
    data = json.loads(cfg.read_text()).get("data", {})
    out["batch_size"] = data.get("batch_size")
    # The run's periodic evaluations (and so "the best checkpoint") used this split.
    out["chosen_on"] = data.get("eval_split")
  log = wd / "metrics.jsonl"
  if log.is_file():
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    records = [r for r in records if "train/steps_per_s" in r
               and (step is None or r["step"] <= step)]
    out["train_hours"] = _seconds(records) / 3600
  return out


def _seconds(records: list[dict]) -> float:
  seconds, done = 0.0, 0        # done: the highest step already paid for
  prev = None                   # previous record's step in this process
  start = elapsed = 0.0         # running-average logs: the process's first step, its time
  gap = min((b["step"] - a["step"] for a, b in zip(records, records[1:])
             if b["step"] > a["step"]), default=1)
  for r in records:
    if prev is None or r["step"] <= prev:       # a new process (or the first one)
      start, elapsed = r["step"] - gap, 0.0
    prev = r["step"]
    if "train/interval_s" in r:
      dt = r["train/interval_s"]
    else:
      now = (r["step"] - start) / r["train/steps_per_s"]
      dt, elapsed = now - elapsed, now
    if r["step"] > done:                       # steps redone after a resume count once
      seconds += dt
      done = r["step"]
  return seconds


def rows_from(path: str, split: str) -> list[dict]:
  try:
    result = json.loads(pathlib.Path(path).read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise app.UsageError(f"--evals: cannot read {path}: {e}") from e
  if split not in result.get("splits", {}):
    raise app.UsageError(f"--evals: {path} has no split {split!r} (has "
                         f"{sorted(result.get('splits', {}))})")
  s = result["splits"][split]
  patches = len(result["model"]["patch_indices"])
  step = result.get("checkpoint_step")
  name = result.get("model_name") or f"MuSiCa{patches}"
  row = {"method": f"{name} ({result['model']['num_landmarks']} pts / {patches} patches)",
         "mmacs": result.get("mmacs_full_cascade"), "faces": s["faces"],
         "nme_interpupil": s["nme_interpupil"], "nme_interocular": s["nme_interocular"],
         "fr_008": s["fr_008"], "auc_008": s["auc_008"],
         "per_iteration_interpupil": s.get("nme_interpupil_per_iteration"), "step": step,
         "paper_interpupil": PAPER_300W_COMMON_INTERPUPIL.get(patches),
         "source": path, "command": result.get("command"),
         "chosen_on": result.get("checkpoint_chosen_on")}
  if result.get("averaged_from"):      # experiments.average_models: each ingredient's run
    parts = [dict(training_budget(a.get("trained_in"), a.get("checkpoint_step")),
                  step=a.get("checkpoint_step"), weight=a.get("weight"))
             for a in result["averaged_from"]]
    row["ingredients"] = parts
    row["chosen_on"] = row["chosen_on"] or "/".join(sorted(
        {a.get("checkpoint_chosen_on") or p.get("chosen_on") or "not recorded"
         for a, p in zip(result["averaged_from"], parts)}))
  else:
    budget = training_budget(result.get("workdir") or result.get("trained_in"), step)
    row.update({k: v for k, v in budget.items() if v is not None})
  rows = [row]
  side = result.get("side_by_side", {}).get(split)
  if side:
    dlib = next(r for r in side["rows"] if r["method"].startswith("dlib"))
    rows.append({"method": "dlib ERT 68", "faces": dlib["faces"],
                 "nme_interpupil": dlib["nme_interpupil"],
                 "nme_interocular": dlib["nme_interocular"], "fr_008": dlib["fr_008"],
                 "auc_008": dlib["auc_008"], "source": path, "is_dlib": True})
  return rows


def _f(x, fmt):
  return "-" if x is None else format(x, fmt)


def _budget(r: dict) -> str:
  if r.get("train_hours") is not None:
    return f"{r['step']} steps x {r.get('batch_size')} faces, {r['train_hours']:.1f} h"
  return f"step {r.get('step')}"


def markdown(rows: list[dict]) -> str:
  head = ("| method | MMACs | NME inter-pupil (paper) | NME inter-ocular | FR@0.08 | AUC@0.08 "
          "| inter-pupil per iteration | training budget | checkpoint chosen on | source |\n"
          "|---|---|---|---|---|---|---|---|---|---|\n")
  lines = []
  for r in rows:
    if r.get("is_dlib"):
      budget = "pretrained (dlib)"
    elif r.get("ingredients"):
      budget = "weight average of " + " + ".join(
          f"{p['weight']:.2g} x ({_budget(p)})" for p in r["ingredients"])
    else:
      budget = _budget(r)
    chosen = "-" if r.get("is_dlib") else (r.get("chosen_on") or "not recorded")
    per_it = " / ".join(f"{x:.2f}" for x in r.get("per_iteration_interpupil") or [])
    paper = f" ({r['paper_interpupil']:.2f})" if r.get("paper_interpupil") else ""
    lines.append(f"| {r['method']} | {_f(r.get('mmacs'), '.1f')} | "
                 f"{r['nme_interpupil']:.2f}{paper} | {r['nme_interocular']:.2f} | "
                 f"{r['fr_008'] * 100:.2f}% | {r['auc_008']:.3f} | {per_it or '-'} | {budget} "
                 f"| {chosen} | `{r['source']}` |")
  return head + "\n".join(lines) + "\n"


def table(paths: list[str], split: str = "common") -> tuple[str, list[dict]]:
  rows, have_dlib = [], False
  for p in paths:
    for r in rows_from(p, split):
      if r.get("is_dlib"):
        if have_dlib:
          continue
        have_dlib = True
      rows.append(r)
  rows.sort(key=lambda r: r["nme_interpupil"])
  return markdown(rows), rows


def main(argv):
  common.start(argv)
  if not FLAGS.evals:
    raise app.UsageError("--evals: give one or more evaluation JSONs (experiments.evaluate)")
  md, _ = table(FLAGS.evals, FLAGS.split)
  print(md)
  if FLAGS.output_md:
    atomic_io.write_text(pathlib.Path(FLAGS.output_md), md)


if __name__ == "__main__":
  define_flags()
  common.run(main)
