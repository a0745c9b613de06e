r"""Evaluates a trained cascade (EMA weights) with a jitted, batched evaluation.

  python -m experiments.evaluate --flagfile=300w68.flags --workdir=W --output_json=eval.json
  [--checkpoint=STEP] [--eval_dataset=pts_folder --data_dir=DIR --eval_split=all]
  [--eval_split=common,challenging] [--ts=0.03 --tf=0.08]

Writes the JSON (one entry per split) and a CED plot PNG next to it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags
import jax
import numpy as np

from data_pipelines import flags as data_flags
from experiments import common
from experiments import eval_lib
from experiments import plots
from musica_jax import checkpoints
from musica_jax import cost
from musica_jax import parallel
from musica_jax import schemes
from musica_jax import training

FLAGS = flags.FLAGS
flags.DEFINE_string("output_json", None, "Where to write the results JSON.")
flags.DEFINE_string("checkpoint", "latest", "Checkpoint step to evaluate, or 'latest'.")
flags.DEFINE_string("eval_dataset", None, "Evaluate on this dataset instead of the flagfile's "
                    "(ibug300w | wflw | pts_folder | synthetic_faces), with --data_dir.")
flags.DEFINE_float("ts", None, "Early exit: success threshold on the estimated error.")
flags.DEFINE_float("tf", None, "Failure threshold: faces whose final estimated error is above "
                   "it are flagged invalid.")
flags.mark_flags_as_required(["workdir", "output_json"])


def restore_ema_params(workdir: str, model_cfg, train_cfg, step: str):
  """EMA parameters of a checkpoint (replicated on all devices)."""
  mesh = parallel.make_mesh()
  rep = parallel.replicated(mesh)
  abstract = jax.eval_shape(functools.partial(training.create_train_state, model_cfg, train_cfg))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract)
  ckpts = checkpoints.Checkpoints(workdir, async_save=False)
  number = None if step == "latest" else int(step)
  state = ckpts.restore(abstract, number)
  used = int(state.step)
  ckpts.close()
  return state.ema_params, used, mesh


def evaluate(workdir: str, output_json: str, splits: list[str], data_cfg, ts=None, tf=None,
             checkpoint: str = "latest") -> dict:
  run = common.load_run_config(workdir)
  model_cfg = run["model_config"]
  train_cfg = training.TrainConfig(**run["train"])
  if data_cfg.num_points != model_cfg.num_landmarks:
    raise app.UsageError(f"--num_points={data_cfg.num_points} but the model in {workdir} "
                         f"has {model_cfg.num_landmarks} landmarks")
  scheme = schemes.get_scheme(model_cfg.num_landmarks)
  params, step, mesh = restore_ema_params(workdir, model_cfg, train_cfg, checkpoint)
  early = ts is not None or tf is not None
  ts_v = -np.inf if ts is None else ts
  tf_v = np.inf if tf is None else tf
  result = {"workdir": os.path.abspath(workdir), "checkpoint_step": step,
            "dataset": data_cfg.dataset, "model": dataclasses.asdict(model_cfg),
            "mmacs_full_cascade": cost.cascade_macs(model_cfg) / 1e6,
            "fr_auc_normalisation": "interocular", "splits": {}}
  if early:
    result.update(ts=ts, tf=tf)
  curves = {}
  for split in splits:
    per_face = eval_lib.run_split(params, data_cfg, split, model_cfg, scheme,
                                  run["mean_shape"], mesh, ts_v, tf_v)
    summary = eval_lib.summarise(per_face, with_early_exit=early)
    if early:
      summary["mmacs_early_exit"] = cost.cascade_macs(model_cfg, summary["mean_iterations"]) / 1e6
    result["splits"][split] = summary
    curves[split] = per_face["nme_interocular_per_iteration"][-1]
    print(f"{split}: {summary['faces']} faces, NME inter-pupil {summary['nme_interpupil']:.2f}% "
          f"inter-ocular {summary['nme_interocular']:.2f}% box {summary['nme_box']:.2f}% "
          f"FR@0.08 {summary['fr_008'] * 100:.2f}% AUC@0.08 {summary['auc_008']:.4f}; "
          f"mean-shape baseline {summary['mean_shape_baseline']['nme_interocular']:.2f}% "
          f"inter-ocular", flush=True)
    if early:
      print(f"  early exit Ts={ts} Tf={tf}: mean iterations {summary['mean_iterations']:.2f}, "
            f"NME {summary['nme_early_exit']:.2f}%, invalid {summary['invalid_fraction'] * 100:.1f}%")
  out = pathlib.Path(output_json)
  common.atomic_write_text(out, json.dumps(result, indent=2))
  png = out.with_suffix(".ced.png")
  plots.ced_plot(curves, png, threshold=0.10,
                 title=f"CED, {data_cfg.dataset} ({model_cfg.num_landmarks} pts / "
                       f"{model_cfg.num_patches} patches, step {step})")
  print(f"wrote {out} and {png}")
  return result


def main(argv):
  common.start(argv)
  overrides = {}
  if FLAGS.eval_dataset:
    overrides["dataset"] = FLAGS.eval_dataset
  data_cfg = data_flags.config_from_flags(**overrides)
  splits = [s for s in data_cfg.eval_split.split(",") if s]
  evaluate(FLAGS.workdir, FLAGS.output_json, splits, data_cfg, FLAGS.ts, FLAGS.tf,
           FLAGS.checkpoint)


if __name__ == "__main__":
  app.run(main, argv=common.resolve_flagfiles(sys.argv))
