"""The early-exit analysis of experiments.sweep_thresholds, flag-free: `run(SweepConfig,
data_cfg)` evaluates the model once, analyses every Ts (experiments.threshold_analysis) and
writes the JSON and the figures. Tests call it in-process."""
from __future__ import annotations

import dataclasses
import os
import pathlib

from absl import app
import jax
import numpy as np

from data_pipelines import input_pipeline
from experiments import eval_lib
from experiments import common
from experiments import early_exit_policies as eep
from experiments import estimate_calibration
from experiments import policy_plots
from experiments import threshold_analysis as ta
from musica_jax import atomic_io
from musica_jax import schemes
from musica_jax import strict_json


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """What to analyse and where to write it (the flags of experiments.sweep_thresholds)."""
  output_json: str
  workdir: str | None = None
  model: str | None = None
  checkpoint: str = "latest"
  plot: str | None = None
  num_ts: int = 300
  draws: int = 50
  seed: int = 0
  norm: str = "interocular"
  compare_iterations: float = 2.0
  target_nme: tuple[float, ...] = ()
  budget_iterations: tuple[float, ...] = ()
  budget_mmacs: tuple[float, ...] = ()
  t_fail_ts: float | None = None
  figure7_workdirs: tuple[str, ...] = ()
  figure7_plot: str | None = None
  figure7_json: str | None = None
  figure1: str | None = None
  figure1_faces: int = 6
  figure1_ts: float | None = None


def evaluate_workdir(workdir, data_cfg, split, keep_landmarks, checkpoint="latest", model=None):
  """(provenance, model config, checkpoint step, per-face outputs of the full cascade) of a
  training workdir's checkpoint or of an exported model (--model=DIR|default)."""
  loaded = common.load_model(workdir, model, checkpoint)
  model_cfg, mean_shape = loaded.model_config, loaded.mean_shape
  info, (params, mesh) = common.model_provenance(loaded), eval_lib.on_devices(loaded)
  if data_cfg.num_points != model_cfg.num_landmarks:
    raise app.UsageError(f"--num_points={data_cfg.num_points} but the model in "
                         f"{workdir or model} has {model_cfg.num_landmarks} landmarks")
  scheme = schemes.get_scheme(model_cfg.num_landmarks)
  per_face = eval_lib.run_split(params, data_cfg, split, model_cfg, scheme, mean_shape,
                                mesh, keep_landmarks=keep_landmarks)
  return info, model_cfg, info["checkpoint_step"], per_face


def variant_name(model_cfg, workdir) -> str:
  att = "" if model_cfg.use_attention else ", no attention"
  return f"MuSiCa{model_cfg.num_patches}{att} ({pathlib.Path(workdir).name})"


def split_images(data_cfg, split, indices) -> np.ndarray:
  """The standardised eval crops of the faces at `indices` (dataset order, padding
  skipped), re-read through the eval pipeline."""
  want = {int(i): n for n, i in enumerate(indices)}
  out = [None] * len(indices)
  seen = 0
  for batch in input_pipeline.eval_iterator(data_cfg, split):
    for row in np.flatnonzero(batch["mask"]):
      if seen in want:
        out[want[seen]] = np.asarray(batch["image"][row])
      seen += 1
    if all(o is not None for o in out):
      break
  return np.stack(out)


def _default_path(output_json, suffix):
  p = pathlib.Path(output_json)
  return str(p.with_name(p.stem + suffix))


def _print_summary(data_cfg, split, data_note, f, step, cfg, a) -> None:
  nme, sw, c = a["nme"], a["sweep"], a["comparison"]
  print(f"{data_cfg.dataset}/{split}{data_note}: {f} faces, step {step}, full cascade NME "
        f"{float(nme[-1].mean()):.3f}% ({cfg.norm}), per iteration "
        + ", ".join(f"{x:.3f}" for x in nme.mean(1)))
  if c["random_nme"] is not None and c["policy_nme"] is not None:
    match = c["policy_iterations_to_match"]
    print(f"at {cfg.compare_iterations:g} mean iterations: random {c['random_nme']:.3f}%, ours "
          f"{c['policy_nme']:.3f}% ({c['relative_gain'] * 100:+.1f}% gain), oracle "
          f"{c['oracle_nme']:.3f}%; ours matches random with "
          + (f"{match:.2f} mean iterations ({c['iterations_ratio'] * 100:.0f}%)"
             if match is not None else "no swept Ts"))
  else:
    print(f"{cfg.compare_iterations:g} mean iterations is outside the swept range "
          f"[{min(sw['mean_iterations']):.2f}, {max(sw['mean_iterations']):.2f}]")


