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

--time adds ms per face through `Predictor.predict` (photo + box in, crop included) at
every budget of every dial and at the full cascade of every model, all from ONE run on
the dials' split (times of different runs on this noisy machine do not compare), read
from the same data flags as dial_benchmark (--flagfile=300w34.flags), with the same
Pareto check and a second plot (NME vs ms, --plot's name + _ms). Pause training first.
"""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
from absl import flags

from experiments import common
from experiments import config_flags   # the data flags of the faces --time runs on
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
  d("bool", "time", False, "Also time Predictor.predict at every point, in one interleaved "
    "run on the dials' split (the data flags: --flagfile=300w34.flags).")
  d("integer", "rounds", 3, "--time: rounds (each times every point once); fastest kept.")
  d("integer", "time_batch_size", 64, "--time: faces per batch (a power of two; 1: the "
    "faces one by one, a budget kept by a stream). (--batch_size is training's.)")
  d("list", "models", [], "--time: name:model directory (or 'default') of dials whose "
    "JSON does not name its model (older dial_benchmark JSONs) or names another.")


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
                 "model_path": result.get("model_path"),
                 "points": points,
                 "dial_mean": {k: mean_over_range(points, k, low, high) for k in KINDS}}
  splits = {v["split"] for v in out.values()}
  if len(splits) > 1:
    raise common.UserError(f"--dials: measured on different splits {sorted(splits)}")
  return out


def pareto(table: dict, static: list[str], cost: str = "mmacs") -> dict:
  """Each dial (the models not in `static`) against the static models: per budget point,
  the static model of the lowest NME among those of no more `cost` ("mmacs", or "ms" per
  face after `time_table`) at their full cascade, and whether the dial is at or below it,
  by inter-pupil NME. {name: [{"budget", cost, "nme", "best_static", "static_nme",
  "dominates"}]}; best_static None: no static model is that cheap."""
  statics = [(n, table[n].get("full_" + cost), table[n]["full"]["interpupil"]) for n in static]
  out = {}
  for name, t in table.items():
    if name in static:
      continue
    rows = []
    for p in t["points"]:
      cheaper = [(nme, n) for n, mmacs, nme in statics
                 if mmacs is not None and mmacs <= p[cost] + 1e-9]
      best = min(cheaper) if cheaper else None
      rows.append({"budget": p["budget"], cost: p[cost], "nme": p["interpupil"],
                   "best_static": best[1] if best else None,
                   "static_nme": best[0] if best else None,
                   "dominates": best is None or p["interpupil"] <= best[0]})
    out[name] = rows
  return out


# Per cost axis: its name, one value's format, the plot's x label.
UNITS = {"mmacs": ("MMACs", "{:.1f} MMACs", "multiply-adds per face (M), mean over the split"),
         "ms": ("ms per face", "{:.2f} ms", "ms per face through Predictor.predict (one run)")}


def pareto_markdown(checks: dict, cost: str = "mmacs") -> str:
  unit, fmt, _ = UNITS[cost]
  lines = [f"Against the static models by {unit} (inter-pupil NME; a dial point is on or "
           f"below the static frontier when no static model of no more {unit} has a lower "
           f"NME):", ""]
  for name, rows in checks.items():
    bad = [r for r in rows if not r["dominates"]]
    lines.append(f"- {name}: " + ("on or below the static models at every budget" if not bad
                                  else "above them at " + ", ".join(
                                      f"budget {r['budget']:g} ({fmt.format(r[cost])}: "
                                      f"{r['nme']:.3f} vs {r['best_static']} "
                                      f"{r['static_nme']:.3f})" for r in bad)))
  return "\n".join(lines) + "\n"


def markdown(table: dict, low: float, high: float, static: tuple = ()) -> str:
  """The NME table; a static model's row has its full cascade only (no dial)."""
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
    by_budget = {} if name in static else {p["budget"]: p for p in t["points"]}
    cells += [f"{by_budget[b]['interpupil']:.3f} / {by_budget[b]['interocular']:.3f}"
              if b in by_budget else "" for b in budgets]
    cells.append("static" if name in static else
                 f"**{t['dial_mean']['interpupil']:.3f}** / {t['dial_mean']['interocular']:.3f}")
    lines.append("| " + " | ".join(cells) + " |")
  return head + "\n".join(lines) + "\n"


def time_table(table: dict, static: list[str], models: dict, data_cfg, batch: int,
               rounds: int) -> dict:
  """Times every model of `table` through Predictor.predict in one interleaved run
  (`dial_benchmark_lib.time_predict`): a dial at its full cascade and each budget, a
  static model at its full cascade only; the model of each is `models[name]`, else its
  JSON's "model_path". In place: each model's "full_ms" and "full_timed_nme", each
  point's "ms" (ms per face), "timed_iterations" and "timed_nme" (inter-pupil, of the
  timed path). Returns the timing (machine, batch, rounds, rows)."""
  from experiments import dial_benchmark_lib  # noqa: PLC0415  (jax, data: only to time)
  unknown = sorted(set(models) - set(table))
  if unknown:
    raise common.UserError(f"--models: {unknown} not among the --dials names {list(table)}")
  points = {}
  for name, t in table.items():
    path = models.get(name) or t.get("model_path")
    if not path:
      raise common.UserError(f"--time: the dial JSON of {name} does not name its model "
                             f"(older than dial_benchmark's model_path): give "
                             f"--models={name}:DIR")
    points[name] = (path, [None] + ([] if name in static else
                                    [p["budget"] for p in t["points"]]))
  split = next(iter(table.values()))["split"]
  timing = dial_benchmark_lib.time_predict(points, data_cfg, split, batch, rounds)
  for name, rows in timing["models"].items():
    by_budget = {p["budget"]: p for p in table[name]["points"]}
    for r in rows:
      if r["budget"] is None:
        table[name].update(full_ms=r["ms_per_face"], full_timed_nme=r["nme_interpupil"])
      else:
        by_budget[r["budget"]].update(ms=r["ms_per_face"], timed_iterations=r["mean_iterations"],
                                      timed_nme=r["nme_interpupil"])
  return timing


def markdown_ms(table: dict, timing: dict, static: list[str], tolerance: float = 0.05) -> str:
  """The ms-per-face table of `time_table`'s run, and whether the timed passes computed
  what the dial JSONs measured (inter-pupil NME within `tolerance`)."""
  budgets = sorted({p["budget"] for n, t in table.items() if n not in static
                    for p in t["points"]})
  head = (f"Milliseconds per face through `Predictor.predict` (photo + box in, crop "
          f"included) at batch {timing['batch']} on the same {timing['faces']} faces, all "
          f"from ONE run on this machine ({timing['cpu_count']} CPU cores, "
          f"{timing['device']}): every model at every point in turn, round after round, "
          f"each point's fastest of {timing['rounds']} round(s); a static model at its full "
          f"cascade only. Training must be paused while it runs (a process beside it slows "
          f"some points more than others); times of different runs do not compare.\n\n")
  cols = ["model (ms/face)", "full cascade", *[f"budget {b:g}" for b in budgets]]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for name, t in table.items():
    by_budget = {p["budget"]: p for p in t["points"] if "ms" in p}
    lines.append("| " + " | ".join([name, f"{t['full_ms']:.2f}", *[
        f"{by_budget[b]['ms']:.2f}" if b in by_budget else "" for b in budgets]]) + " |")
  off = []
  for name, t in table.items():
    pairs = [("full cascade", t["full_timed_nme"], t["full"]["interpupil"])]
    pairs += [(f"budget {p['budget']:g}", p["timed_nme"], p["interpupil"])
              for p in t["points"] if "ms" in p]
    off += [f"{name} {w}: {a:.3f} vs {b:.3f}" for w, a, b in pairs if abs(a - b) > tolerance]
  check = (f"The timed passes' inter-pupil NME matches the dial JSONs' at every point (within "
           f"{tolerance:g})." if not off else
           f"The timed passes' NME differs from the dial JSONs' by more than {tolerance:g} "
           f"(not the model measured, or another batch?): " + "; ".join(off) + ".")
  return head + "\n".join(lines) + "\n\n" + check + "\n"


def plot(table: dict, static: list[str], path: str, cost: str = "mmacs") -> None:
  """NME (inter-pupil) vs `cost` ("mmacs" or "ms"): each dial's curve, each static model's
  full cascade as one point (figure 7's style)."""
  from experiments import policy_plots  # noqa: PLC0415  (matplotlib: only for the plot)
  curves = []
  for n, t in table.items():
    if n in static:
      curves.append({"name": n + " (static: full cascade)", "mmacs": [t["full_" + cost]],
                     "nme": [t["full"]["interpupil"]]})
    else:
      curves.append({"name": n, "mmacs": [p[cost] for p in t["points"]],
                     "nme": [p["interpupil"] for p in t["points"]]})
  policy_plots.figure7(
      curves, path, title=f"the dial of each model on {next(iter(table.values()))['split']}",
      nme_label="NME inter-pupil (%)", x_label=UNITS[cost][2])
  print(f"wrote {path}")


def main(argv):
  common.start(argv)
  dials = common.name_path_flag("dials", FLAGS.dials)
  table = compare(dials, FLAGS.low, FLAGS.high)
  static = list(FLAGS.static)
  unknown = sorted(set(static) - set(table))
  if unknown:
    raise common.UserError(f"--static: {unknown} not among the --dials names {list(table)}")
  timing = None
  if FLAGS.time:
    batch = common.int_flag_at_least("time_batch_size", FLAGS.time_batch_size, 1)
    if batch & (batch - 1):
      raise common.UserError(f"--time_batch_size={batch}: must be a power of two")
    timing = time_table(table, static, dict(common.name_path_flag("models", FLAGS.models)),
                        config_flags.data_config_from_flags(), batch,
                        common.int_flag_at_least("rounds", FLAGS.rounds, 1))
  text = markdown(table, FLAGS.low, FLAGS.high, tuple(static))
  checks = pareto(table, static) if static else None
  if checks:
    text += "\n" + pareto_markdown(checks)
  checks_ms = pareto(table, static, "ms") if static and timing else None
  if timing:
    text += "\n" + markdown_ms(table, timing, static)
  if checks_ms:
    text += "\n" + pareto_markdown(checks_ms, "ms")
  print(text)
  command = "python -m experiments.dial_compare " + " ".join(sys.argv[1:])
  if FLAGS.output_md:
    atomic_io.write_text(FLAGS.output_md, text + f"\nCommand: `{command}`\n")
  if FLAGS.output_json:
    common.write_json(FLAGS.output_json, {"command": command, "low": FLAGS.low,
                                          "high": FLAGS.high, "dials": table,
                                          "static": static, "pareto": checks,
                                          "timing": timing, "pareto_ms": checks_ms})
  if FLAGS.plot:
    plot(table, static, FLAGS.plot)
    if timing:
      p = pathlib.Path(FLAGS.plot)
      plot(table, static, str(p.with_name(p.stem + "_ms" + p.suffix)), "ms")


if __name__ == "__main__":
  define_flags()
  common.run(main)
