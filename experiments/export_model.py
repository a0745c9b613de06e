r"""Exports a model: a compact model directory (musica_jax.model_io) or a portable
StableHLO program (musica_jax.portable).

  python -m experiments.export_model --workdir=W --output=DIR [--dtype=bfloat16]
      [--checkpoint=latest|STEP] [--eval_json=eval.json] [--name=300w34]
      [--stage_patches=9,17,34]   # the run's weights reading another schedule
  python -m experiments.export_model --format=stablehlo --model=default|DIR (or --workdir=W)
      --output=DIR [--platforms=cpu,cuda]

--format=musica (default): DIR gets model.json (config, mean shape, metadata) and
params.npz. Load it with `musica_jax.predictor.Predictor.from_model_dir(DIR)` or
`--model=DIR` of experiments.predict. No TensorFlow needed.

--format=stablehlo: DIR gets model.stablehlo, a serialized `jax.export` program with a
symbolic batch (standardised crops [B, 228, 228, 3] float32 -> landmarks in crop pixels
[B, N, 2], estimated error [B]; the full cascade), and model.stablehlo.json (inputs,
outputs, the crop rule, the mean shape). It runs with jax alone:
`jax.export.deserialize(open("DIR/model.stablehlo", "rb").read()).call(crops)`.

--format=savedmodel: DIR/saved_model, the same program as a TensorFlow SavedModel (signature
serving_default: crops -> landmarks, estimated_error). TFLite cannot convert it.

--format=onnx: DIR/model.onnx (symbolic batch) + model.onnx.json; --format=tflite:
DIR/model.tflite (batch 1) + model.tflite.json. The same program, lowered to plain
TensorFlow ops and converted by tf2onnx / the TFLite converter (experiments/onnx_export.py;
`pip install 'musica-jax[onnx]'`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib

from absl import app
from absl import flags

from experiments import common
from experiments import config_flags
from musica_jax import atomic_io
from musica_jax import model_io
from musica_jax import portable
from musica_jax import predictor as predictor_lib

FLAGS = flags.FLAGS


def define_flags():
  """The flags of this entry point (defined when run as a program, so importing the
  module for its functions defines none)."""
  d = common.define_flag
  d("string", "output", None, "Model directory to write (created).")
  d("enum", "dtype", "float32", "Parameter storage dtype.", enum_values=list(model_io.DTYPES))
  d("string", "checkpoint", "latest", "Checkpoint step to export, 'latest' or 'best'.")
  d("string", "eval_json", None, "Optional evaluation JSON (experiments.evaluate) to "
    "store in the metadata.")
  d("string", "name", None, "Optional model name stored in the metadata.")
  d("enum", "format", "musica", "musica: model.json + params.npz; stablehlo: a serialized "
    "jax.export program; savedmodel: the same program in a TensorFlow SavedModel; onnx: "
    "model.onnx (symbolic batch); tflite: model.tflite (batch 1).",
    enum_values=["musica", "stablehlo", "savedmodel", "onnx", "tflite"])
  d("string", "model", None, "--format=stablehlo: export this model directory "
    "('default': the shipped model) instead of --workdir.")
  d("list", "platforms", ["cpu", "cuda"], "--format=stablehlo: lowering platforms.")


def export(workdir: str, output: str, dtype: str = "float32", checkpoint: str = "latest",
           eval_json: str | None = None, name: str | None = None,
           stage_patches: tuple[int, ...] | None = None) -> dict:
  """stage_patches: export the same weights reading this schedule (`ModelConfig.
  stage_patches`; e.g. the full one, or the cheap one, of a run trained with
  --all_patches_every); None: the run's."""
  m = common.load_model(workdir, None, checkpoint)
  cfg, info = m.model_config, m.metadata
  if stage_patches is not None:
    try:
      cfg = dataclasses.replace(cfg, stage_patches=tuple(stage_patches))
    except ValueError as e:
      raise app.UsageError(f"--stage_patches: {e}") from e
  meta = {"source": info, "exported_with": "python -m experiments.export_model"}
  if name:
    meta["name"] = name
  if eval_json:
    meta["evaluation"] = read_eval_json(eval_json)
  out = model_io.save_model(output, m.params, cfg, m.mean_shape, meta, dtype=dtype)
  size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
  summary = {"output": str(out.resolve()), "dtype": dtype, "bytes": size,
             "checkpoint_step": info["checkpoint_step"], "landmarks": cfg.num_landmarks,
             "patches": cfg.num_patches, "recurrent_rank": cfg.recurrent_rank}
  rank = f", recurrent rank {cfg.recurrent_rank}" if cfg.recurrent_rank else ""
  print(f"wrote {out} ({size / 1e6:.1f} MB, {dtype}, step {info['checkpoint_step']}, "
        f"{cfg.num_landmarks} landmarks / {cfg.num_patches} patches{rank})")
  return summary