def _result(info, model_cfg, step, data_cfg, split, cfg, a, t_fail, calib) -> dict:
  nme, est, s, f = a["nme"], a["estimated"], *a["nme"].shape
  mmacs_it = a["mmacs_per_iteration"]
  return {
      "workdir": info.get("workdir"), "model_path": info.get("model_path"),
      "checkpoint_step": step,
      "dataset": data_cfg.dataset, "split": split, "faces": f,
      "synthetic_data": data_cfg.dataset == "synthetic_faces",
      "model": dataclasses.asdict(model_cfg),
      "mmacs_per_iteration": mmacs_it, "mmacs_full_cascade": mmacs_it * s,
      "nme_normalisation": cfg.norm, "nme_units": "percent",
      "estimated_error_units": "fraction: the training target, rectified L1 / (N * "
                               "outer-eye distance); Ts and Tf are in these units",
      "random_draws": cfg.draws, "random_seed": cfg.seed,
      "oracle_definition": ta.ORACLE_DEFINITION,
      "full_cascade": {"nme_per_iteration": [float(x) for x in nme.mean(1)],
                       "mean_estimated_per_iteration": [float(x) for x in est.mean(1)]},
      "comparison": a["comparison"],
      "sweep": a["sweep"],
      "t_fail_analysis": t_fail,
      "working_points": ta.working_points(a["sweep"], float(nme[-1].mean()),
                                          a.get("mmacs_per_stage", mmacs_it),
                                          cfg.target_nme, cfg.budget_iterations,
                                          cfg.budget_mmacs),
      "calibration": calib,
  }


def _figure1(cfg, data_cfg, split, data_note, a, per_face) -> dict:
  nme, est = a["nme"], a["estimated"]
  ts1 = ta.figure1_ts(a["comparison"], est, cfg.figure1_ts)
  exit1 = eep.exit_iterations(est, ts1)
  faces = ta.pick_figure1_faces(exit1, cfg.figure1_faces)
  images = split_images(data_cfg, split, faces)
  policy_plots.figure1(images, per_face["shapes"][:, faces], est[:, faces], ts1, cfg.figure1,
                       title=f"Ts = {ts1:.4f} (estimated error above each face; "
                             f"{data_cfg.dataset}/{split}{data_note})")
  return {"png": cfg.figure1, "ts": ts1, "face_indices": faces.tolist(),
          "file_ids": [x.decode() if isinstance(x, bytes) else str(x)
                       for x in per_face["file_id"][faces]],
          "exit_iterations": (exit1[faces] + 1).tolist(),
          "nme": nme[exit1[faces], faces].tolist()}


def _figure7(cfg, data_cfg, split, data_note, source, model_cfg, step, a) -> dict:
  """Figure 7 over --workdir (or --model) and --figure7_workdirs: PNG and JSON."""
  variants, seen = [], set()
  for wd in [source] + list(cfg.figure7_workdirs):
    key = os.path.abspath(wd)
    if key in seen:
      continue
    seen.add(key)
    if key == source:
      cfg_v, step_v, a_v = model_cfg, step, a
    else:
      _, cfg_v, step_v, pf_v = evaluate_workdir(wd, data_cfg, split, keep_landmarks=False)
      a_v = ta.analyse(pf_v, cfg_v, cfg.norm, cfg.num_ts, cfg.draws, cfg.seed,
                       cfg.compare_iterations, with_oracle=False)
    variants.append(ta.variant_row(variant_name(cfg_v, wd), key, step_v, cfg_v, a_v))
    sv = a_v["sweep"]
    print(f"figure 7: {variants[-1]['name']}: "
          f"{a_v['mmacs_per_iteration'] * a['nme'].shape[0]:.1f} MMACs "
          f"full, NME {sv['nme_policy'][0]:.3f}% full -> {sv['nme_policy'][-1]:.3f}% at "
          f"one iteration")
  f7_png = cfg.figure7_plot or _default_path(cfg.output_json, ".figure7.png")
  f7_json = cfg.figure7_json or _default_path(cfg.output_json, ".figure7.json")
  policy_plots.figure7(variants, f7_png, title=f"{data_cfg.dataset}/{split}{data_note}: "
                       "NME vs multiply-adds, one line per model over Ts",
                       nme_label=f"NME, {cfg.norm} (%)")
  atomic_io.write_text(f7_json, strict_json.dumps({
      "dataset": data_cfg.dataset, "split": split,
      "synthetic_data": data_cfg.dataset == "synthetic_faces",
      "nme_normalisation": cfg.norm, "nme_units": "percent", "variants": variants},
      indent=1, nonfinite="string"))
  return {"png": f7_png, "json": f7_json}


