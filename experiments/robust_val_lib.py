"""The robustness validation of experiments.robust_val, flag-free: `run(RobustValConfig,
data_cfg)` scores a model on the validation faces under every condition of
`data_pipelines.robust_val` and chooses a failure threshold Tf that stays honest on them.

Per condition (faces through `Predictor.predict`, the crop in the program, the full
cascade): NME inter-ocular / inter-pupil / box (`musica_jax.metrics`), FR and AUC at 0.08
and 0.10 (inter-ocular), the CED, NME after each iteration (the same crops through
`cascade.run_cascade_jit`, which keeps every iteration), and the estimated error E against
the true inter-ocular NME (what Tf thresholds).

The quality score (issue #28 item 4): a face is flagged when E >= Tf (Predictor.predict's
valid = E < Tf). For today's Tf (model.json's default_t_fail) and for a Tf chosen on these
faces (`choose_robust_t_fail`): per condition the faces above --quality_fail_nme
inter-ocular NME, how many of them are flagged, and the false alarms (faces at or below it
that are flagged). Target: in every condition at least --min_flagged of the failed faces
flagged with at most --max_false_alarms of the others. The choice is also cross-validated
(2 folds by photo: chosen on one, counted on the other). A monotone calibration of E
(isotonic regression of the true NME on E, and one scale) is fitted on the same faces: it
makes E read as an NME; a threshold on the calibrated E flags the same faces as the
matching threshold on E (the map is increasing), so Tf is reported in both units.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import time

from absl import app
import jax.numpy as jnp
import numpy as np

from data_pipelines import datasets
from data_pipelines import robust_val
from experiments import common
from experiments import estimate_calibration
from musica_jax import cascade
from musica_jax import face_frame
from musica_jax import images as images_lib
from musica_jax import losses
from musica_jax import metrics
from musica_jax import predictor as predictor_lib
from musica_jax import schedules
from musica_jax import schemes

TEST_SPLITS = ("test", "common", "challenging", "full")


@dataclasses.dataclass(frozen=True)
class RobustValConfig:
  """The flags of experiments.robust_val."""
  output_json: str
  model: str = "default"
  split: str = "val"
  conditions: tuple[str, ...] = robust_val.CONDITIONS
  max_faces: int = 0                 # 0: every face of the split (the first M by file id)
  yaw_fraction: float = robust_val.YAW_FRACTION
  per_iteration: bool = True         # also NME / E after each iteration (a second pass)
  ced_png: str | None = None
  quality_fail_nme: float = 0.10
  min_flagged: float = 0.5
  max_false_alarms: float = 0.02
  batch_size: int = 64
  budget_mmacs: float | None = None  # predict(budget_mmacs=): the schedule (and escalation)


# ---------------------------------------------------------------------------------------
# The quality score: thresholds, tables, calibration (pure numpy).


def flag_table(estimated, nme, condition, t_fail: float, fail_nme: float,
               names=None) -> dict:
  """Per condition: faces, failed (NME > fail_nme or not finite), flagged_failed (of them,
  E >= t_fail or E not finite), false_alarms (faces not failed but flagged), and the
  rates; plus "all" over every face."""
  e, n = np.asarray(estimated, np.float64), np.asarray(nme, np.float64)
  cond = np.asarray(condition)
  failed = ~(n <= fail_nme)
  flagged = ~(e < t_fail)
  out = {}
  for c in list(names if names is not None else dict.fromkeys(cond.tolist())) + ["all"]:
    sel = np.ones(cond.shape, bool) if c == "all" else cond == c
    f, ok = failed & sel, ~failed & sel
    out[c] = {"faces": int(sel.sum()), "failed": int(f.sum()),
              "flagged_failed": int((flagged & f).sum()),
              "false_alarms": int((flagged & ok).sum()),
              "flagged_failed_rate": float((flagged & f).sum() / f.sum()) if f.any() else None,
              "false_alarm_rate": float((flagged & ok).sum() / ok.sum()) if ok.any() else None}
  return out


def meets_target(table: dict, min_flagged: float, max_false_alarms: float) -> dict:
  """Which conditions (not "all") meet the target, and whether all do."""
  per = {}
  for c, r in table.items():
    if c == "all":
      continue
    rec_ok = r["flagged_failed_rate"] is None or r["flagged_failed_rate"] >= min_flagged
    fa_ok = r["false_alarm_rate"] is None or r["false_alarm_rate"] <= max_false_alarms
    per[c] = bool(rec_ok and fa_ok)
  return {"every_condition": all(per.values()), "per_condition": per}


def _condition_ok(thresholds, e, failed, cond, names, min_flagged, max_false_alarms):
  """bool [C, T]: condition c meets the target at threshold t (flagged = E >= t), and the
  flagged fraction of its failed faces and its false-alarm fraction [C, T] (NaN: none)."""
  t = np.asarray(thresholds, np.float64)

  def at(values):
    if not values.size:
      return np.full(t.shape, np.nan)
    return 1.0 - np.searchsorted(np.sort(values), t, side="left") / values.size
  rec = np.stack([at(e[(cond == c) & failed]) for c in names])
  fa = np.stack([at(e[(cond == c) & ~failed]) for c in names])
  ok = (np.isnan(rec) | (rec >= min_flagged)) & (np.isnan(fa) | (fa <= max_false_alarms))
  return ok, rec, fa


def choose_robust_t_fail(estimated, nme, condition, fail_nme: float = 0.10,
                         min_flagged: float = 0.5, max_false_alarms: float = 0.02) -> dict:
  """Tf on E for the target in every condition, or in as many as any Tf can.

  Flagged = E >= Tf. In each condition the flagged fraction of its failed faces falls as
  Tf rises, and so does its false-alarm fraction, so the Tfs meeting the target there form
  an interval. Rule: among the thresholds, those meeting the target in the most conditions
  (every condition when one can); of their contiguous runs the longest (in log Tf); Tf =
  its geometric middle, the most room on both sides for faces not seen here. "feasible":
  whether that is every condition."""
  e = np.asarray(estimated, np.float64)
  e = np.where(np.isfinite(e), e, np.inf)
  n = np.asarray(nme, np.float64)
  cond = np.asarray(condition)
  failed = ~(n <= fail_nme)
  names = list(dict.fromkeys(cond.tolist()))
  vals = np.unique(e[np.isfinite(e) & (e > 0)])
  # A threshold at each value and just above it (t = v flags v, t = v+ does not).
  cand = np.unique(np.concatenate([vals, np.nextafter(vals, np.inf)]))
  ok, rec, fa = _condition_ok(cand, e, failed, cond, names, min_flagged, max_false_alarms)
  count = ok.sum(0)
  best = int(count.max())
  top = np.flatnonzero(count == best)
  runs = np.split(top, np.flatnonzero(np.diff(top) > 1) + 1)
  run = max(runs, key=lambda r: (np.log(cand[r[-1]] / cand[r[0]]), -r[0]))
  lo, hi = float(cand[run[0]]), float(cand[run[-1]])
  t = float(np.sqrt(lo * hi))
  ok_t, rec_t, fa_t = _condition_ok([t], e, failed, cond, names, min_flagged, max_false_alarms)
  missed = [c for c, o in zip(names, ok_t[:, 0]) if not o]
  return {
      "t_fail": t, "feasible": best == len(names), "interval": [lo, hi],
      "conditions_meeting_target": best, "conditions": len(names),
      "conditions_missing_target": missed,
      "rule": (f"flagged = E >= Tf; the thresholds that flag >= {min_flagged:g} of the faces "
               f"above NME {fail_nme:g} with <= {max_false_alarms:g} false alarms in the most "
               f"conditions ({best} of {len(names)}); Tf = the geometric middle of their "
               f"longest run [{lo:.4f}, {hi:.4f}]"),
      "worst_condition_flagged_failed_rate": (float(np.nanmin(rec_t)) if np.isfinite(rec_t).any()
                                              else None),
      "worst_condition_false_alarm_rate": (float(np.nanmax(fa_t)) if np.isfinite(fa_t).any()
                                           else None)}


def isotonic_fit(x, y, max_knots: int = 64) -> dict:
  """Increasing least-squares fit of y on x (pool adjacent violators), as knots for
  np.interp (block means at block mean x, constant beyond the ends); at most max_knots
  (neighbouring blocks merged by weight when there are more)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  keep = np.isfinite(x) & np.isfinite(y)
  order = np.argsort(x[keep], kind="stable")
  xs, ys = x[keep][order], y[keep][order]
  vals, wts, xsum = [], [], []
  for xi, yi in zip(xs, ys):
    vals.append(yi)
    wts.append(1.0)
    xsum.append(xi)
    while len(vals) > 1 and vals[-2] >= vals[-1]:
      w = wts[-2] + wts[-1]
      vals[-2] = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / w
      xsum[-2] += xsum[-1]
      wts[-2] = w
      del vals[-1], wts[-1], xsum[-1]
  v, w, s = np.array(vals), np.array(wts), np.array(xsum)
  while v.size > max_knots:   # merge the lightest adjacent pair (keeps it increasing)
    i = int(np.argmin(w[:-1] + w[1:]))
    v[i] = (v[i] * w[i] + v[i + 1] * w[i + 1]) / (w[i] + w[i + 1])
    s[i] += s[i + 1]
    w[i] += w[i + 1]
    v, w, s = np.delete(v, i + 1), np.delete(w, i + 1), np.delete(s, i + 1)
  return {"x": (s / w).tolist(), "y": v.tolist(), "faces": int(keep.sum())}