def read_eval_json(path: str) -> dict:
  """--eval_json: an evaluation JSON (experiments.evaluate) to store in the model's
  metadata; a one-line UsageError when it cannot be read."""
  try:
    return json.loads(pathlib.Path(path).read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise app.UsageError(f"--eval_json={path}: cannot read it as JSON: {e}") from e


STABLEHLO_FILE = "model.stablehlo"


def export_portable(output: str, workdir: str | None = None, model: str | None = None,
                    checkpoint: str = "latest", platforms=("cpu", "cuda")) -> dict:
  """--format=stablehlo: model.stablehlo + model.stablehlo.json in `output`."""
  pred = _load(workdir, model, checkpoint)
  cfg = pred.model_config
  blob = portable.export_stablehlo(pred.params, cfg, pred.mean_shape, platforms)
  out = pathlib.Path(output)
  out.mkdir(parents=True, exist_ok=True)
  atomic_io.write(out / STABLEHLO_FILE, lambda f: f.write(blob), binary=True)
  info = portable.describe(cfg, pred.mean_shape, platforms, portable.weight_dtype(pred.params),
                           dict(pred.metadata, exported_with="python -m "
                                "experiments.export_model --format=stablehlo"))
  common.write_json(out / (STABLEHLO_FILE + ".json"), info, indent=1)
  print(f"wrote {out / STABLEHLO_FILE} ({len(blob) / 1e6:.1f} MB, weights "
        f"{info['weight_dtype']}, platforms {','.join(platforms)}, {cfg.num_landmarks} "
        f"landmarks / {cfg.num_patches} patches)")
  return {"output": str((out / STABLEHLO_FILE).resolve()), "bytes": len(blob), **info}


SAVEDMODEL_DIR = "saved_model"


def export_savedmodel(output: str, workdir: str | None = None, model: str | None = None,
                      checkpoint: str = "latest") -> dict:
  """--format=savedmodel: DIR/saved_model, a TensorFlow SavedModel whose serving signature
  is the portable program (jax2tf, native serialization; symbolic batch): crops
  [B, 228, 228, 3] float32 -> (landmarks [B, N, 2] crop px, estimated error [B]). Needs
  TensorFlow (this entry point only; musica_jax never imports it). TFLite cannot convert it
  (the installed converter refuses the dynamic slices of the symbolic batch and, at batch 1,
  a 6-D pad)."""
  import tensorflow as tf  # noqa: PLC0415
  from jax.experimental import jax2tf  # noqa: PLC0415
  pred = _load(workdir, model, checkpoint)
  cfg = pred.model_config
  s = cfg.image_size
  fn = jax2tf.convert(portable.cascade_function(pred.params, cfg, pred.mean_shape),
                      polymorphic_shapes=[f"(b, {s}, {s}, 3)"], with_gradient=False)
  module = tf.Module()
  module.serve = tf.function(lambda crops: dict(zip(("landmarks", "estimated_error"),
                                                    fn(crops))),
                             input_signature=[tf.TensorSpec([None, s, s, 3], tf.float32,
                                                            name="crops")],
                             autograph=False)
  out = pathlib.Path(output) / SAVEDMODEL_DIR
  check_output_dir(output, "output", SAVEDMODEL_DIR)
  try:
    tf.saved_model.save(module, str(out), signatures={"serving_default": module.serve})
  except (tf.errors.OpError, OSError) as e:   # TensorFlow's file errors: one line
    text = " ".join(str(getattr(e, "message", "") or e).split())
    raise app.UsageError(f"--output={output}: TensorFlow could not write the SavedModel "
                         f"to {out} ({type(e).__name__}: {text[:300]})") from None
  size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
  print(f"wrote {out} ({size / 1e6:.1f} MB; serving_default: crops -> landmarks, "
        f"estimated_error)")
  return {"output": str(out.resolve()), "bytes": size}


def check_output_dir(output: str, flag: str = "output", inside: str | None = None) -> None:
  """Before the work: --output is (or can become) a writable directory, and the entry
  `inside` it that the export writes (saved_model/) is not a file in the way."""
  common.check_output(output, flag, "dir")
  if inside and (pathlib.Path(output) / inside).exists() \
      and not (pathlib.Path(output) / inside).is_dir():
    raise app.UsageError(f"--{flag}={output}: {pathlib.Path(output) / inside} exists and is "
                         f"not a directory (the SavedModel goes there)")


def _load(workdir, model, checkpoint):
  return predictor_lib.Predictor.from_loaded(common.load_model(workdir, model, checkpoint))


def main(argv):
  common.start(argv)
  if FLAGS.format in ("stablehlo", "savedmodel", "onnx", "tflite"):
    if not FLAGS.output:
      raise app.UsageError("--output is required (the directory to write)")
    check_output_dir(FLAGS.output, "output",
                     SAVEDMODEL_DIR if FLAGS.format == "savedmodel" else None)
    if FLAGS.format in ("onnx", "tflite"):
      from experiments import onnx_export  # noqa: PLC0415  (TensorFlow, tf2onnx)
      onnx_export.check_output(FLAGS.output, FLAGS.format)
    if bool(FLAGS.workdir) == bool(FLAGS.model):
      raise app.UsageError(f"--format={FLAGS.format}: give --model=DIR|default or "
                           f"--workdir=W (one of them)")
    if FLAGS.workdir and not os.path.isdir(FLAGS.workdir):
      raise app.UsageError(f"--workdir={FLAGS.workdir}: not a directory")
    try:
      if FLAGS.format in ("onnx", "tflite"):
        write = onnx_export.export_onnx if FLAGS.format == "onnx" else onnx_export.export_tflite
        write(FLAGS.output, _load(FLAGS.workdir, FLAGS.model, FLAGS.checkpoint))
      elif FLAGS.format == "savedmodel":
        export_savedmodel(FLAGS.output, FLAGS.workdir, FLAGS.model, FLAGS.checkpoint)
      else:
        export_portable(FLAGS.output, FLAGS.workdir, FLAGS.model, FLAGS.checkpoint,
                        tuple(FLAGS.platforms))
    except (FileNotFoundError, ValueError) as e:
      flag = f"--model={FLAGS.model}" if FLAGS.model else f"--workdir={FLAGS.workdir}"
      raise app.UsageError(f"{flag}: {e}") from e
    return
  if FLAGS.model:
    raise app.UsageError("--model is for --format=stablehlo/savedmodel/onnx/tflite; "
                         "--format=musica exports a training run (--workdir)")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (a training run's directory)")
  if not FLAGS.output:
    raise app.UsageError("--output is required (the model directory to write)")
  check_output_dir(FLAGS.output)
  if not os.path.isdir(FLAGS.workdir):
    raise app.UsageError(f"--workdir={FLAGS.workdir}: not a directory")
  try:
    schedule = None
    if FLAGS["stage_patches"].present:
      try:
        schedule = config_flags.stage_patches_from_flags()
      except ValueError as e:
        raise app.UsageError(str(e)) from None
    export(FLAGS.workdir, FLAGS.output, FLAGS.dtype, FLAGS.checkpoint, FLAGS.eval_json,
           FLAGS.name, schedule)
  except FileNotFoundError as e:
    raise app.UsageError(f"--workdir={FLAGS.workdir}: {e}") from e


if __name__ == "__main__":
  define_flags()
  common.run(main)
