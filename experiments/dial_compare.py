r"""Dials of several models side by side: NME against compute per face, from the JSONs of
`experiments.dial_benchmark` (run on the same split with the same budgets).

  python -m experiments.dial_compare \
      --dials=default:R/default_dial_val.json,equal:R/dial_w111_dial_val.json,early:R/...json \
      --output_md=results/dial_training_val.md --plot=results/dial_training_val.png

Per model: the full cascade's NME, the NME at each budget (mean iterations per face, at
the benchmark's batch size: exactly that compute), and the dial's mean NME over budgets
[--low, --high]: the area under its NME-vs-MMACs curve (trapezoids over the budget
points) divided by the MMAC range: one number per dial, lower is better. Inter-pupil and
inter-ocular. The plot draws each dial's curve (figure 7's style: NME vs MMACs).
"""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
from absl import flags

from experiments import common
from musica_jax import atomic_io

FLAGS = flags.FLAGS
KINDS = ("interpupil", "interocular")


def define_flags() -> None:
  d = common.define_flag
  d("list", "dials", None, "name:path of each model's dial_benchmark JSON.", required=True)
  d("float", "low", 1.5, "Lowest budget (mean iterations) of the dial's mean NME.")
  d("float", "high", 3.0, "Highest budget of the dial's mean NME.")
  d("string", "output_md", None, "Where to write the markdown table.")
  d("string", "output_json", None, "Where to write the comparison (JSON).")
  d("string", "plot", None, "Where to draw the NME-vs-MMACs curves (PNG).")
  d("list", "static", [], "Names (of --dials) whose full cascade counts as a static model "
    "(a model trained for that compute, run without a dial); the dials of the others are "
    "checked against them (issue #25: is the dial on or below every static model of no "
    "more MMACs?).")


def curve(result: dict) -> list[dict]:
  """The budget working points of one dial_benchmark JSON at its batch size, by budget:
  [{"budget", "mean_iterations", "mmacs", "interpupil", "interocular"}]."""
  key = f"batch{result['batch_size']}"
  rows = [r for r in result["working_points"] if r["working_point"].startswith("budget")]
  return sorted(({"budget": float(r["budget"]), "mean_iterations": r[key]["mean_iterations"],
                  "mmacs": r[key]["mmacs_per_face"], **{k: r[key]["nme"][k] for k in KINDS}}
                 for r in rows), key=lambda p: p["budget"])


