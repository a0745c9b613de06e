"""The accuracy / compute dial of experiments.dial_benchmark, flag-free: `run(DialConfig,
data_cfg)` measures every working point (accuracy, then interleaved timing rounds, then
through Predictor.predict) and returns the result dict it writes; `markdown_table` renders
the working-point table of results/dial.md from it."""
from __future__ import annotations

import dataclasses
import io
import os
import time

from absl import app
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import datasets
from experiments import common
from experiments import estimate_calibration
from musica_jax import cascade
from musica_jax import cost
from musica_jax import images as images_lib
from musica_jax import losses
from musica_jax import metrics
from musica_jax import model_io
from musica_jax import schedules
from musica_jax import budget as budget_lib
from musica_jax import predictor as predictor_lib
from musica_jax import schemes


@dataclasses.dataclass(frozen=True)
class DialConfig:
  """The flags of experiments.dial_benchmark."""
  output_json: str
  model: str = "default"
  split: str = "common"
  budgets: tuple[float, ...] = (2.75, 2.5, 2.25, 2.0, 1.75, 1.5)
  ts_for_budgets: tuple[float, ...] = (2.5, 2.0)
  rounds: int = 5
  batch1_faces: int = 0
  calibration_png: str | None = None


def _timed(fn) -> float:
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def markdown_table(res: dict) -> str:
  """The working-point table (results/dial.md) from a result of `run`."""
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


@dataclasses.dataclass
class _Faces:
  """The split's faces, decoded and cropped once: photos and boxes for Predictor.predict,
  crops and ground truth in crop pixels for the cascade (`landmarks`: in the photos)."""
  photos: list
  boxes: list
  crops: np.ndarray
  gt: np.ndarray
  landmarks: np.ndarray | None = None


def _model_path(model: str) -> str:
  """What names the model in the JSON (a shipped name, or the real path), with its
  "@schedule" suffix when it has one."""
  path, schedule = schedules.split_model_name(model)
  name = path if path in model_io.BUNDLED_MODELS else os.path.realpath(os.path.expanduser(path))
  return name + ("" if schedule is None else "@" + "_".join(str(k) for k in schedule))


def _load(model: str, max_batch: int):
  """A predictor of `model`; "DIR@9_17_34": its weights reading that schedule, with that
  schedule's quitting policy (`musica_jax.schedules`)."""
  return predictor_lib.Predictor.from_loaded(common.load_model(None, model), max_batch=max_batch)


def _faces(pred, data_cfg, split) -> _Faces:
  data = datasets.load_split(data_cfg, split)
  photos = [images_lib.read_image(io.BytesIO(x), exif_transpose=False) for x in data.images]
  boxes = [np.asarray(bx, np.float64) for bx in data.boxes]
  crops, scale, offset, _, _ = pred.crops(photos, boxes)
  landmarks = np.asarray(data.landmarks, np.float64)
  gt = landmarks * scale[:, None, None] + offset[:, None, :]
  return _Faces(photos, boxes, crops, gt, landmarks)


def _points(info, budgets, ts_budgets) -> list[tuple[str, dict]]:
  """(name, run_fast keywords) of the full cascade and every working point."""
  points = [("full cascade (fast path, Ts=-inf)", dict())]
  points += [(f"budget {float(x):g}", dict(budget=float(x))) for x in budgets]
  thresholds = [budget_lib.threshold_for_budget(info, float(x)) for x in ts_budgets]
  points += [(f"Ts {t:.4g}", dict(ts=t)) for t in thresholds]
  return points


class _Paths:
  """The timed calls: the full masked cascade and each working point's fast path, over
  every face in padded batches and over the first n1 faces one by one."""

  def __init__(self, pred, crops, batch: int, n1: int):
    self.pred, self.crops, self.b, self.n1 = pred, crops, batch, n1
    self.f = crops.shape[0]

  def full_batched(self):
    """The full masked cascade over every face, in padded batches (CascadeOutputs)."""
    pred = self.pred
    return [out for out, _ in cascade.run_cascade_padded(
        pred.params, self.crops, pred.init_shape, pred.model_config, self.b)]

  def full_single(self):
    pred = self.pred
    return [cascade.run_cascade_jit(pred.params, self.crops[i:i + 1], pred.init_shape,
                                    pred.model_config).landmarks for i in range(self.n1)]

  def fast(self, kw, crops=None, stream=None):
    crops = self.crops if crops is None else crops
    if stream is not None:
      return stream.run_fast(crops, ts=kw.get("ts", -np.inf))
    return self.pred.run_fast(crops, ts=kw.get("ts", -np.inf), budget=kw.get("budget"))

  def fast_batched(self, kw):
    return lambda: self.fast(kw)

  def fast_single(self, kw):
    stream = self.pred.stream(budget=kw.get("budget"))   # single faces keep the budget
    return lambda: [self.fast(kw, self.crops[i:i + 1], stream)["landmarks"]
                    for i in range(self.n1)]


