r"""Evaluates a trained cascade (EMA weights) with a jitted, batched evaluation.

  python -m experiments.evaluate --flagfile=300w68.flags --workdir=W --output_json=eval.json
  [--checkpoint=STEP] [--eval_dataset=pts_folder --data_dir=DIR --eval_split=all]
  [--eval_split=common,challenging] [--ts=0.03 | --budget=2.0 | --budget_mmacs=18] [--t_fail=0.08]

  # the package's shipped model (or an exported one: --model=DIR), side by side with dlib
  python -m experiments.evaluate --flagfile=300w19.flags --model=default --with_dlib \
      --output_json=results/default_model_vs_dlib_common.json

Writes the JSON (one entry per split; with --with_dlib a "side_by_side" entry per split
holding both rows from this run) and a CED plot PNG next to it (dlib's curve included).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags
import numpy as np

from experiments import common
from experiments import config_flags
from experiments import eval_lib
from experiments import plots
from musica_jax import atomic_io
from musica_jax import cost
from musica_jax import schedules
from musica_jax import budget as budget_lib
from musica_jax import schemes
from musica_jax import strict_json

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when run as a program, or by a program that takes
  them over: experiments.choose_t_fail)."""
  d = common.define_flag
  d("string", "output_json", None, "Where to write the results JSON.")
  d("string", "checkpoint", "latest", "Checkpoint step to evaluate, 'latest', or "
    "'best' (the kept checkpoint with the lowest --eval_split NME logged in "
    "training, i.e. chosen on the validation split; the JSON records that split as "
    "checkpoint_chosen_on).")
  d("string", "eval_dataset", None, "Evaluate on this dataset instead of the flagfile's "
    "(ibug300w | wflw | pts_folder | synthetic_faces), with --data_dir.")
  d("float", "ts", None, "Early exit: success threshold on the quitting score (the "
    "estimated error, or the model's quit head).")
  d("float", "budget", None, "Early exit by compute: mean iterations per face (1..3) "
    "for each batch of --eval_batch_size faces; needs the model's quitting "
    "profile (experiments.fit_quit_head --install).")
  d("float", "budget_mmacs", None, "The same budget in millions of multiply-adds per face.")
  d("float", "t_fail", None, "Failure threshold: faces whose final estimated error is above "
    "it are flagged invalid.")
  d("string", "model", None, "Evaluate an exported model directory (written by "
    "experiments.export_model) instead of a --workdir checkpoint; 'default' "
    "= the model shipped in musica_jax/default_model.")
  d("bool", "with_dlib", False, "300W only: also run dlib's 68-point model on the same "
    "faces under the same protocol (experiments.compare_dlib; needs the peers "
    "extra) and write both rows side by side.")
  d("string", "dlib_box_fit_json", None, "With --with_dlib: reuse dlib's box fit from "
    "an earlier JSON (e.g. results/dlib_300w_common.json) instead of running "
    "its detector on the training faces (~80 s).")
  flags.mark_flags_as_required(["output_json"])


def musica_row(summary: dict, model_cfg, info: dict) -> dict:
  """This run's model as a side-by-side row (the fields dlib's row has)."""
  name = info.get("model_name") or f"step {info.get('checkpoint_step')}"
  row = {"method": f"MuSiCa ({model_cfg.num_landmarks} pts / {model_cfg.num_patches} "
                   f"patches, {name})",
         "box": "landmark box (the model's training convention)"}
  row.update({k: summary[k] for k in ("faces", "nme_interpupil", "nme_interocular", "fr_008",
                                      "auc_008", "fr_010", "auc_010",
                                      "nme_interpupil_per_iteration")})
  return row


def dlib_rows(data_cfg, split: str, per_face: dict, model_cfg, summary: dict, info: dict,
              box_fit_json: str | None) -> tuple[dict, np.ndarray]:
  """dlib on exactly the faces this evaluation saw: the side-by-side entry and dlib's
  per-face inter-ocular NMEs."""
  from experiments import peers_lib  # noqa: PLC0415
  side = peers_lib.dlib_side(data_cfg.data_dir, split, box_fit_json)
  ids = [f.decode() if isinstance(f, bytes) else str(f) for f in per_face["file_id"]]
  if ids != side["file_ids"]:
    raise RuntimeError(f"split {split!r}: dlib ran on {len(side['file_ids'])} faces, the "
                       f"model on {len(ids)}; the face lists differ")
  entry = {"protocol": peers_lib.PROTOCOL, "fr_auc_normalisation": "interocular",
           "rows": [musica_row(summary, model_cfg, info), side["row"]],
           "box_fit": side["box_fit"]}
  return entry, side["nme_interocular_per_face"]


