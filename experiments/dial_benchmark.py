r"""The accuracy / compute dial of one trained model, measured: working points and speed.

  python -m experiments.dial_benchmark --flagfile=300w19.flags --model=default \
      --output_json=benchmarks/dial_300w19_common_cpu_2core.json \
      --calibration_png=results/default_model_calibration.png

For every working point (a budget of mean iterations per face, or a threshold Ts on the
quitting score) on the faces of --split: mean iterations, MMACs per face, NME
(inter-pupil / inter-ocular) and wall-clock ms/face at batch --batch_size and at batch 1,
each beside the full cascade (the masked `cascade.run_cascade`, what every face paid
before early exit saved time) timed in the same run, interleaved round by round (this
machine is noisy: only ratios from one run are compared; each path's fastest round). Then the same through
`Predictor.predict` from decoded photos and boxes (crop included), and a reliability plot
of the estimated error E (the per-face quality score that Tf thresholds).

Batch 1 with a budget uses the threshold with that mean iterations on the validation
faces (`quit_head.threshold_for_budget`): one face cannot run a fraction of an iteration.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import datasets
from data_pipelines import flags as data_flags
from experiments import common
from musica_jax import atomic_io
from musica_jax import cascade
from musica_jax import cost
from musica_jax import early_exit_policies as eep
from musica_jax import losses
from musica_jax import metrics
from musica_jax import predictor as predictor_lib
from musica_jax import quit_head
from musica_jax import schemes

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "default", "Exported model directory, or 'default'.")
flags.DEFINE_string("split", "common", "Faces to measure on.")
flags.DEFINE_list("budgets", ["2.75", "2.5", "2.25", "2.0", "1.75", "1.5"],
                  "Budget working points (mean iterations per face).")
flags.DEFINE_list("ts_for_budgets", ["2.5", "2.0"], "Threshold working points: the Ts "
                  "whose mean iterations on the validation faces is this.")
flags.DEFINE_integer("rounds", 5, "Timing rounds (each times every path once, interleaved).")
flags.DEFINE_integer("batch1_faces", 0, "Faces timed one by one (0 = all of --split).")
flags.DEFINE_string("output_json", None, "Where to write the JSON (required unless "
                    "--from_json).")
flags.DEFINE_string("calibration_png", None, "Reliability plot of the estimated error.")
flags.DEFINE_string("output_md", None, "Also write the working-point table (markdown).")
flags.DEFINE_string("from_json", None, "Only render --output_md from this earlier JSON.")


def _nme(landmarks, gt, scheme) -> dict:
  lm, gt = jnp.asarray(landmarks), jnp.asarray(gt)
  return {kind: float(np.mean(np.asarray(metrics.per_face_nme(lm, gt, scheme, kind))) * 100)
          for kind in ("interpupil", "interocular")}


def _timed(fn) -> float:
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def calibration_plot(estimated, true_nme, path, title) -> dict:
  """Reliability diagram: faces binned by E (deciles), mean true NME per bin vs mean E."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  e, t = np.asarray(estimated, np.float64), np.asarray(true_nme, np.float64)
  edges = np.quantile(e, np.linspace(0, 1, 11))
  which = np.clip(np.searchsorted(edges, e, side="right") - 1, 0, 9)
  bins = [{"mean_estimated": float(e[which == k].mean()), "mean_true": float(t[which == k].mean()),
           "faces": int((which == k).sum())} for k in range(10) if (which == k).any()]
  fig, ax = plt.subplots(1, 2, figsize=(10, 4.2))
  ax[0].scatter(e * 100, t * 100, s=5, alpha=0.4, label="faces")
  ax[0].plot([b["mean_estimated"] * 100 for b in bins], [b["mean_true"] * 100 for b in bins],
             "o-", color="C3", label="decile means")
  lim = max(np.quantile(e, 0.99), np.quantile(t, 0.99)) * 100
  ax[0].plot([0, lim], [0, lim], "k--", lw=0.8, label="perfect calibration")
  ax[0].set(xlim=(0, lim), ylim=(0, lim), xlabel="estimated error E (%)",
            ylabel="true error (%, the estimate's target)", title="reliability")
  ax[0].legend(fontsize=8)
  order = np.argsort(-e)
  frac = np.arange(1, e.size + 1) / e.size
  ax[1].plot(frac * 100, np.cumsum(t[order]) / np.arange(1, e.size + 1) * 100,
             label="faces of highest E first")
  ax[1].plot(frac * 100, np.cumsum(np.sort(t)[::-1]) / np.arange(1, e.size + 1) * 100, "--",
             label="oracle (highest true error first)")
  ax[1].axhline(t.mean() * 100, color="grey", lw=0.8, label="random order")
  ax[1].set(xlabel="faces flagged (%)", ylabel="mean true error of flagged faces (%)",
            title="what a threshold on E flags")
  ax[1].legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return {"bins": bins}