def isotonic_apply(fit: dict, e) -> np.ndarray:
  return np.interp(np.asarray(e, np.float64), fit["x"], fit["y"])


def _fold_of(file_id: str) -> int:
  photo = datasets.photo_id(file_id.split("#")[0])
  return hashlib.sha256(f"robust_val_fold|{photo}".encode()).digest()[0] & 1


def cross_validated(estimated, nme, condition, file_ids, names, fail_nme, min_flagged,
                    max_false_alarms) -> dict:
  """The Tf choice on 2 folds of photos: chosen on one fold, counted on the other; the
  counts of both held-out folds added per condition."""
  e, n, cond = (np.asarray(estimated, np.float64), np.asarray(nme, np.float64),
                np.asarray(condition))
  fold = np.array([_fold_of(str(f)) for f in file_ids])
  tables, chosen = [], []
  for k in (0, 1):
    tr, te = fold != k, fold == k
    ch = choose_robust_t_fail(e[tr], n[tr], cond[tr], fail_nme, min_flagged, max_false_alarms)
    chosen.append(ch["t_fail"])
    tables.append(flag_table(e[te], n[te], cond[te], ch["t_fail"], fail_nme, names))
  total = {}
  for c in tables[0]:
    a, b = tables[0][c], tables[1][c]
    r = {k: a[k] + b[k] for k in ("faces", "failed", "flagged_failed", "false_alarms")}
    ok = r["faces"] - r["failed"]
    r["flagged_failed_rate"] = r["flagged_failed"] / r["failed"] if r["failed"] else None
    r["false_alarm_rate"] = r["false_alarms"] / ok if ok else None
    total[c] = r
  return {"t_fail_per_fold": chosen, "held_out_table": total,
          "meets_target": meets_target(total, min_flagged, max_false_alarms)}