def _accuracy(paths: _Paths, points, gt, scheme, mcfg):
  """Rows of the working points' accuracy at both batch sizes, the full cascade's
  landmarks, final E and NME (and every program compiled before any timing)."""
  f, b = paths.f, paths.b
  full_outs = paths.full_batched()
  ref = np.concatenate([np.asarray(o.landmarks) for o in full_outs])[:f]
  final_e = np.concatenate([np.asarray(o.errors[-1]) for o in full_outs])[:f]
  full_nme = metrics.mean_nme_percent(ref, gt, scheme)
  paths.full_single()
  rows = []
  for name, kw in points:
    out_b = paths.fast(kw)
    stream = paths.pred.stream(budget=kw.get("budget"))   # the batch-1 row: these faces
    singles = [paths.fast(kw, paths.crops[i:i + 1], stream) for i in range(f)]  # as a stream
    it1 = np.concatenate([s["iterations"] for s in singles])
    lm1 = np.concatenate([s["landmarks"] for s in singles])
    rows.append({"working_point": name, **{k: v for k, v in kw.items()},
                 f"batch{b}": {"mean_iterations": float(out_b["iterations"].mean()),
                               "mmacs_per_face": cost.mean_macs(mcfg, out_b["iterations"]) / 1e6,
                               "nme": metrics.mean_nme_percent(out_b["landmarks"], gt, scheme)},
                 "batch1": {"mean_iterations": float(it1.mean()),
                            "mmacs_per_face": cost.mean_macs(mcfg, it1) / 1e6,
                            "nme": metrics.mean_nme_percent(lm1, gt, scheme)}})
  return rows, ref, final_e, full_nme


def _timing(paths: _Paths, points, rounds: int) -> dict:
  """Seconds per face of every path, `rounds` rounds (every path once per round, in the
  same order): {"full_b", "full_1", "b<k>", "s<k>": [per round]}."""
  f, n1, b = paths.f, paths.n1, paths.b
  times = {"full_b": [], "full_1": [], **{f"b{k}": [] for k in range(len(points))},
           **{f"s{k}": [] for k in range(len(points))}}
  for r in range(rounds):
    times["full_b"].append(_timed(paths.full_batched) / f)
    times["full_1"].append(_timed(paths.full_single) / n1)
    for k, (_, kw) in enumerate(points):
      times[f"b{k}"].append(_timed(paths.fast_batched(kw)) / f)
      times[f"s{k}"].append(_timed(paths.fast_single(kw)) / n1)
    print(f"timing round {r + 1}/{rounds}: full cascade {np.median(times['full_b']) * 1e3:.3f} "
          f"ms/face at batch {b}, {np.median(times['full_1']) * 1e3:.3f} at batch 1", flush=True)
  return times


def _speedups(rows, med, b: int, num_stages: int, full_nme) -> None:
  """Each row's ms/face and speed-up over the full cascade (fastest rounds), in place."""
  for k, row in enumerate(rows):
    for key, tk, fk in ((f"batch{b}", f"b{k}", "full_b"), ("batch1", f"s{k}", "full_1")):
      d = row[key]
      d["ms_per_face"] = med[tk] * 1e3
      d["speedup_vs_full_cascade"] = med[fk] / med[tk]
      d["ideal_speedup"] = num_stages / d["mean_iterations"]
      d["fraction_of_ideal"] = d["speedup_vs_full_cascade"] / d["ideal_speedup"]
      d["nme_change_vs_full_pct"] = (d["nme"]["interpupil"] / full_nme["interpupil"] - 1) * 100
    x, y = row[f"batch{b}"], row["batch1"]
    print(f"{row['working_point']:>36}: batch {b}: {x['mean_iterations']:.2f} it, "
          f"NME {x['nme']['interpupil']:.3f} ({x['nme_change_vs_full_pct']:+.1f}%), "
          f"x{x['speedup_vs_full_cascade']:.2f} (ideal x{x['ideal_speedup']:.2f}); "
          f"batch 1: {y['mean_iterations']:.2f} it, NME "
          f"{y['nme']['interpupil']:.3f}, x{y['speedup_vs_full_cascade']:.2f}", flush=True)