def mean_over_range(points: list[dict], kind: str, low: float, high: float) -> float:
  """Area under NME(MMACs) between the budgets `low` and `high` / the MMAC range."""
  sel = [p for p in points if low - 1e-9 <= p["budget"] <= high + 1e-9]
  if len(sel) < 2:
    raise ValueError(f"fewer than two budget points in [{low}, {high}]")
  x = np.asarray([p["mmacs"] for p in sel])
  y = np.asarray([p[kind] for p in sel])
  return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def compare(dials: list[tuple[str, str]], low: float = 1.5, high: float = 3.0) -> dict:
  """{name: {"split", "faces", "full", "points", "dial_mean"}} of every (name, JSON path)."""
  out = {}
  for name, path in dials:
    try:
      result = json.loads(pathlib.Path(path).read_text())
      points = curve(result)
      result["full_cascade"]["nme"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
      raise common.UserError(f"--dials: {name}:{path}: not a dial_benchmark JSON ({e})") from e
    out[name] = {"split": result["split"], "faces": result["faces"],
                 "full": {k: result["full_cascade"]["nme"][k] for k in KINDS},
                 "full_mmacs": result["full_cascade"].get("mmacs_per_face"),
                 "points": points,
                 "dial_mean": {k: mean_over_range(points, k, low, high) for k in KINDS}}
  splits = {v["split"] for v in out.values()}
  if len(splits) > 1:
    raise common.UserError(f"--dials: measured on different splits {sorted(splits)}")
  return out


def pareto(table: dict, static: list[str]) -> dict:
  """Each dial (the models not in `static`) against the static models: per budget point,
  the static model of the lowest NME among those of no more MMACs (full cascade) and
  whether the dial is at or below it, by inter-pupil NME. {name: [{"budget", "mmacs",
  "nme", "best_static", "static_nme", "dominates"}]}; best_static None: no static model
  is that cheap."""
  statics = [(n, table[n]["full_mmacs"], table[n]["full"]["interpupil"]) for n in static]
  out = {}
  for name, t in table.items():
    if name in static:
      continue
    rows = []
    for p in t["points"]:
      cheaper = [(nme, n) for n, mmacs, nme in statics
                 if mmacs is not None and mmacs <= p["mmacs"] + 1e-9]
      best = min(cheaper) if cheaper else None
      rows.append({"budget": p["budget"], "mmacs": p["mmacs"], "nme": p["interpupil"],
                   "best_static": best[1] if best else None,
                   "static_nme": best[0] if best else None,
                   "dominates": best is None or p["interpupil"] <= best[0]})
    out[name] = rows
  return out


def pareto_markdown(checks: dict) -> str:
  lines = ["Against the static models (inter-pupil NME; a dial point is on or below the "
           "static frontier when no static model of no more MMACs has a lower NME):", ""]
  for name, rows in checks.items():
    bad = [r for r in rows if not r["dominates"]]
    lines.append(f"- {name}: " + ("on or below the static models at every budget" if not bad
                                  else "above them at " + ", ".join(
                                      f"budget {r['budget']:g} ({r['mmacs']:.1f} MMACs: "
                                      f"{r['nme']:.3f} vs {r['best_static']} "
                                      f"{r['static_nme']:.3f})" for r in bad)))
  return "\n".join(lines) + "\n"


def markdown(table: dict, low: float, high: float) -> str:
  names = list(table)
  budgets = [p["budget"] for p in table[names[0]]["points"]]
  first = table[names[0]]
  head = (f"Dials on `{first['split']}` ({first['faces']} faces): NME (%) inter-pupil / "
          f"inter-ocular at each budget (mean iterations per face, exact at the benchmark's "
          f"batch), and the dial's mean NME over budgets {low:g}-{high:g} (area under "
          f"NME vs MMACs / MMAC range; lower is better).\n\n")
  cols = ["model", "full cascade", *[f"budget {b:g}" for b in budgets],
          f"dial mean {low:g}-{high:g}"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for name in names:
    t = table[name]
    cells = [name, f"{t['full']['interpupil']:.3f} / {t['full']['interocular']:.3f}"]
    by_budget = {p["budget"]: p for p in t["points"]}
    cells += [f"{by_budget[b]['interpupil']:.3f} / {by_budget[b]['interocular']:.3f}"
              if b in by_budget else "" for b in budgets]
    cells.append(f"**{t['dial_mean']['interpupil']:.3f}** / {t['dial_mean']['interocular']:.3f}")
    lines.append("| " + " | ".join(cells) + " |")
  return head + "\n".join(lines) + "\n"


def main(argv):
  common.start(argv)
  dials = common.name_path_flag("dials", FLAGS.dials)
  table = compare(dials, FLAGS.low, FLAGS.high)
  unknown = sorted(set(FLAGS.static) - set(table))
  if unknown:
    raise common.UserError(f"--static: {unknown} not among the --dials names {list(table)}")
  text = markdown(table, FLAGS.low, FLAGS.high)
  checks = pareto(table, list(FLAGS.static)) if FLAGS.static else None
  if checks:
    text += "\n" + pareto_markdown(checks)
  print(text)
  command = "python -m experiments.dial_compare " + " ".join(sys.argv[1:])
  if FLAGS.output_md:
    atomic_io.write_text(FLAGS.output_md, text + f"\nCommand: `{command}`\n")
  if FLAGS.output_json:
    common.write_json(FLAGS.output_json, {"command": command, "low": FLAGS.low,
                                          "high": FLAGS.high, "dials": table,
                                          "static": list(FLAGS.static), "pareto": checks})
  if FLAGS.plot:
    from experiments import policy_plots  # noqa: PLC0415  (matplotlib: only for the plot)
    curves = []
    for n, t in table.items():
      if n in FLAGS.static:     # a static model: its full cascade, one point
        curves.append({"name": n + " (static: full cascade)", "mmacs": [t["full_mmacs"]],
                       "nme": [t["full"]["interpupil"]]})
      else:
        curves.append({"name": n, "mmacs": [p["mmacs"] for p in t["points"]],
                       "nme": [p["interpupil"] for p in t["points"]]})
    policy_plots.figure7(
        curves,
        FLAGS.plot, title=f"the dial of each model on {table[dials[0][0]]['split']}",
        nme_label="NME inter-pupil (%)")
    print(f"wrote {FLAGS.plot}")


if __name__ == "__main__":
  define_flags()
  common.run(main)