def evaluate(workdir: str | None, output_json: str, splits: list[str], data_cfg, ts=None,
             t_fail=None, checkpoint: str = "latest", model: str | None = None,
             with_dlib: bool = False, dlib_box_fit_json: str | None = None,
             budget: float | None = None, budget_mmacs: float | None = None) -> dict:
  loaded = common.load_model(workdir, model, checkpoint)
  model_cfg, mean_shape = loaded.model_config, loaded.mean_shape
  info = common.model_provenance(loaded)    # with checkpoint_chosen_on for 'best'
  capacities = own = escalate = None
  if budget_mmacs is not None:       # another schedule of the weights may serve it better
    other = schedules.for_budget_mmacs(loaded, budget_mmacs)
    if other is not None:
      own, (loaded, choice) = loaded, other
      budget, budget_mmacs, escalate = choice.iterations, None, choice.escalate
      model_cfg = loaded.model_config
      info["schedule"] = list(model_cfg.patches_per_stage)
      print(f"--budget_mmacs: the schedule {model_cfg.patches_per_stage} serves it "
            f"({'its full cascade' if budget is None else f'{budget:.3f} mean iterations'})"
            + ("" if escalate is None else f", escalating the faces whose estimated error "
               f"is >= {escalate:.4f} to the model's own full cascade"))
      if escalate is not None:
        info["escalate"] = escalate
  params, mesh = eval_lib.on_devices(loaded)   # after the choice: a schedule may have own stages
  own_params = None if escalate is None else eval_lib.on_devices(own)[0]
  if budget is not None or budget_mmacs is not None:
    try:
      budget = budget_lib.budget_iterations(model_cfg, loaded.quit_info, budget, budget_mmacs)
    except ValueError as e:
      raise app.UsageError(f"--budget: {e}") from e
    capacities = budget_lib.budget_capacities(loaded.quit_info, budget, data_cfg.eval_batch_size)
  if data_cfg.num_points != model_cfg.num_landmarks:
    raise app.UsageError(f"--num_points={data_cfg.num_points} but the model "
                         f"({workdir or model}) has {model_cfg.num_landmarks} landmarks")
  if with_dlib:   # checked before any evaluation runs
    if data_cfg.dataset != "ibug300w" or model_cfg.num_landmarks != 68:
      raise app.UsageError(f"--with_dlib needs 300W with 68 points (dataset "
                           f"{data_cfg.dataset}, {model_cfg.num_landmarks} points)")
    from experiments import peers_lib  # noqa: PLC0415
    try:
      peers_lib.import_dlib()
    except ImportError as e:
      raise app.UsageError(f"--with_dlib: {e}") from e
  scheme = schemes.get_scheme(model_cfg.num_landmarks)
  step = info["checkpoint_step"]
  early = ts is not None or t_fail is not None or capacities is not None
  ts_v = -np.inf if ts is None else ts
  t_fail_v = np.inf if t_fail is None else t_fail
  result = {**info, "dataset": data_cfg.dataset, "data_dir": os.path.abspath(data_cfg.data_dir),
            "command": "python -m experiments.evaluate " + " ".join(sys.argv[1:]),
            "model": dataclasses.asdict(model_cfg),
            "mmacs_full_cascade": cost.cascade_macs(model_cfg) / 1e6,
            "fr_auc_normalisation": "interocular", "splits": {}}
  if early:
    result.update(ts=ts, t_fail=t_fail, budget=budget, capacities=capacities)
  curves = {}
  for split in splits:
    per_face = eval_lib.run_split(params, data_cfg, split, model_cfg, scheme, mean_shape,
                                  mesh, ts_v, t_fail_v, quit_params=loaded.quit_head,
                                  capacities=capacities)
    if escalate is not None:
      again = eval_lib.run_split(own_params, data_cfg, split, own.model_config, scheme,
                                 mean_shape, mesh, quit_params=own.quit_head)
      per_face, up = eval_lib.escalate(per_face, again, escalate)
    summary = eval_lib.summarise(per_face, with_early_exit=early)
    if escalate is not None:
      summary["escalated_fraction"] = float(up.mean())
      summary["mmacs_escalation"] = float(schedules.escalated_mmacs(
          model_cfg, own.model_config, per_face["iterations"]).mean())
      print(f"  escalated {int(up.sum())} of {up.size} faces: "
            f"{summary['mmacs_escalation']:.1f} MMACs per face")
    if early:
      summary["mmacs_early_exit"] = cost.mean_macs(model_cfg, per_face["iterations"]) / 1e6
    result["splits"][split] = summary
    curves[f"MuSiCa {split}"] = per_face["nme_interocular_per_iteration"][-1]
    print(f"{split}: {summary['faces']} faces, NME inter-pupil {summary['nme_interpupil']:.2f}% "
          f"inter-ocular {summary['nme_interocular']:.2f}% box {summary['nme_box']:.2f}% "
          f"FR@0.08 {summary['fr_008'] * 100:.2f}% AUC@0.08 {summary['auc_008']:.4f}; "
          f"mean-shape baseline {summary['mean_shape_baseline']['nme_interocular']:.2f}% "
          f"inter-ocular", flush=True)
    if early:
      print(f"  early exit Ts={ts} budget={budget} Tf={t_fail}: mean iterations "
            f"{summary['mean_iterations']:.2f}, NME {summary['nme_early_exit']:.2f}%, "
            f"invalid {summary['invalid_fraction'] * 100:.1f}%")
    if with_dlib:
      entry, dlib_io = dlib_rows(data_cfg, split, per_face, model_cfg, summary, info,
                                 dlib_box_fit_json)
      result.setdefault("side_by_side", {})[split] = entry
      curves[f"dlib {split}"] = dlib_io
      for row in entry["rows"]:
        print(f"  {row['method']}: NME inter-pupil {row['nme_interpupil']:.2f}% inter-ocular "
              f"{row['nme_interocular']:.2f}% FR@0.08 {row['fr_008'] * 100:.2f}% "
              f"AUC@0.08 {row['auc_008']:.4f}", flush=True)
  out = pathlib.Path(output_json)
  atomic_io.write_text(out, strict_json.dumps(result, indent=2))
  png = out.with_suffix(".ced.png")
  plots.ced_plot(curves, png, threshold=0.10,
                 title=f"CED, {data_cfg.dataset} ({model_cfg.num_landmarks} pts / "
                       f"{model_cfg.num_patches} patches, step {step})")
  print(f"wrote {out} and {png}")
  broken = {split: v["nonfinite_faces"] for split, v in result["splits"].items()
            if v["nonfinite_faces"]}
  if broken:
    raise common.UserError(
        "non-finite (NaN/inf) landmarks for " + ", ".join(
            f"{n} of {result['splits'][s]['faces']} faces of {s}" for s, n in broken.items())
        + f" (model {workdir or model}, step {step}): broken weights; counted as failures "
        f"in {out}")
  return result