# ---------------------------------------------------------------------------------------
# Scoring the model.


def _load_faces(data_cfg, split: str, max_faces: int) -> list[robust_val.Face]:
  data = datasets.load_split(data_cfg, split)
  m = len(data) if not max_faces else min(max_faces, len(data))
  return [robust_val.make_face(images_lib.read_image(io.BytesIO(data.images[i]),
                                                     exif_transpose=False),
                               data.landmarks[i], str(data.file_ids[i]), data.boxes[i])
          for i in range(m)]


def _nme_all(pred_lm, gt, scheme) -> dict:
  return {k: metrics.per_face_nme_numpy(pred_lm, gt, scheme, k).astype(np.float64)
          for k in metrics.NORMALISATIONS}


def _per_iteration(pred, faces, scheme, batch: int) -> tuple[np.ndarray, np.ndarray]:
  """Inter-ocular NME [S, F] and estimated error [S, F] after every iteration: the
  predictor's crops through `cascade.run_cascade_jit` (batches padded to `batch`)."""
  photos = [f.image for f in faces]
  boxes = [f.box for f in faces]
  crops, scale, offset, _, _ = pred.crops(photos, boxes)
  gt = np.stack([f.landmarks for f in faces]) * scale[:, None, None] + offset[:, None, :]
  init = jnp.asarray(pred.mean_shape)
  batch = predictor_lib.count_bucket(len(faces), batch)   # a few faces: a small program
  shapes, errors = [], []
  for out, k in cascade.run_cascade_padded(pred.params, crops, init, pred.model_config, batch):
    shapes.append(np.asarray(out.shapes)[:, :k])
    errors.append(np.asarray(out.errors)[:, :k])
  shapes, errors = np.concatenate(shapes, 1), np.concatenate(errors, 1)
  nme = np.stack([metrics.per_face_nme_numpy(sh, gt, scheme, "interocular") for sh in shapes])
  nme = nme.astype(np.float64)
  return nme, errors.astype(np.float64)


def _estimate_stats(e, nme, target) -> dict:
  fin = np.isfinite(e) & np.isfinite(nme) & np.isfinite(target)
  e, nme, target = e[fin], nme[fin], target[fin]
  if not e.size:
    return {}
  failed = nme > 0.10
  return {"mean": float(e.mean()), "median": float(np.median(e)),
          "median_target": float(np.median(target)),
          "spearman_vs_target": estimate_calibration.spearman(e, target),
          "median_target_over_true_nme": float(np.median(target / np.maximum(nme, 1e-9))),
          "median_true_nme": float(np.median(nme)),
          "median_true_over_estimated": float(np.median(nme / np.maximum(e, 1e-9))),
          "underestimated_fraction": float(np.mean(e < nme)),
          "spearman": estimate_calibration.spearman(e, nme),
          "pearson": estimate_calibration.pearson(e, nme),
          "failed_faces_median_estimated": float(np.median(e[failed])) if failed.any() else None,
          "failed_faces_median_true": float(np.median(nme[failed])) if failed.any() else None}


def score_condition(pred, faces, scheme, cfg: RobustValConfig) -> dict:
  """One condition's per-face arrays: NMEs, E, and per-iteration NME/E (optional)."""
  p = pred.predict([f.image for f in faces], [f.box for f in faces], t_fail=np.inf,
                   budget_mmacs=cfg.budget_mmacs)
  gt = np.stack([f.landmarks for f in faces])
  scale, offset = face_frame.crop_frames(np.stack([f.box for f in faces]))
  gt_crop = gt * scale[:, None, None] + offset[:, None, :]
  # E's training target (rectified L1 over the outer-eye distance, crop pixels) and the
  # roll of the predicted shape (outer eye corners), for the analysis of E.
  target = np.asarray(losses.per_iteration_error(
      jnp.asarray(p.crop_landmarks[None], jnp.float32), jnp.asarray(gt_crop, jnp.float32),
      scheme.outer_eye_corners))[0]
  a, b = scheme.outer_eye_corners
  d = p.landmarks[:, b] - p.landmarks[:, a]
  out = {"nme": _nme_all(p.landmarks, gt, scheme),
         "estimated": np.asarray(p.estimated_error, np.float64),
         "target": target.astype(np.float64),
         "roll_deg": np.degrees(np.arctan2(d[:, 1], d[:, 0])).astype(np.float64),
         "file_ids": [f.file_id for f in faces]}
  if cfg.budget_mmacs is not None:
    out["mmacs"] = _mmacs_per_face(pred, cfg.budget_mmacs, p.iterations)
    out["iterations"] = np.asarray(p.iterations)
  if cfg.per_iteration:
    out["nme_per_iteration"], out["estimated_per_iteration"] = _per_iteration(
        pred, faces, scheme, cfg.batch_size)
  return out