def _through_predictor(pred, faces: _Faces, rows, b: int, n1: int, rounds: int) -> dict:
  """Through Predictor.predict, from photos and boxes (the crop included): the smallest
  budget whose NME stays within 2% of the full cascade's, at each batch size.

  Batch b: whole passes over the split, the two paths in turn with the order swapped every
  round, each path's fastest round. Batch 1: face by face, both paths on the same face
  back to back (order alternating), each call's fastest of `rounds`, the median over faces
  (a pass-level alternation let this VM's speed drifts pass for a 1.5x gain at 2.9 of 3
  iterations)."""
  f, photos, boxes = len(faces.photos), faces.photos, faces.boxes
  through = {}
  for key, nb in ((f"batch{b}", f), ("batch1", n1)):
    ok = [r for r in rows if r["working_point"].startswith("budget")
          and r[key]["nme_change_vs_full_pct"] <= 2.0]
    if not ok:
      continue
    chosen = min(ok, key=lambda r: r["budget"])["budget"]
    kw = {"full": {}, "dial": {"budget": chosen}}
    if key != "batch1":
      t = {k: [] for k in kw}
      for k in kw:
        pred.predict(photos, boxes, **kw[k])
      for r in range(rounds):
        for k in (("full", "dial") if r % 2 == 0 else ("dial", "full")):
          t[k].append(_timed(lambda: pred.predict(photos, boxes, **kw[k])) / nb)
      m = {k: float(np.min(v)) for k, v in t.items()}
    else:
      # Face by face, each path a stream (the budget's threshold adapts over the faces).
      streams = {k: pred.stream(**kw[k]) for k in kw}
      per_face = {k: [] for k in kw}
      for i in range(nb):
        best = {k: np.inf for k in kw}
        for r in range(rounds):
          for k in (("full", "dial") if (i + r) % 2 == 0 else ("dial", "full")):
            best[k] = min(best[k], _timed(lambda: streams[k].predict(photos[i], boxes[i])))
        for k in kw:
          per_face[k].append(best[k])
      m = {k: float(np.median(v)) for k, v in per_face.items()}
    through[key] = {"budget": chosen, "ms_per_face_full": m["full"] * 1e3,
                    "ms_per_face_dial": m["dial"] * 1e3, "speedup": m["full"] / m["dial"]}
    print(f"Predictor.predict (crop included), {key}, budget {chosen:g}: "
          f"{m['full'] * 1e3:.2f} -> {m['dial'] * 1e3:.2f} ms/face, x{m['full'] / m['dial']:.2f}",
          flush=True)
  return through


def time_predict(models: dict, data_cfg, split: str, batch: int, rounds: int) -> dict:
  """Ms per face through Predictor.predict (photos and boxes in, the crop included) of
  several models on the faces of `split` in batches of `batch`, all from one run:
  models = {name: (model, [budget, or None for the full cascade])}. After an untimed
  pass of each (compilation; it gives the mean iterations and NME), every round runs each
  model at each of its points once over all the faces, in that order; each point's
  fastest round is kept (this machine is noisy: only times of one run compare). At batch
  1 a budget is kept over the faces by a stream, as in the batch-1 rows of `run`.
  {"batch", "rounds", "faces", "device", "cpu_count", "models": {name: [{"budget",
  "ms_per_face", "mean_iterations", "nme_interpupil"}]}}."""
  preds = {n: _load(m, batch) for n, (m, _) in models.items()}
  faces = _faces(next(iter(preds.values())), data_cfg, split)
  f = len(faces.photos)

  def call(name, x):
    if batch == 1 and x is not None:
      return preds[name].stream(budget=x).predict(faces.photos, faces.boxes)
    return preds[name].predict(faces.photos, faces.boxes, budget=x)
  points = [(n, x) for n, (_, xs) in models.items() for x in xs]
  check = {}
  for p in points:          # untimed: compilation, and what each point computes
    out = call(*p)
    scheme = schemes.get_scheme(preds[p[0]].model_config.num_landmarks)
    check[p] = {"mean_iterations": float(out.iterations.mean()),
                "nme_interpupil": metrics.mean_nme_percent(
                    out.landmarks, faces.landmarks, scheme, ("interpupil",))["interpupil"]}
  times = {p: [] for p in points}
  for r in range(rounds):
    for p in points:
      times[p].append(_timed(lambda p=p: call(*p)) / f)
    print(f"predict timing round {r + 1}/{rounds} ({len(points)} points)", flush=True)
  return {"batch": batch, "rounds": rounds, "faces": f, "cpu_count": os.cpu_count(),
          "device": str(jax.devices()[0].device_kind),
          "models": {n: [{"budget": x, "ms_per_face": min(times[(n, x)]) * 1e3,
                          **check[(n, x)]} for x in xs] for n, (_, xs) in models.items()}}