def markdown_table(res: dict) -> str:
  """The README's working-point table from a result of `run`."""
  b = res["batch_size"]
  full = res["full_cascade"]
  lines = [f"| working point | mean it. (batch {b} / 1) | MMACs/face | NME inter-pupil, batch {b} "
           f"(change) | ms/face batch {b} (speed-up) | NME inter-pupil, batch 1 | ms/face batch 1 "
           f"(speed-up) |", "|---|---|---|---|---|---|---|",
           f"| full cascade, masked (reference) | 3 / 3 | {full['mmacs_per_face']:.1f} | "
           f"{full['nme']['interpupil']:.2f} | {full[f'batch{b}_ms_per_face']:.2f} (1.00x) | "
           f"{full['nme']['interpupil']:.2f} | {full['batch1_ms_per_face']:.2f} (1.00x) |"]
  for r in res["working_points"]:
    x, y = r[f"batch{b}"], r["batch1"]
    lines.append(
        f"| {r['working_point']} | {x['mean_iterations']:.2f} / {y['mean_iterations']:.2f} | "
        f"{x['mmacs_per_face']:.1f} | {x['nme']['interpupil']:.2f} "
        f"({x['nme_change_vs_full_pct']:+.1f}%) | {x['ms_per_face']:.2f} "
        f"({x['speedup_vs_full_cascade']:.2f}x) | {y['nme']['interpupil']:.2f} "
        f"({y['nme_change_vs_full_pct']:+.1f}%) | {y['ms_per_face']:.2f} "
        f"({y['speedup_vs_full_cascade']:.2f}x) |")
  return "\n".join(lines) + "\n"