def _mmacs_per_face(pred, budget_mmacs: float, iterations) -> np.ndarray:
  """Multiply-adds per face (millions) of `pred.predict(budget_mmacs=...)`: the chosen
  schedule's iterations, plus the model's own full cascade for a face that escalated
  (more iterations than the cascade has)."""
  sub, _, _ = pred.for_budget_mmacs(budget_mmacs)
  return schedules.escalated_mmacs(sub.model_config, pred.model_config, iterations)


def summarise_condition(s: dict) -> dict:
  io_ = s["nme"]["interocular"]
  row = metrics.summarise(io_)
  row = {"faces": row["faces"], "nme_interocular": row["nme"],
         "nme_interpupil": float(np.mean(s["nme"]["interpupil"]) * 100),
         "nme_box": float(np.mean(s["nme"]["box"]) * 100),
         **{k: v for k, v in row.items() if k not in ("faces", "nme")}}
  if "nme_per_iteration" in s:
    row["nme_interocular_per_iteration"] = [float(x.mean() * 100) for x in s["nme_per_iteration"]]
    row["mean_estimated_per_iteration"] = [float(x.mean()) for x in s["estimated_per_iteration"]]
    row["failed_010_per_iteration"] = [int((~(x <= 0.10)).sum()) for x in s["nme_per_iteration"]]
  row["estimated_error"] = _estimate_stats(s["estimated"], io_, s["target"])
  if "mmacs" in s:
    row["mmacs_per_face"] = float(np.mean(s["mmacs"]))
    row["mean_iterations"] = float(np.mean(s["iterations"]))
  return row


def condition_ranges(estimated, nme, condition, names, fail_nme, min_flagged,
                     max_false_alarms) -> dict:
  """Per condition, the Tfs that meet each half of the target there: false alarms within
  bound from `false_alarms_ok_from` up; flagged fraction of the failed faces within bound
  up to `flagged_ok_up_to` (None: no failed faces)."""
  e = np.asarray(estimated, np.float64)
  e = np.where(np.isfinite(e), e, np.inf)
  n, cond = np.asarray(nme, np.float64), np.asarray(condition)
  failed = ~(n <= fail_nme)
  vals = np.unique(e[np.isfinite(e)])
  cand = np.unique(np.concatenate([vals, np.nextafter(vals, np.inf)]))
  _, rec, fa = _condition_ok(cand, e, failed, cond, names, min_flagged, max_false_alarms)
  out = {}
  for i, c in enumerate(names):
    fa_ok = np.isnan(fa[i]) | (fa[i] <= max_false_alarms)
    rec_ok = rec[i] >= min_flagged
    out[c] = {"false_alarms_ok_from": float(cand[fa_ok].min()) if fa_ok.any() else None,
              "flagged_ok_up_to": (None if np.isnan(rec[i]).all() else
                                   float(cand[rec_ok].max()) if rec_ok.any() else 0.0)}
  return out