def _calibration(ref, final_e, gt, scheme, path, split) -> dict:
  """E after the last iteration against its training target (the rectified L1 error over
  the outer-eye distance): correlations and the reliability plot at `path`."""
  from experiments import policy_plots  # noqa: PLC0415  (matplotlib: only for the plot)
  target = np.asarray(losses.per_iteration_error(
      jnp.asarray(ref[None], jnp.float32), jnp.asarray(gt, jnp.float32),
      scheme.outer_eye_corners))[0]
  out = {"png": path, "pearson": estimate_calibration.pearson(final_e, target),
         "spearman": estimate_calibration.spearman(final_e, target),
         **policy_plots.reliability_plot(final_e, target, path,
                            f"estimated error E vs its target (L1 / outer-eye distance), "
                            f"{split} ({len(ref)} faces), after the last iteration")}
  print(f"wrote {path}")
  return out


def run(cfg: DialConfig, data_cfg, command: str = "") -> dict:
  """Every working point of cfg.model on cfg.split: the result (also written to
  cfg.output_json)."""
  pred = _load(cfg.model, data_cfg.eval_batch_size)
  mcfg, info = pred.model_config, pred.quit_info
  if info is None:
    raise app.UsageError(f"--model={cfg.model}: no quitting profile (run experiments."
                         f"fit_quit_head --install first)")
  for name, values in (("budgets", cfg.budgets), ("ts_for_budgets", cfg.ts_for_budgets)):
    bad = [x for x in values if not 1 <= float(x) <= mcfg.num_stages]
    if bad:
      raise app.UsageError(f"--{name}={','.join(f'{x:g}' for x in bad)}: outside 1 to the "
                           f"model's {mcfg.num_stages} iterations")
  scheme = schemes.get_scheme(mcfg.num_landmarks)
  b = data_cfg.eval_batch_size
  faces = _faces(pred, data_cfg, cfg.split)
  f = faces.crops.shape[0]
  print(f"{cfg.split}: {f} faces; model {mcfg.num_landmarks} pts / {mcfg.num_patches} "
        f"patches, quitting policy {info.get('design')}", flush=True)
  per_it = cost.cascade_macs(mcfg) / mcfg.num_stages / 1e6     # mean over the iterations
  n1 = f if not cfg.batch1_faces else min(cfg.batch1_faces, f)
  paths = _Paths(pred, faces.crops, b, n1)
  points = _points(info, cfg.budgets, cfg.ts_for_budgets)
  rows, ref, final_e, full_nme = _accuracy(paths, points, faces.gt, scheme, mcfg)
  times = _timing(paths, points, cfg.rounds)
  # The fastest round of each path: interference from other processes only ever adds
  # time, so the minimum is the steadiest estimate on a shared machine (medians in JSON).
  med = {k: float(np.min(v)) for k, v in times.items()}
  _speedups(rows, med, b, mcfg.num_stages, full_nme)
  through = _through_predictor(pred, faces, rows, b, n1, cfg.rounds)
  result = {"command": command,
            "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
            "model": pred.metadata.get("name") or cfg.model,
            "model_path": _model_path(cfg.model),
            "split": cfg.split, "faces": f,
            "batch_size": b, "batch1_faces_timed": n1, "rounds": cfg.rounds,
            "quit_policy": info.get("design"), "mmacs_per_iteration": per_it,
            "mmacs_per_stage": [m / 1e6 for m in cost.iteration_macs(mcfg)],
            "full_cascade": {"nme": full_nme, "mmacs_per_face": cost.cascade_macs(mcfg) / 1e6,
                             f"batch{b}_ms_per_face": med["full_b"] * 1e3,
                             "batch1_ms_per_face": med["full_1"] * 1e3},
            "working_points": rows, "through_predictor": through,
            "timing": "fastest of --rounds interleaved rounds (ms per face)",
            "median_ms_per_face": {k: float(np.median(v)) * 1e3 for k, v in times.items()}}
  if cfg.calibration_png:
    result["calibration"] = _calibration(ref, final_e, faces.gt, scheme,
                                         cfg.calibration_png, cfg.split)
  common.write_json(cfg.output_json, result)
  return result
