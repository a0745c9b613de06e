r"""Exports a training run's EMA weights as a compact model directory (musica_jax.model_io).

  python -m experiments.export_model --workdir=W --output=DIR [--dtype=bfloat16]
      [--checkpoint=latest|STEP] [--eval_json=eval.json] [--name=300w34]

DIR gets model.json (config, mean shape, metadata) and params.npz. Load it with
`musica_jax.predictor.Predictor.from_saved_model(DIR)` or `--model=DIR` of
experiments.predict. No TensorFlow needed.
"""
from __future__ import annotations

import json
import os
import pathlib

from absl import app
from absl import flags

from experiments import common  # noqa: F401  (defines --workdir)
from musica_jax import model_io
from musica_jax import predictor as predictor_lib

FLAGS = flags.FLAGS


def _define(kind, name, default, help_, **kw):
  """Defines a flag unless another entry point imported in this process already did."""
  if name not in FLAGS:
    getattr(flags, f"DEFINE_{kind}")(name, default, help_, **kw)


def define_flags():
  """The flags of this entry point (defined when run as a program, so importing the
  module for its functions defines none)."""
  _define("string", "output", None, "Model directory to write (created).")
  if "dtype" not in FLAGS:
    flags.DEFINE_enum("dtype", "float32", list(model_io.DTYPES), "Parameter storage dtype.")
  _define("string", "checkpoint", "latest", "Checkpoint step to export, or 'latest'.")
  _define("string", "eval_json", None, "Optional evaluation JSON (experiments.evaluate) to "
          "store in the metadata.")
  _define("string", "name", None, "Optional model name stored in the metadata.")




def export(workdir: str, output: str, dtype: str = "float32", checkpoint: str = "latest",
           eval_json: str | None = None, name: str | None = None) -> dict:
  params, cfg, mean_shape, info = predictor_lib.restore_workdir(workdir, checkpoint)
  meta = {"source": info, "exported_with": "python -m experiments.export_model"}
  if name:
    meta["name"] = name
  if eval_json:
    try:
      meta["evaluation"] = json.loads(pathlib.Path(eval_json).read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise app.UsageError(f"--eval_json={eval_json}: cannot read it as JSON: {e}") from e
  out = model_io.save_model(output, params, cfg, mean_shape, meta, dtype=dtype)
  size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
  summary = {"output": str(out.resolve()), "dtype": dtype, "bytes": size,
             "checkpoint_step": info["checkpoint_step"], "landmarks": cfg.num_landmarks,
             "patches": cfg.num_patches}
  print(f"wrote {out} ({size / 1e6:.1f} MB, {dtype}, step {info['checkpoint_step']}, "
        f"{cfg.num_landmarks} landmarks / {cfg.num_patches} patches)")
  return summary


def main(argv):
  common.start(argv)
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (a training run's directory)")
  if not FLAGS.output:
    raise app.UsageError("--output is required (the model directory to write)")
  if not os.path.isdir(FLAGS.workdir):
    raise app.UsageError(f"--workdir={FLAGS.workdir}: not a directory")
  try:
    export(FLAGS.workdir, FLAGS.output, FLAGS.dtype, FLAGS.checkpoint, FLAGS.eval_json,
           FLAGS.name)
  except FileNotFoundError as e:
    raise app.UsageError(f"--workdir={FLAGS.workdir}: {e}") from e


if __name__ == "__main__":
  define_flags()
  common.run(main)
