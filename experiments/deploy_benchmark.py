r"""Deployment numbers, every section from one run on one machine (JSON out):

  python -m experiments.deploy_benchmark --data_dir=../shared/data/300w \
      --output_json=benchmarks/deploy_cpu_2core.json [--sections=folder,latency,detector,video]

- folder: the 300W common photos (mixed sizes) one by one through Predictor.predict
  (ground-truth boxes), the first pass of a fresh predictor (compilation included) vs a
  second, warm pass; decoding excluded from both. With --compilation_cache=DIR a second
  invocation loads the compiled cascade from disk instead of compiling it.
- latency: batch 1 on the same faces, interleaved per face: our full cascade and early
  exit (--ts / --budget working points) through predict (crop included) and on the crop
  alone, the exported StableHLO program, dlib's ERT shape predictor (its box mapped from
  the landmark box as experiments.compare_dlib) and dlib's HOG detector per photo; medians
  and NME (inter-pupil) of each on those faces.
- batch: photos to landmarks in batches of --predict_batch faces: Predictor.predict (the
  crop in the cascade's program) against the cascade alone on the same faces' crops
  (made beforehand, on the device), and --batch_budgets through predict; whole passes,
  paths in rotated order, fastest pass each; faces/s, ratios and NME.
- detector: every common photo without a box: the fraction of faces the HOG detector
  finds (IoU >= 0.3 with the ground-truth box) and the NME from its (mapped) boxes beside
  the NME from ground-truth boxes.
- video: a synthetic sequence made from a real common face (moved, scaled and rotated
  frame by frame, landmarks transformed with it) through musica_jax.tracking: NME per
  frame and detector runs.
Needs the peers extra (dlib) for latency's dlib rows, detector and video.
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags

from experiments import common
from experiments import deploy_benchmark_lib

FLAGS = flags.FLAGS


def define_flags():
  d = common.define_flag
  d("string", "output_json", None, "Where to write the results (JSON).")
  d("list", "sections", list(deploy_benchmark_lib.SECTIONS), "Sections to run.")
  d("string", "model", "default", "Exported model directory, or 'default'.")
  d("integer", "max_faces", 0, "Use at most this many common faces (0 = all).")
  d("integer", "latency_faces", 100, "Faces timed in the latency section.")
  d("integer", "latency_rounds", 3, "Rounds of the latency section (fastest kept).")
  d("list", "latency_ts", [], "Early-exit thresholds Ts timed at batch 1.")
  d("list", "latency_budgets", ["2.75", "2.5"], "Budgets timed at batch 1: mean iterations "
    "(2.5, through a stream) or MMACs per face (27.7mmacs, each face through predict: the "
    "schedule that serves it, with escalation).")
  d("string", "dlib_box_fit_json", "results/dlib_300w_common.json", "The landmark -> dlib "
    "box fit (experiments.compare_dlib's output).")
  d("integer", "video_frames", 60, "Frames of the synthetic sequence.")
  d("float", "video_t_fail", 0.08, "Re-detection threshold on the estimated error.")
  d("string", "compilation_cache", "", "Persistent XLA cache directory ('' = none).")
  d("integer", "predict_batch", 64, "Faces per predict call in the batch section.")
  d("integer", "batch_rounds", 5, "Rounds of the batch section (fastest kept).")
  d("list", "batch_budgets", ["2.0"], "Budgets timed through predict in the batch section "
    "(mean iterations, or MMACs per face: 27.7mmacs).")
  d("string", "savedmodel", None, "Also time this SavedModel (export_model "
    "--format=savedmodel; DIR/saved_model) at batch 1 (imports TensorFlow).")


def main(argv):
  common.start(argv)
  for name in ("latency_budgets", "batch_budgets"):
    for b in FLAGS[name].value:
      try:
        deploy_benchmark_lib.budget_kwargs(b)
      except ValueError as e:
        raise app.UsageError(f"--{name}: {e}") from None
  cfg = deploy_benchmark_lib.DeployConfig(
      data_dir=FLAGS.data_dir, split=FLAGS.eval_split or "common",
      sections=tuple(FLAGS.sections), model=FLAGS.model, max_faces=FLAGS.max_faces,
      latency_faces=FLAGS.latency_faces, latency_rounds=FLAGS.latency_rounds,
      latency_ts=tuple(FLAGS.latency_ts), latency_budgets=tuple(FLAGS.latency_budgets),
      dlib_box_fit_json=FLAGS.dlib_box_fit_json, video_frames=FLAGS.video_frames,
      video_t_fail=FLAGS.video_t_fail, compilation_cache=FLAGS.compilation_cache,
      savedmodel=FLAGS.savedmodel, batch_size=FLAGS.predict_batch,
      batch_rounds=FLAGS.batch_rounds, batch_budgets=tuple(FLAGS.batch_budgets))
  result = deploy_benchmark_lib.run(
      cfg, "python -m experiments.deploy_benchmark " + " ".join(sys.argv[1:]))
  if FLAGS.output_json:
    common.write_json(FLAGS.output_json, result, indent=1)


if __name__ == "__main__":
  define_flags()
  common.run(main)