def analysis(rows: dict, quality: dict) -> list[str]:
  """Sentences drawn from the numbers: which conditions hurt most, at which iteration
  the error appears, how E reads against the truth, and what keeps Tf from the target."""
  out = []
  clean = rows.get("clean")
  order = sorted(rows, key=lambda c: -rows[c]["nme_interocular"])
  if clean:
    base = clean["nme_interocular"]
    worst = [c for c in order if c != "clean"][:4]
    out.append("Worst conditions by mean inter-ocular NME (clean %.2f%%): " % base + "; ".join(
        f"{c} {rows[c]['nme_interocular']:.2f}% ({rows[c]['nme_interocular'] / base - 1:+.0%}), "
        f"FR@0.10 {rows[c]['fr_010'] * 100:.1f}%" for c in worst) + ".")
    if "nme_interocular_per_iteration" in clean:
      for c in worst:
        it, ci = rows[c]["nme_interocular_per_iteration"], clean["nme_interocular_per_iteration"]
        fails = rows[c]["failed_010_per_iteration"]
        if fails[-1] >= fails[-2] and fails[-1] > 0:
          why = ("the last iteration does not reduce the failures (the refinement stalls on "
                 "them)")
        elif fails[0] >= 2 * max(fails[-1], 1):
          why = ("most failures are there after the first iteration (the start: the upright "
                 "mean shape in the box) and the later iterations recover most of them")
        else:
          why = "the failures shrink at every iteration"
        out.append(f"{c}: NME per iteration {' -> '.join(f'{x:.2f}' for x in it)} (clean "
                   f"{' -> '.join(f'{x:.2f}' for x in ci)}); faces above 0.10 after each "
                   f"iteration {fails}: {why}.")
  est = {c: rows[c]["estimated_error"] for c in rows}
  under = sorted(rows, key=lambda c: -(est[c].get("median_true_over_estimated") or 0))
  out.append("E against the true inter-ocular NME (median true / E; Spearman): " + "; ".join(
      f"{c} {est[c]['median_true_over_estimated']:.2f}, {est[c]['spearman']:.2f}"
      for c in under) + ".")
  if all("median_target_over_true_nme" in est[c] for c in rows):
    ratios = [est[c]["median_target_over_true_nme"] for c in rows]
    out.append(f"E's training target (rectified L1 / outer-eye distance) is "
               f"{min(ratios):.2f}-{max(ratios):.2f} x the inter-ocular NME in every "
               f"condition, so a misread E is the estimate's own error, not the metric's: "
               f"median E / target " + ", ".join(
                   f"{c} {est[c]['median'] / est[c]['median_target']:.2f}"
                   for c in [under[0], "clean", under[-1]] if c in est) + ".")
  d = quality["default"]
  missed = [c for c, r in d["table"].items() if c != "all" and r["failed"]
            and r["flagged_failed"] / r["failed"] < quality["min_flagged"]]
  if missed:
    out.append(f"Today's Tf {d['t_fail']:.4f} flags fewer than "
               f"{quality['min_flagged']:.0%} of the failed faces in: " + ", ".join(
                   f"{c} ({d['table'][c]['flagged_failed']}/{d['table'][c]['failed']})"
                   for c in missed) + ".")
  ranges = quality.get("per_condition_tf_range", {})
  if ranges and not quality["recalibrated"]["feasible"]:
    hi = [(c, r["flagged_ok_up_to"]) for c, r in ranges.items()
          if r["flagged_ok_up_to"] is not None]
    lo = [(c, r["false_alarms_ok_from"]) for c, r in ranges.items()
          if r["false_alarms_ok_from"] is not None]
    c_hi, t_hi = min(hi, key=lambda x: x[1])
    c_lo, t_lo = max(lo, key=lambda x: x[1])
    alone = [c for c, r in ranges.items() if r["flagged_ok_up_to"] is not None
             and r["false_alarms_ok_from"] is not None
             and r["false_alarms_ok_from"] > r["flagged_ok_up_to"]]
    out.append(f"No threshold on E (nor on any increasing calibration of it) meets the "
               f"target everywhere: {c_lo} needs Tf >= {t_lo:.4f} for at most "
               f"{quality['max_false_alarms']:.0%} false alarms, {c_hi} needs Tf <= "
               f"{t_hi:.4f} to flag {quality['min_flagged']:.0%} of its failures"
               + (f"; {', '.join(alone)} cannot meet it even alone (E does not rank its "
                  f"failed faces above the others well enough)" if alone else "")
               + ". The fix is in the estimate (trained on such faces), not in Tf.")
  return out