def _plots(cfg, title, a, t_fail, true_error) -> list[str]:
  """Figure 2, the Tf curve and the calibration plot: the paths written."""
  plot = cfg.plot or _default_path(cfg.output_json, ".figure2.png")
  policy_plots.figure2(a["sweep"], a["comparison"], plot, title=title,
                       nme_label=f"NME, {cfg.norm} (%)")
  t_fail_png = str(pathlib.Path(plot).with_suffix(".t_fail.png"))
  policy_plots.t_fail_plot(t_fail["curve"], t_fail_png,
                           title=title + (f", Ts={cfg.t_fail_ts:g}"
                                          if cfg.t_fail_ts is not None else ", full cascade"),
                           nme_label=f"NME of valid faces, {cfg.norm} (%)")
  cal_png = str(pathlib.Path(plot).with_suffix(".calibration.png"))
  policy_plots.estimate_scatter(a["estimated"], true_error, cal_png, title=title)
  return [plot, t_fail_png, cal_png]


def run(cfg: SweepConfig, data_cfg) -> dict:
  """The analysis of one model on the first split of data_cfg.eval_split: the result JSON
  (also written to cfg.output_json) with the figures beside it."""
  if jax.process_count() != 1:
    raise app.UsageError("sweep_thresholds runs on one host")
  splits = [s for s in data_cfg.eval_split.split(",") if s]
  split = splits[0]
  if len(splits) > 1:
    print(f"note: several eval splits given ({data_cfg.eval_split}); using {split}")
  info, model_cfg, step, per_face = evaluate_workdir(
      cfg.workdir, data_cfg, split, keep_landmarks=bool(cfg.figure1),
      checkpoint=cfg.checkpoint, model=cfg.model)
  source = info.get("workdir") or info["model_path"]   # absolute
  a = ta.analyse(per_face, model_cfg, cfg.norm, cfg.num_ts, cfg.draws, cfg.seed,
                 cfg.compare_iterations)
  t_fail = ta.t_fail_analysis(a["nme"], a["estimated"], cfg.t_fail_ts)
  calib = estimate_calibration.calibration(a["estimated"], per_face["true_error"],
                                           a["nme"] / 100.0)
  result = _result(info, model_cfg, step, data_cfg, split, cfg, a, t_fail, calib)
  f = result["faces"]
  data_note = " (SYNTHETIC faces)" if result["synthetic_data"] else ""
  _print_summary(data_cfg, split, data_note, f, step, cfg, a)
  print("calibration (Pearson / Spearman of E vs its target) per iteration: "
        + ", ".join(f"{d['pearson']:.3f}/{d['spearman']:.3f}"
                    for d in calib["per_iteration"]))
  title = (f"{data_cfg.dataset}/{split}{data_note}, {f} faces, MuSiCa{model_cfg.num_patches}"
           f" step {step}")
  written = [str(pathlib.Path(cfg.output_json))] + _plots(cfg, title, a, t_fail,
                                                          per_face["true_error"])
  if cfg.figure1:
    result["figure1"] = _figure1(cfg, data_cfg, split, data_note, a, per_face)
    written.append(cfg.figure1)
  if cfg.figure7_workdirs:
    result["figure7"] = _figure7(cfg, data_cfg, split, data_note, source, model_cfg, step, a)
    written += [result["figure7"]["png"], result["figure7"]["json"]]
  # Infinite thresholds (a rule switched off) are settings here: written as "inf" strings.
  atomic_io.write_text(cfg.output_json, strict_json.dumps(result, indent=1,
                                                          nonfinite="string"))
  print("wrote " + ", ".join(str(w) for w in written))
  return result