def main(argv):
  common.start(argv)
  common.finite_flag("ts", FLAGS.ts, allow_inf=True)
  common.finite_flag("t_fail", FLAGS.t_fail, allow_inf=True)
  common.finite_flag("budget", FLAGS.budget, positive=True)
  common.finite_flag("budget_mmacs", FLAGS.budget_mmacs, positive=True)
  overrides = {}
  if FLAGS.eval_dataset:
    overrides["dataset"] = FLAGS.eval_dataset
  data_cfg = config_flags.data_config_from_flags(**overrides)
  splits = [s for s in data_cfg.eval_split.split(",") if s]
  model = FLAGS.model
  if FLAGS["stage_patches"].present:
    # A model has its schedule; --stage_patches asks for another of its weights' (it was
    # silently ignored: the model's own config wins over the model flags).
    if not model:
      raise app.UsageError("--stage_patches: only with --model (an exported directory or a "
                           "shipped name, not a --workdir run: export_model --stage_patches)")
    if schedules.split_model_name(model)[1] is not None:
      raise app.UsageError(f"--stage_patches and --model={model}: give the schedule once")
    model += "@" + "_".join(str(k) for k in FLAGS.stage_patches)
  evaluate(FLAGS.workdir, FLAGS.output_json, splits, data_cfg, FLAGS.ts, FLAGS.t_fail,
           FLAGS.checkpoint, model, FLAGS.with_dlib, FLAGS.dlib_box_fit_json,
           FLAGS.budget, FLAGS.budget_mmacs)


if __name__ == "__main__":
  define_flags()
  common.run(main)