def _ced(curves: dict, path: str, title: str) -> None:
  import matplotlib  # noqa: PLC0415
  from cycler import cycler  # noqa: PLC0415
  from experiments import plots  # noqa: PLC0415
  colours = matplotlib.colormaps["tab20"].colors
  styles = ["-", "--", "-.", ":"]
  cyc = cycler(color=[colours[i % 20] for i in range(len(curves))],
               linestyle=[styles[(i // 10) % 4] for i in range(len(curves))])
  with matplotlib.rc_context({"axes.prop_cycle": cyc, "figure.figsize": (8, 6)}):
    plots.ced_plot(curves, path, threshold=0.10, title=title)


def check_split_and_conditions(split: str, conditions, what: str) -> None:
  """UsageError naming the flag for a test split or an unknown condition."""
  if split in TEST_SPLITS:
    raise app.UsageError(f"--split={split} is a test split; {what} validation faces "
                         f"(e.g. val)")
  for c in conditions:
    try:
      robust_val.check_condition(c)
    except ValueError as e:
      raise app.UsageError(f"--conditions: {e}") from None


def run(cfg: RobustValConfig, data_cfg, command: str = "") -> dict:
  """Every condition of cfg on cfg.split's faces: the result dict (also written to
  cfg.output_json)."""
  check_split_and_conditions(cfg.split, cfg.conditions, "the robustness validation is built "
                             "from")
  t0 = time.time()
  loaded = common.load_model(None, cfg.model)
  pred = predictor_lib.Predictor.from_loaded(loaded, max_batch=cfg.batch_size)
  if cfg.budget_mmacs is not None:
    try:
      pred.for_budget_mmacs(cfg.budget_mmacs)
      pred.budget_iterations(budget_mmacs=cfg.budget_mmacs)   # in range for the model's own
    except ValueError as e:
      raise app.UsageError(f"--budget_mmacs: {e}") from None
  scheme = schemes.get_scheme(pred.model_config.num_landmarks)
  faces = _load_faces(data_cfg, cfg.split, cfg.max_faces)
  print(f"{cfg.split}: {len(faces)} faces; {len(cfg.conditions)} conditions", flush=True)
  scored, rows, infos = {}, {}, {}
  for c in cfg.conditions:
    t = time.time()
    cf = robust_val.apply(c, faces, data_cfg.seed, flip_permutation=scheme.flip_permutation,
                          label_shift=data_cfg.flip_label_shift,
                          box_jitter_fn=datasets.jitter_boxes,
                          yaw_fraction=cfg.yaw_fraction)
    scored[c] = score_condition(pred, cf, scheme, cfg)
    rows[c] = summarise_condition(scored[c])
    if c.startswith("downscale_"):
      infos[c] = {"downscaled_faces": int(sum(f.info["downscaled"] for f in cf))}
    if c == "strong_yaw":
      infos[c] = {"chosen_faces": len(cf) // 2,
                  "yaw_asymmetry_min": float(min(f.info["yaw_asymmetry"]
                                                 for f in cf[:len(cf) // 2]))}
    if c.startswith("occlusion_"):
      infos[c] = {"noise_filled": int(sum(f.info["occlusion_fill"] == "noise" for f in cf))}
    if infos.get(c):
      rows[c]["info"] = infos[c]
    print(f"  {c:16s} {rows[c]['faces']:4d} faces  NME io {rows[c]['nme_interocular']:.2f}%  "
          f"FR@0.10 {rows[c]['fr_010'] * 100:5.1f}%  ({time.time() - t:.0f} s)", flush=True)
  if "clean" in rows:
    for c in rows:
      rows[c]["nme_interocular_vs_clean_pct"] = (
          (rows[c]["nme_interocular"] / rows["clean"]["nme_interocular"] - 1) * 100)

  # Quality score.
  names = list(cfg.conditions)
  est = np.concatenate([scored[c]["estimated"] for c in names])
  nme = np.concatenate([scored[c]["nme"]["interocular"] for c in names])
  cond = np.concatenate([[c] * len(scored[c]["estimated"]) for c in names])
  ids = [f for c in names for f in scored[c]["file_ids"]]
  q = cfg.quality_fail_nme, cfg.min_flagged, cfg.max_false_alarms
  default_tf = float(pred.default_t_fail)
  default_table = flag_table(est, nme, cond, default_tf, cfg.quality_fail_nme, names)
  chosen = choose_robust_t_fail(est, nme, cond, *q)
  new_table = flag_table(est, nme, cond, chosen["t_fail"], cfg.quality_fail_nme, names)
  iso = isotonic_fit(est, nme)
  fin = np.isfinite(est) & np.isfinite(nme) & (est > 0)
  scale = float(np.median(nme[fin] / est[fin])) if fin.any() else float("nan")
  calibrated = {c: {"median_estimated": float(np.median(scored[c]["estimated"])),
                    "median_isotonic": float(np.median(
                        isotonic_apply(iso, scored[c]["estimated"]))),
                    "median_scaled": float(np.median(scored[c]["estimated"]) * scale),
                    "median_true": float(np.median(scored[c]["nme"]["interocular"]))}
                for c in names}
  quality = {
      "per_condition_tf_range": condition_ranges(est, nme, cond, names, *q),
      "fail_nme": cfg.quality_fail_nme, "min_flagged": cfg.min_flagged,
      "max_false_alarms": cfg.max_false_alarms,
      "flagged_means": "estimated error E >= Tf (Predictor.predict: valid = E < Tf)",
      "default": {"t_fail": default_tf, "source": "model.json default_t_fail",
                  "table": default_table,
                  "meets_target": meets_target(default_table, cfg.min_flagged,
                                               cfg.max_false_alarms)},
      "recalibrated": {**chosen, "chosen_on": f"{cfg.split} + robust-val ({len(names)} "
                                              f"conditions, {len(est)} faces)",
                       "t_fail_in_isotonic_units": float(isotonic_apply(iso, chosen["t_fail"]))
                       if np.isfinite(chosen["t_fail"]) else None,
                       "table": new_table,
                       "meets_target": meets_target(new_table, cfg.min_flagged,
                                                    cfg.max_false_alarms),
                       "cross_validated": cross_validated(est, nme, cond, ids, names, *q)},
      "calibration": {"isotonic": iso, "scale": scale,
                      "scale_rule": "median of true inter-ocular NME / E over every face",
                      "per_condition_medians": calibrated},
      "install": ("not installed. Installing Tf = setting model.json's default_t_fail "
                  "(musica_jax.model_io.set_default_t_fail(model_dir, t_fail, how), what "
                  "`experiments.choose_t_fail --install` calls; it re-stamps model_sha256). "
                  "The calibration has no place in model.json yet: shipping it means a "
                  "model.json field (the isotonic knots or the scale) read by model_io and "
                  "applied by Predictor to estimated_error (valid unchanged: the map is "
                  "increasing, so Tf on E is the same decision)."),
  }
  result = {
      **common.model_provenance(loaded), "command": command, "split": cfg.split,
      "dataset": data_cfg.dataset, "faces": len(faces), "seed": data_cfg.seed,
      "transforms": {"module": "data_pipelines.robust_val",
                     "motion_blur_length_frac": robust_val.MOTION_BLUR_FRAC,
                     "defocus_radius_frac": robust_val.DEFOCUS_RADIUS_FRAC,
                     "yaw_fraction": cfg.yaw_fraction,
                     "rotation_box": "the rotated landmarks' box",
                     "box": "the landmark box (300W convention) of the transformed landmarks; "
                            "box_jitter_F: datasets.jitter_boxes(F, --seed)",
                     "flip_label_shift": data_cfg.flip_label_shift,
                     "face_size": "the landmark box's longer side"},
      "conditions": rows, "quality_score": quality,
      "per_face": {c: {"file_id": scored[c]["file_ids"],
                       "nme_interocular": np.round(scored[c]["nme"]["interocular"], 6).tolist(),
                       "estimated_error": np.round(scored[c]["estimated"], 6).tolist(),
                       "estimated_error_target": np.round(scored[c]["target"], 6).tolist(),
                       "predicted_roll_deg": np.round(scored[c]["roll_deg"], 3).tolist(),
                       **({"estimated_error_per_iteration":
                           np.round(scored[c]["estimated_per_iteration"].T, 6).tolist(),
                           "nme_interocular_per_iteration":
                           np.round(scored[c]["nme_per_iteration"].T, 6).tolist()}
                          if "nme_per_iteration" in scored[c] else {})}
                   for c in names},
      "seconds": None}
  result["analysis"] = analysis(rows, quality)
  if cfg.ced_png:
    _ced({c: scored[c]["nme"]["interocular"] for c in names}, cfg.ced_png,
         f"{cfg.split} ({len(faces)} faces) under the robust-val conditions, model {cfg.model}")
    result["ced_png"] = cfg.ced_png
    print(f"wrote {cfg.ced_png}")
  result["seconds"] = time.time() - t0
  common.write_json(cfg.output_json, result, indent=1)
  return result


# ---------------------------------------------------------------------------------------
# The report.


def _pct(x) -> str:
  return "-" if x is None else f"{x * 100:.1f}%"


def _quality_rows(table: dict) -> list[str]:
  lines = ["| condition | faces | above 0.10 | flagged among them | false alarms |",
           "|---|---|---|---|---|"]
  for c, r in table.items():
    lines.append(f"| {c} | {r['faces']} | {r['failed']} | {r['flagged_failed']} "
                 f"({_pct(r['flagged_failed_rate'])}) | {r['false_alarms']} "
                 f"({_pct(r['false_alarm_rate'])}) |")
  return lines


def markdown_report(res: dict) -> str:
  """The per-condition table, the quality-score tables and the analysis."""
  rows, q, tr = res["conditions"], res["quality_score"], res["transforms"]
  per_it = any("nme_interocular_per_iteration" in r for r in rows.values())
  budget = any("mmacs_per_face" in r for r in rows.values())
  head = ("| condition | faces | NME io % (vs clean) | NME ip % | FR@0.08 | FR@0.10 | AUC@0.10 "
          + ("| NME io per iteration " if per_it else "")
          + ("| MMACs per face (mean iterations) " if budget else "")
          + "| median E | median true | Spearman(E, NME) |")
  lines = [f"# Robust-val: {res.get('model_name') or res.get('model_path')} on {res['split']} "
           f"({res['faces']} faces)", "", f"Command: `{res['command']}`", "",
           f"Conditions (data_pipelines.robust_val, seed {res['seed']}): face size = "
           f"{tr['face_size']}; downscale_Spx: to an S-px face and back; jpeg_qQ; "
           f"motion_blur: a line of {tr['motion_blur_length_frac']:g} x face size, random "
           f"direction; defocus_blur: a disk of radius {tr['defocus_radius_frac']:g} x face "
           f"size; rotate_D: +-D deg about the face centre, box = {tr['rotation_box']}; "
           f"strong_yaw: the {tr['yaw_fraction']:.0%} most asymmetric faces (half-face width "
           f"ratio) + their mirrors (flip permutation, label shift {tr['flip_label_shift']:g} "
           f"px); occlusion_P: a grey or noise rectangle over P% of the box; box_jitter_F: "
           f"the evaluation jitter rule. Box: {tr['box']}.", "",
           head, "|" + "---|" * (head.count("|") - 1)]
  for c, r in rows.items():
    e = r["estimated_error"]
    vs = r.get("nme_interocular_vs_clean_pct")
    lines.append(
        f"| {c} | {r['faces']} | {r['nme_interocular']:.2f}"
        + (f" ({vs:+.0f}%)" if vs is not None and c != "clean" else "")
        + f" | {r['nme_interpupil']:.2f} | {_pct(r['fr_008'])} | {_pct(r['fr_010'])} | "
        f"{r['auc_010']:.3f} | "
        + (" / ".join(f"{x:.2f}" for x in r.get("nme_interocular_per_iteration", [])) + " | "
           if per_it else "")
        + (f"{r['mmacs_per_face']:.1f} ({r['mean_iterations']:.2f}) | " if budget else "")
        + f"{e['median']:.3f} | {e['median_true_nme']:.3f} | {e['spearman']:.2f} |")
  lines += ["", f"CED: `{res.get('ced_png')}`", "", "## Quality score",
            f"Target: in every condition at least {q['min_flagged']:.0%} of the faces above "
            f"{q['fail_nme']:g} inter-ocular NME flagged, at most {q['max_false_alarms']:.0%} "
            f"false alarms (faces at or below it flagged). Flagged: {q['flagged_means']}.", "",
            f"### (a) today's Tf = {q['default']['t_fail']:.4f} ({q['default']['source']}): "
            f"target met in every condition: {q['default']['meets_target']['every_condition']}",
            ""] + _quality_rows(q["default"]["table"])
  r = q["recalibrated"]
  lines += ["", f"### (b) recalibrated Tf = {r['t_fail']:.4f} on E "
            f"({r['t_fail_in_isotonic_units']:.4f} in calibrated units), chosen on "
            f"{r['chosen_on']}: target met in every condition: "
            f"{r['meets_target']['every_condition']}", "", f"Rule: {r['rule']}."]
  if not r["feasible"]:
    lines.append(f"No Tf meets the target in every condition; at most "
                 f"{r['conditions_meeting_target']} of {r['conditions']} "
                 f"(missing at Tf: {', '.join(r['conditions_missing_target'])}).")
  lines += [""] + _quality_rows(r["table"])
  ranges = q.get("per_condition_tf_range")
  if ranges:
    fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    lines += ["", "Per condition, the Tfs that meet each half of the target there:", "",
              f"| condition | <= {q['max_false_alarms']:.0%} false alarms for Tf >= | "
              f">= {q['min_flagged']:.0%} of failures flagged for Tf <= |", "|---|---|---|"]
    lines += [f"| {c} | {fmt(v['false_alarms_ok_from'])} | {fmt(v['flagged_ok_up_to'])} |"
              for c, v in ranges.items()]
  cv = r["cross_validated"]
  lines += ["", f"Held out (2 folds by photo; Tf per fold "
            f"{', '.join(f'{t:.4f}' for t in cv['t_fail_per_fold'])}): target met in every "
            f"condition: {cv['meets_target']['every_condition']}", ""] + _quality_rows(
                cv["held_out_table"])
  cal = q["calibration"]
  lines += ["", "### Calibration of E (fitted on the same faces)",
            f"Scale: true NME ~ {cal['scale']:.2f} x E ({cal['scale_rule']}); isotonic: "
            f"{len(cal['isotonic']['x'])} knots (in the JSON).", "",
            "| condition | median E | median E, isotonic | median E x scale | median true NME |",
            "|---|---|---|---|---|"]
  for c, m in cal["per_condition_medians"].items():
    lines.append(f"| {c} | {m['median_estimated']:.4f} | {m['median_isotonic']:.4f} | "
                 f"{m['median_scaled']:.4f} | {m['median_true']:.4f} |")
  lines += ["", f"Installing: {q['install']}", "", "## Analysis"] + [
      f"- {s}" for s in analysis(rows, q)]
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# Several models side by side (experiments.robust_val_compare).


def compare(results: dict[str, dict]) -> dict:
  """{name: a `run` result} (the first the reference) -> per condition each run's NME
  (inter-ocular %) and FR@0.10, and per run where it is better / worse than the
  reference and its recalibrated quality score. The runs must share their conditions."""
  names = list(results)
  if not names:
    raise ValueError("no runs to compare")
  ref = results[names[0]]
  conditions = list(ref["conditions"])
  for n in names[1:]:
    if list(results[n]["conditions"]) != conditions:
      raise ValueError(f"{n}: conditions {list(results[n]['conditions'])} differ from "
                       f"{names[0]}'s {conditions}")
  rows = {c: {n: {"nme_interocular": results[n]["conditions"][c]["nme_interocular"],
                  "fr_010": results[n]["conditions"][c]["fr_010"]} for n in names}
          for c in conditions}
  runs = {}
  for n in names:
    delta = {c: rows[c][n]["nme_interocular"] - rows[c][names[0]]["nme_interocular"]
             for c in conditions}
    q = results[n].get("quality_score", {}).get("recalibrated", {})
    runs[n] = {"model": results[n].get("model_name"), "step": results[n].get("checkpoint_step"),
               "averaged_from": results[n].get("averaged_from"),
               "better_in": [c for c in conditions if delta[c] < 0],
               "worse_in": [c for c in conditions if delta[c] > 0],
               "quality_conditions_meeting_target": q.get("conditions_meeting_target"),
               "quality_t_fail": q.get("t_fail")}
  return {"reference": names[0], "conditions": conditions, "rows": rows, "runs": runs}


def compare_markdown(table: dict) -> str:
  names, ref = list(table["runs"]), table["reference"]
  head = ["| condition | " + " | ".join(f"{n}: NME io % / FR@0.10" for n in names) + " |",
          "|---|" + "---|" * len(names)]
  lines = []
  for c in table["conditions"]:
    cells = []
    for n in names:
      r = table["rows"][c][n]
      better = n != ref and r["nme_interocular"] < table["rows"][c][ref]["nme_interocular"]
      text = f"{r['nme_interocular']:.2f} / {100 * r['fr_010']:.1f}%"
      cells.append(f"**{text}**" if better else text)
    lines.append(f"| {c} | " + " | ".join(cells) + " |")
  summary = []
  for n in names:
    r = table["runs"][n]
    q = (f"quality score (Tf on val + robust-val) meets the target in "
         f"{r['quality_conditions_meeting_target']} conditions"
         if r["quality_conditions_meeting_target"] is not None else "no quality score")
    where = "" if n == ref else (
        f": lower NME than {ref} in {len(r['better_in'])} of {len(table['conditions'])} "
        f"conditions" + (f" (not in {', '.join(r['worse_in'])})" if r["worse_in"] else
                         " (every condition)"))
    made = (f"step {r['step']}" if not r.get("averaged_from") else "the average of " + " + ".join(
        f"{a['weight']:.2g} x {a['model_name']} (step {a['checkpoint_step']})"
        for a in r["averaged_from"]))
    summary.append(f"- {n} (model {r['model']}, {made}){where}; {q}.")
  return ("\n".join(head + lines) + "\n\nBold: lower inter-ocular NME than the reference "
          f"({ref}).\n\n" + "\n".join(summary) + "\n")
