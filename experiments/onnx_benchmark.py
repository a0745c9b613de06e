r"""Batch-1 latency of the ONNX export in onnxruntime against this project's own path, on
the same real face crops, in one run (JSON out):

  python -m experiments.onnx_benchmark --data_dir=../shared/data/300w \
      --output_json=benchmarks/onnx_cpu_2core.json [--model=default] [--faces=20]
      [--rounds=5] [--onnx=DIR/model.onnx]

The faces: the first --faces of the split (--eval_split, default common), cropped once by
the predictor (`Predictor.crops`, ground-truth boxes). The paths, both on the crop alone:
- onnxruntime: `model.onnx` (`experiments.export_model --format=onnx`; exported here into
  a temporary folder unless --onnx names one) in an InferenceSession with the CPU
  execution provider and default threads and graph optimisations;
- ours: `Predictor.run_fast` (the "cascade alone (run_fast, crops given)" path of
  experiments.deploy_benchmark): the full cascade, no quitting (the ONNX program is the
  full cascade too).
Each path is warmed up first (JAX compiles). Then --rounds rounds; in each, every face
runs through both paths back to back, which path goes first alternating face by face:
every call is timed, the median over all calls is reported with the 10th/90th
percentiles, and the ratio of the medians. The largest landmark difference between the
two paths (crop pixels) is recorded as a check.
"""
from __future__ import annotations

import os
import pathlib
import platform
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from experiments import common
from musica_jax import strict_json

FLAGS = flags.FLAGS

ORT = "onnxruntime (CPU EP, default threads), model.onnx"
OURS = "ours: Predictor.run_fast (JAX/XLA), crops given"


def define_flags():
  d = common.define_flag
  d("string", "output_json", None, "Where to write the results (JSON).")
  d("string", "model", "default", "Exported model directory, or 'default'.")
  d("string", "onnx", None, "An exported model.onnx of --model (default: export it now "
    "into a temporary folder).")
  d("integer", "faces", 20, "Faces of the split timed (the first ones).")
  d("integer", "rounds", 5, "Rounds over the faces (every call timed).")


def _faces(data_dir: str, split: str, n: int):
  """(item, decoded photo) of the first n faces of a 300W split (`peers_lib.split_items`)."""
  from experiments import peers_lib  # noqa: PLC0415
  from musica_jax import images  # noqa: PLC0415
  if not data_dir or not os.path.isdir(data_dir):
    raise app.UsageError(f"--data_dir={data_dir}: not a directory (300W)")
  items = peers_lib.split_items(data_dir, split)[:n]
  if not items:
    raise app.UsageError(f"--eval_split={split}: no faces in {data_dir}")
  return [(it, images.read_image(it.image_path, exif_transpose=False)) for it in items]


def _stats(seconds) -> dict:
  ms = 1e3 * np.asarray(seconds)
  return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
          "p90_ms": float(np.percentile(ms, 90)), "calls": int(ms.size)}


def run(model: str, data_dir: str, split: str = "common", faces: int = 20, rounds: int = 5,
        onnx_path: str | None = None, command: str = "") -> dict:
  """The measurement (see the module docstring); returns the result dict."""
  from experiments import onnx_export  # noqa: PLC0415
  onnx_export.require("onnxruntime", "tensorflow", "tf2onnx", "onnx")
  import jax  # noqa: PLC0415
  import onnxruntime as ort  # noqa: PLC0415
  import tf2onnx  # noqa: PLC0415
  from musica_jax import predictor as predictor_lib  # noqa: PLC0415
  pred = predictor_lib.Predictor.from_loaded(common.load_model(None, model))
  data = _faces(data_dir, split, faces)
  crops = [pred.crops(image, it.box)[0] for it, image in data]    # jax [1, S, S, 3] each
  crops_np = [np.asarray(c, np.float32) for c in crops]
  export_s = None
  with tempfile.TemporaryDirectory() as tmp:
    if onnx_path is None:
      t0 = time.perf_counter()
      onnx_export.export_onnx(tmp, pred)
      export_s = time.perf_counter() - t0
      path = pathlib.Path(tmp) / onnx_export.ONNX_FILE
    else:
      path = pathlib.Path(onnx_path)
      if not path.is_file():
        raise app.UsageError(f"--onnx={onnx_path}: no such file")
    size = path.stat().st_size
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  names = [o.name for o in session.get_outputs()]
  paths = {ORT: lambda i: dict(zip(names, session.run(None, {"crops": crops_np[i]}))),
           OURS: lambda i: pred.run_fast(crops[i])}
  for fn in paths.values():                  # warm-up: compilation, first allocations
    for i in range(min(3, len(crops))):
      fn(i)
  times = {k: [] for k in paths}
  worst = 0.0
  load_before = os.getloadavg()
  for r in range(rounds):
    for i in range(len(crops)):
      order = list(paths) if (r * len(crops) + i) % 2 == 0 else list(paths)[::-1]
      out = {}
      for k in order:
        t0 = time.perf_counter()
        res = paths[k](i)
        lm = np.asarray(res["landmarks"])
        times[k].append(time.perf_counter() - t0)
        out[k] = lm
      worst = max(worst, float(np.abs(out[ORT] - out[OURS]).max()))
  load_after = os.getloadavg()
  rows = {k: _stats(v) for k, v in times.items()}
  cfg = pred.model_config
  return {
      "command": command, "model": model, "split": split, "faces": len(crops),
      "rounds": rounds, "batch": 1, "cpu_count": os.cpu_count(),
      "machine": platform.processor() or platform.machine(),
      "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
      "versions": {"onnxruntime": ort.__version__, "tf2onnx": tf2onnx.__version__,
                   "jax": jax.__version__},
      "onnx": {"bytes": size, "opset": onnx_export.OPSET, "export_seconds": export_s,
               "providers": session.get_providers(),
               "intra_op_threads": "default (onnxruntime: physical cores)"},
      "model_config": {"landmarks": cfg.num_landmarks, "patches": cfg.num_patches,
                       "iterations": cfg.num_stages, "recurrent_rank": cfg.recurrent_rank},
      "rows": rows,
      "onnxruntime_over_ours": rows[ORT]["median_ms"] / rows[OURS]["median_ms"],
      "max_landmark_difference_px": worst,
      "timing": "batch 1, crop given; every call timed, `rounds` rounds over the faces, "
                "the two paths back to back per face, the first alternating; medians over "
                "all calls"}


def main(argv):
  common.start(argv)
  result = run(FLAGS.model, FLAGS.data_dir, FLAGS.eval_split or "common", FLAGS.faces,
               FLAGS.rounds, FLAGS.onnx,
               "python -m experiments.onnx_benchmark " + " ".join(sys.argv[1:]))
  for k, v in result["rows"].items():
    print(f"{k}: {v}")
  print(strict_json.dumps(result, indent=1))
  if FLAGS.output_json:
    common.write_json(FLAGS.output_json, result, indent=1)


if __name__ == "__main__":
  define_flags()
  common.run(main)