def run(model: str, data_cfg, split: str, budgets, ts_budgets, rounds: int,
        batch1_faces: int, output_json: str, calibration_png: str | None) -> dict:
  pred = (predictor_lib.Predictor.default(max_batch=data_cfg.eval_batch_size)
          if model == "default" else
          predictor_lib.Predictor.from_saved_model(model, max_batch=data_cfg.eval_batch_size))
  cfg, info = pred.model_config, pred.quit_info
  if info is None:
    raise app.UsageError(f"--model={model}: no quitting profile (run experiments."
                         f"fit_quit_head --install first)")
  scheme = schemes.get_scheme(cfg.num_landmarks)
  b = data_cfg.eval_batch_size
  data = datasets.load_split(data_cfg, split)
  photos = [predictor_lib.read_image(io.BytesIO(x)) for x in data.images]
  boxes = [np.asarray(bx, np.float64) for bx in data.boxes]
  crops, scale, offset, _, _ = pred.crops(photos, boxes)
  gt = (np.asarray(data.landmarks, np.float64) * scale[:, None, None] + offset[:, None, :])
  f = crops.shape[0]
  print(f"{split}: {f} faces; model {cfg.num_landmarks} pts / {cfg.num_patches} patches, "
        f"quitting policy {info.get('design')}", flush=True)
  per_it = cost.cascade_macs(cfg, 1) / 1e6
  n1 = f if not batch1_faces else min(batch1_faces, f)

  def full_batched():
    """The full masked cascade over every face, in padded batches (CascadeOutputs)."""
    outs = []
    for s in range(0, f, b):
      part = crops[s:s + b]
      if part.shape[0] < b:
        part = jnp.concatenate([part, jnp.zeros((b - part.shape[0],) + part.shape[1:])])
      outs.append(cascade.run_cascade_jit(pred.params, part, pred._init, cfg))
    return outs

  def full_single():
    return [cascade.run_cascade_jit(pred.params, crops[i:i + 1], pred._init, cfg).landmarks
            for i in range(n1)]

  points = [("full cascade (fast path, Ts=-inf)", dict())]
  points += [(f"budget {float(x):g}", dict(budget=float(x))) for x in budgets]
  points += [(f"Ts {quit_head.threshold_for_budget(info, float(x)):.4g}",
              dict(ts=quit_head.threshold_for_budget(info, float(x)))) for x in ts_budgets]

  def fast_batched(kw):
    return lambda: pred.run_fast(crops, kw.get("ts", -np.inf), np.inf, kw.get("budget"))

  def fast_single(kw):
    return lambda: [pred.run_fast(crops[i:i + 1], kw.get("ts", -np.inf), np.inf,
                                  kw.get("budget"))["landmarks"] for i in range(n1)]

  # Accuracy (and warm-up: every program compiled before any timing).
  full_outs = full_batched()
  ref = np.concatenate([np.asarray(o.landmarks) for o in full_outs])[:f]
  final_e = np.concatenate([np.asarray(o.errors[-1]) for o in full_outs])[:f]
  full_nme = _nme(ref, gt, scheme)
  full_single()
  rows = []
  for name, kw in points:
    out_b = pred.run_fast(crops, kw.get("ts", -np.inf), np.inf, kw.get("budget"))
    singles = [pred.run_fast(crops[i:i + 1], kw.get("ts", -np.inf), np.inf, kw.get("budget"))
               for i in range(f)]
    it1 = np.concatenate([s["iterations"] for s in singles])
    lm1 = np.concatenate([s["landmarks"] for s in singles])
    rows.append({"working_point": name, **{k: v for k, v in kw.items()},
                 f"batch{b}": {"mean_iterations": float(out_b["iterations"].mean()),
                               "mmacs_per_face": float(out_b["iterations"].mean() * per_it),
                               "nme": _nme(out_b["landmarks"], gt, scheme)},
                 "batch1": {"mean_iterations": float(it1.mean()),
                            "mmacs_per_face": float(it1.mean() * per_it),
                            "nme": _nme(lm1, gt, scheme)}})
  # Timing: rounds, every path once per round, in the same order.
  times = {"full_b": [], "full_1": [], **{f"b{k}": [] for k in range(len(points))},
           **{f"s{k}": [] for k in range(len(points))}}
  for r in range(rounds):
    times["full_b"].append(_timed(full_batched) / f)
    times["full_1"].append(_timed(full_single) / n1)
    for k, (_, kw) in enumerate(points):
      times[f"b{k}"].append(_timed(fast_batched(kw)) / f)
      times[f"s{k}"].append(_timed(fast_single(kw)) / n1)
    print(f"timing round {r + 1}/{rounds}: full cascade {np.median(times['full_b']) * 1e3:.3f} "
          f"ms/face at batch {b}, {np.median(times['full_1']) * 1e3:.3f} at batch 1", flush=True)
  # The fastest round of each path: interference from other processes only ever adds
  # time, so the minimum is the steadiest estimate on a shared machine (medians in JSON).
  med = {k: float(np.min(v)) for k, v in times.items()}
  medians = {k: float(np.median(v)) for k, v in times.items()}
  for k, row in enumerate(rows):
    for key, tk, fk in ((f"batch{b}", f"b{k}", "full_b"), ("batch1", f"s{k}", "full_1")):
      d = row[key]
      d["ms_per_face"] = med[tk] * 1e3
      d["speedup_vs_full_cascade"] = med[fk] / med[tk]
      d["ideal_speedup"] = cfg.num_stages / d["mean_iterations"]
      d["fraction_of_ideal"] = d["speedup_vs_full_cascade"] / d["ideal_speedup"]
      d["nme_change_vs_full_pct"] = (d["nme"]["interpupil"] / full_nme["interpupil"] - 1) * 100
    print(f"{row['working_point']:>36}: batch {b}: {row[f'batch{b}']['mean_iterations']:.2f} it, "
          f"NME {row[f'batch{b}']['nme']['interpupil']:.3f} ({row[f'batch{b}']['nme_change_vs_full_pct']:+.1f}%), "
          f"x{row[f'batch{b}']['speedup_vs_full_cascade']:.2f} (ideal x{row[f'batch{b}']['ideal_speedup']:.2f}); "
          f"batch 1: {row['batch1']['mean_iterations']:.2f} it, NME "
          f"{row['batch1']['nme']['interpupil']:.3f}, x{row['batch1']['speedup_vs_full_cascade']:.2f}",
          flush=True)

  # Through Predictor.predict, from photos and boxes (the crop included): the smallest
  # budget whose NME stays within 2% of the full cascade's, at each batch size.
  through = {}
  for key, nb in ((f"batch{b}", f), ("batch1", n1)):
    ok = [r for r in rows if r["working_point"].startswith("budget")
          and r[key]["nme_change_vs_full_pct"] <= 2.0]
    if not ok:
      continue
    chosen = min(ok, key=lambda r: r["budget"])["budget"]
    if nb == f:
      calls = {"full": lambda: pred.predict(photos, boxes),
               "dial": lambda: pred.predict(photos, boxes, budget=chosen)}
    else:
      calls = {"full": lambda: [pred.predict(photos[i], boxes[i]) for i in range(n1)],
               "dial": lambda: [pred.predict(photos[i], boxes[i], budget=chosen)
                                for i in range(n1)]}
    t = {k: [] for k in calls}
    for fn in calls.values():
      fn()
    for _ in range(rounds):
      for k, fn in calls.items():
        t0 = time.perf_counter()
        fn()
        t[k].append((time.perf_counter() - t0) / nb)
    m = {k: float(np.min(v)) for k, v in t.items()}
    through[key] = {"budget": chosen, "ms_per_face_full": m["full"] * 1e3,
                    "ms_per_face_dial": m["dial"] * 1e3, "speedup": m["full"] / m["dial"]}
    print(f"Predictor.predict (crop included), {key}, budget {chosen:g}: "
          f"{m['full'] * 1e3:.2f} -> {m['dial'] * 1e3:.2f} ms/face, x{m['full'] / m['dial']:.2f}",
          flush=True)

  result = {"command": "python -m experiments.dial_benchmark " + " ".join(sys.argv[1:]),
            "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
            "model": pred.metadata.get("name") or model, "split": split, "faces": f,
            "batch_size": b, "batch1_faces_timed": n1, "rounds": rounds,
            "quit_policy": info.get("design"), "mmacs_per_iteration": per_it,
            "full_cascade": {"nme": full_nme, "mmacs_per_face": per_it * cfg.num_stages,
                             f"batch{b}_ms_per_face": med["full_b"] * 1e3,
                             "batch1_ms_per_face": med["full_1"] * 1e3},
            "working_points": rows, "through_predictor": through,
            "timing": "fastest of --rounds interleaved rounds (ms per face)",
            "median_ms_per_face": {k: v * 1e3 for k, v in medians.items()}}
  if calibration_png:
    # E's training target: the rectified L1 error over the outer-eye distance.
    target = np.asarray(losses.per_iteration_error(
        jnp.asarray(ref[None], jnp.float32), jnp.asarray(gt, jnp.float32),
        scheme.outer_eye_corners))[0]
    result["calibration"] = {
        "png": calibration_png, "pearson": eep.pearson(final_e, target),
        "spearman": eep.spearman(final_e, target),
        **calibration_plot(final_e, target, calibration_png,
                           f"estimated error E vs its target (L1 / outer-eye distance), {split} "
                           f"({f} faces), after the last iteration")}
    print(f"wrote {calibration_png}")
  common.write_json(output_json, result)
  return result


def main(argv):
  common.start(argv)
  if FLAGS.from_json:
    res = json.loads(pathlib.Path(FLAGS.from_json).read_text())
  else:
    if not FLAGS.output_json:
      raise app.UsageError("--output_json is required (or --from_json to render a table)")
    data_cfg = data_flags.config_from_flags()
    res = run(FLAGS.model, data_cfg, FLAGS.split, FLAGS.budgets, FLAGS.ts_for_budgets, FLAGS.rounds,
        FLAGS.batch1_faces, FLAGS.output_json, FLAGS.calibration_png)
  if FLAGS.output_md:
    atomic_io.write_text(FLAGS.output_md, markdown_table(res))
    print(f"wrote {FLAGS.output_md}")


if __name__ == "__main__":
  common.run(main)
