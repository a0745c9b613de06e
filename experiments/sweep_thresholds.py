r"""Early-exit analysis ("knowing when to quit", paper 3.2): Ts sweep, Tf, Figures 1, 2, 7.

  python -m experiments.sweep_thresholds --flagfile=300w68.flags (--workdir=W | --model=DIR|default) \
      --output_json=sweep.json --plot=figure2.png [--eval_split=common]
      [--figure7_workdirs=W19,W34 [--figure7_plot=P --figure7_json=J]]
      [--figure1=figure1.png --figure1_faces=6 --figure1_ts=0.03]
      [--target_nme=3.5,4 --working_iterations=1.5,2 --working_mmacs=100]

Evaluates the model once on the (first) evaluation split, keeping per face the landmarks
and estimated error after every iteration of the full cascade; every early-exit policy is
then a choice of one of those iterations per face (`musica_jax.early_exit_policies`).
Writes the JSON (Ts sweep of ours / random / oracle, comparison at --compare_iterations
mean iterations, Tf curve, working points, calibration of E) and the Figure-2 plot, plus
`<plot>.tf.png` and `<plot>.calibration.png` next to it. NMEs are in percent (with
--nme_normalisation); Ts, Tf and E are in the units of the estimated error (the training
target: rectified L1 / (N * outer-eye distance), a fraction).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags
import jax
import numpy as np

from data_pipelines import flags as data_flags
from data_pipelines import input_pipeline
from experiments import common
from experiments import eval_lib
from experiments import evaluate   # defines --output_json, --checkpoint, --eval_dataset
from experiments import policy_plots
from musica_jax import atomic_io
from musica_jax import cost
from musica_jax import early_exit_policies as eep
from musica_jax import schemes
from musica_jax import strict_json
from musica_jax import training

FLAGS = flags.FLAGS
flags.DEFINE_string("plot", None, "Figure 2 PNG (default: next to --output_json).")
flags.DEFINE_integer("num_ts", 300, "At most this many Ts values in a sweep (0: every "
                     "distinct decision of the policy).")
flags.DEFINE_integer("draws", 50, "Random-baseline draws per Ts.")
flags.DEFINE_integer("policy_seed", 0, "Seed of the random baseline's draws.")
flags.DEFINE_enum("nme_normalisation", "interocular", ["interocular", "interpupil", "box"],
                  "NME reported and optimised by the oracle.")
flags.DEFINE_float("compare_iterations", 2.0, "Mean iterations of the paper's comparison "
                   "point (ours vs random at equal cost, and the cost to match random).")
flags.DEFINE_list("target_nme", [], "Working points: Ts for these target NMEs (percent); "
                  "default: the full cascade's NME + 1%, 5%, 10% (relative).")
flags.DEFINE_list("working_iterations", [], "Working points: Ts for these budgets of mean "
                  "iterations per face; default 1.25, 1.5, 2, 2.5.")
flags.DEFINE_list("working_mmacs", [], "Working points: Ts for these budgets of mean "
                  "multiply-adds per face (millions).")
flags.DEFINE_float("tf_ts", None, "Ts under which the Tf analysis runs (the final estimate "
                   "is that of each face's exit iteration); default: the full cascade.")
flags.DEFINE_list("figure7_workdirs", [], "Figure 7: more trained variants (workdirs); "
                  "--workdir (or --model) is always one of the lines.")
flags.DEFINE_string("figure7_plot", None, "Figure 7 PNG (default: next to --output_json).")
flags.DEFINE_string("figure7_json", None, "Figure 7 JSON (default: next to --output_json).")
flags.DEFINE_string("figure1", None, "Figure 1 PNG (a grid of faces x iterations).")
flags.DEFINE_integer("figure1_faces", 6, "Figure 1: number of faces (columns).")
flags.DEFINE_float("figure1_ts", None, "Figure 1: Ts; default: the swept Ts nearest to "
                   "--compare_iterations mean iterations.")

ORACLE_DEFINITION = (
    "oracle: for the per-iteration counts of our policy at each Ts, the assignment of faces "
    "to iterations with exactly those counts that minimises the mean true NME (exact, "
    "min-cost assignment); a lower bound for every policy of that cost. "
    "oracle_sequential: iteration s gets the counts[s] faces of lowest true NME after "
    "iteration s among those not yet assigned (our rule driven by the true error).")


def _floats(values, name):
  try:
    return [float(v) for v in values]
  except ValueError as e:
    raise app.UsageError(f"--{name}: numbers expected, got {values}") from e


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


def analyse(per_face, model_cfg, norm: str, num_ts: int, draws: int, seed: int,
            compare_iterations: float, with_oracle: bool = True) -> dict:
  nme = per_face[f"nme_{norm}_per_iteration"] * 100.0
  est = per_face["estimated_error"]
  sw = eep.sweep(nme, est, draws=draws, seed=seed, with_oracle=with_oracle,
                 max_points=num_ts)
  mmacs_it = cost.cascade_macs(model_cfg, 1) / 1e6
  sw["mmacs"] = [eep.expected_macs(c, mmacs_it) for c in sw["counts"]]
  return {"nme": nme, "estimated": est, "sweep": sw, "mmacs_per_iteration": mmacs_it,
          "comparison": eep.compare_at(sw, compare_iterations) if with_oracle else None}


def pick_figure1_faces(exit_idx, k: int) -> np.ndarray:
  """k faces spread over the exit iterations (round robin, evenly spaced within each
  group in dataset order), ordered by exit iteration."""
  groups = [np.flatnonzero(exit_idx == s) for s in range(int(exit_idx.max()) + 1)]
  groups = [g for g in groups if g.size]
  k = min(k, int(exit_idx.size))
  share = [0] * len(groups)
  i = 0
  while sum(share) < k:
    if share[i % len(groups)] < groups[i % len(groups)].size:
      share[i % len(groups)] += 1
    i += 1
  picked = []
  for g, n in zip(groups, share):
    if n:
      picked.extend(g[np.round(np.linspace(0, g.size - 1, n + 2)[1:-1]).astype(int)]
                    if g.size > n else g)
  return np.asarray(picked, np.int64)


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


def run(workdir, output_json, data_cfg, *, model=None, plot=None, checkpoint="latest", num_ts=300,
        draws=50, seed=0, norm="interocular", compare_iterations=2.0, target_nme=(),
        budget_iterations=(), budget_mmacs=(), tf_ts=None, figure7_workdirs=(),
        figure7_plot=None, figure7_json=None, figure1=None, figure1_faces=6,
        figure1_ts=None) -> dict:
  if jax.process_count() != 1:
    raise app.UsageError("sweep_thresholds runs on one host")
  splits = [s for s in data_cfg.eval_split.split(",") if s]
  split = splits[0]
  if len(splits) > 1:
    print(f"note: several eval splits given ({data_cfg.eval_split}); using {split}")
  info, model_cfg, step, per_face = evaluate_workdir(workdir, data_cfg, split,
                                                     keep_landmarks=bool(figure1),
                                                     checkpoint=checkpoint, model=model)
  source = info.get("workdir") or info["model_path"]   # absolute
  a = analyse(per_face, model_cfg, norm, num_ts, draws, seed, compare_iterations)
  nme, est, sw = a["nme"], a["estimated"], a["sweep"]
  mmacs_it = a["mmacs_per_iteration"]
  s, f = nme.shape
  full_nme = float(nme[-1].mean())

  # Working points.
  targets = _floats(target_nme, "target_nme") or [full_nme * r for r in (1.01, 1.05, 1.10)]
  budgets = _floats(budget_iterations, "budget_iterations") or [1.25, 1.5, 2.0, 2.5]
  mbudgets = _floats(budget_mmacs, "budget_mmacs")
  working = {
      "target_nme": [{"target": t, "point": eep.ts_for_target_nme(sw, t, mmacs_it)}
                     for t in targets],
      "budget_iterations": [{"budget": b, "point": eep.ts_for_budget(
          sw, max_mean_iterations=b, macs_per_iteration=mmacs_it)} for b in budgets],
      "budget_mmacs": [{"budget": b, "point": eep.ts_for_budget(
          sw, max_macs=b, macs_per_iteration=mmacs_it)} for b in mbudgets],
      "units": "nme in percent, macs in millions per face (mean over the split)",
  }

  # Tf: faces whose final estimated error >= Tf are invalid.
  exit_tf = (eep.exit_iterations(est, tf_ts) if tf_ts is not None
             else np.full(f, s - 1, np.int64))
  tf = eep.tf_curve(eep.assignment_nme(nme, exit_tf), eep.assignment_nme(est, exit_tf),
                    failure_threshold=8.0)
  tf_analysis = {"ts": tf_ts, "mean_iterations": float(exit_tf.mean() + 1),
                 "failure_threshold_nme": 8.0, "curve": tf}

  calib = eep.calibration(est, per_face["true_error"], nme / 100.0)
  synthetic = data_cfg.dataset == "synthetic_faces"
  result = {
      "workdir": info.get("workdir"), "model_path": info.get("model_path"),
      "checkpoint_step": step,
      "dataset": data_cfg.dataset, "split": split, "faces": f,
      "synthetic_data": synthetic,
      "model": dataclasses.asdict(model_cfg),
      "mmacs_per_iteration": mmacs_it, "mmacs_full_cascade": mmacs_it * s,
      "nme_normalisation": norm, "nme_units": "percent",
      "estimated_error_units": "fraction: the training target, rectified L1 / (N * "
                               "outer-eye distance); Ts and Tf are in these units",
      "random_draws": draws, "random_seed": seed,
      "oracle_definition": ORACLE_DEFINITION,
      "full_cascade": {"nme_per_iteration": [float(x) for x in nme.mean(1)],
                       "mean_estimated_per_iteration": [float(x) for x in est.mean(1)]},
      "comparison": a["comparison"],
      "sweep": sw,
      "tf_analysis": tf_analysis,
      "working_points": working,
      "calibration": calib,
  }
  c = a["comparison"]
  data_note = " (SYNTHETIC faces)" if synthetic else ""
  print(f"{data_cfg.dataset}/{split}{data_note}: {f} faces, step {step}, full cascade NME "
        f"{full_nme:.3f}% ({norm}), per iteration "
        + ", ".join(f"{x:.3f}" for x in nme.mean(1)))
  if c["random_nme"] is not None and c["policy_nme"] is not None:
    match = c["policy_iterations_to_match"]
    print(f"at {compare_iterations:g} mean iterations: random {c['random_nme']:.3f}%, ours "
          f"{c['policy_nme']:.3f}% ({c['relative_gain'] * 100:+.1f}% gain), oracle "
          f"{c['oracle_nme']:.3f}%; ours matches random with "
          + (f"{match:.2f} mean iterations ({c['iterations_ratio'] * 100:.0f}%)"
             if match is not None else "no swept Ts"))
  else:
    print(f"{compare_iterations:g} mean iterations is outside the swept range "
          f"[{min(sw['mean_iterations']):.2f}, {max(sw['mean_iterations']):.2f}]")
  pp = calib["per_iteration"]
  print("calibration (Pearson / Spearman of E vs its target) per iteration: "
        + ", ".join(f"{d['pearson']:.3f}/{d['spearman']:.3f}" for d in pp))

  out = pathlib.Path(output_json)
  plot = plot or _default_path(output_json, ".figure2.png")
  title = (f"{data_cfg.dataset}/{split}{data_note}, {f} faces, MuSiCa{model_cfg.num_patches}"
           f" step {step}")
  nme_label = f"NME, {norm} (%)"
  policy_plots.figure2(sw, c, plot, title=title, nme_label=nme_label)
  tf_png = str(pathlib.Path(plot).with_suffix(".tf.png"))
  policy_plots.tf_plot(tf, tf_png, title=title + (f", Ts={tf_ts:g}" if tf_ts is not None
                                                 else ", full cascade"),
                       nme_label=f"NME of valid faces, {norm} (%)")
  cal_png = str(pathlib.Path(plot).with_suffix(".calibration.png"))
  policy_plots.calibration_plot(est, per_face["true_error"], cal_png, title=title)
  written = [str(out), plot, tf_png, cal_png]

  if figure1:
    ts1 = figure1_ts if figure1_ts is not None else c.get("nearest_swept_ts")
    if ts1 is None or not np.isfinite(ts1):
      ts1 = float(np.median(est[0]))
    exit1 = eep.exit_iterations(est, ts1)
    faces = pick_figure1_faces(exit1, figure1_faces)
    images = split_images(data_cfg, split, faces)
    policy_plots.figure1(images, per_face["shapes"][:, faces], est[:, faces], ts1, figure1,
                         title=f"Ts = {ts1:.4f} (estimated error above each face; "
                               f"{data_cfg.dataset}/{split}{data_note})")
    result["figure1"] = {"png": figure1, "ts": ts1, "face_indices": faces.tolist(),
                         "file_ids": [x.decode() if isinstance(x, bytes) else str(x)
                                      for x in per_face["file_id"][faces]],
                         "exit_iterations": (exit1[faces] + 1).tolist(),
                         "nme": nme[exit1[faces], faces].tolist()}
    written.append(figure1)

  if figure7_workdirs:
    variants = []
    seen = set()
    for wd in [source] + list(figure7_workdirs):
      key = os.path.abspath(wd)
      if key in seen:
        continue
      seen.add(key)
      if key == source:
        cfg_v, step_v, a_v = model_cfg, step, a
      else:
        _, cfg_v, step_v, pf_v = evaluate_workdir(wd, data_cfg, split, keep_landmarks=False)
        a_v = analyse(pf_v, cfg_v, norm, num_ts, draws, seed, compare_iterations,
                      with_oracle=False)
      sv = a_v["sweep"]
      variants.append({"name": variant_name(cfg_v, wd), "workdir": key,
                       "checkpoint_step": step_v, "num_patches": cfg_v.num_patches,
                       "use_attention": cfg_v.use_attention,
                       "mmacs_per_iteration": a_v["mmacs_per_iteration"],
                       "ts": sv["ts"], "mean_iterations": sv["mean_iterations"],
                       "mmacs": sv["mmacs"], "nme": sv["nme_policy"]})
      print(f"figure 7: {variants[-1]['name']}: {a_v['mmacs_per_iteration'] * s:.1f} MMACs "
            f"full, NME {sv['nme_policy'][0]:.3f}% full -> {sv['nme_policy'][-1]:.3f}% at "
            f"one iteration")
    f7_png = figure7_plot or _default_path(output_json, ".figure7.png")
    f7_json = figure7_json or _default_path(output_json, ".figure7.json")
    policy_plots.figure7(variants, f7_png, title=f"{data_cfg.dataset}/{split}{data_note}: "
                         "NME vs multiply-adds, one line per model over Ts",
                         nme_label=nme_label)
    atomic_io.write_text(f7_json, strict_json.dumps({
        "dataset": data_cfg.dataset, "split": split, "synthetic_data": synthetic,
        "nme_normalisation": norm, "nme_units": "percent", "variants": variants},
        indent=1, nonfinite="string"))
    result["figure7"] = {"png": f7_png, "json": f7_json}
    written += [f7_png, f7_json]

  # Infinite thresholds (a rule switched off) are settings here: written as "inf" strings.
  atomic_io.write_text(out, strict_json.dumps(result, indent=1, nonfinite="string"))
  print("wrote " + ", ".join(written))
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if any(FLAGS[f].present for f in ("ts", "tf", "budget", "budget_mmacs")):
    raise app.UsageError("--ts/--tf/--budget/--budget_mmacs are evaluate's flags; here use "
                         "--tf_ts / --figure1_ts (every Ts is swept) and --working_iterations "
                         "/ --working_mmacs (the Ts of a budget)")
  common.quiet_libraries()
  overrides = {}
  if FLAGS.eval_dataset:
    overrides["dataset"] = FLAGS.eval_dataset
  data_cfg = data_flags.config_from_flags(**overrides)
  run(FLAGS.workdir, FLAGS.output_json, data_cfg, model=FLAGS.model, plot=FLAGS.plot,
      checkpoint=FLAGS.checkpoint,
      num_ts=FLAGS.num_ts, draws=FLAGS.draws, seed=FLAGS.policy_seed,
      norm=FLAGS.nme_normalisation, compare_iterations=FLAGS.compare_iterations,
      target_nme=FLAGS.target_nme, budget_iterations=FLAGS.working_iterations,
      budget_mmacs=FLAGS.working_mmacs, tf_ts=FLAGS.tf_ts,
      figure7_workdirs=FLAGS.figure7_workdirs, figure7_plot=FLAGS.figure7_plot,
      figure7_json=FLAGS.figure7_json, figure1=FLAGS.figure1,
      figure1_faces=FLAGS.figure1_faces, figure1_ts=FLAGS.figure1_ts)


if __name__ == "__main__":
  common.run(main)
