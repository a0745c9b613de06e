r"""Landmarks for faces in photos, with an overlay PNG and a JSON (no TensorFlow).
`musica-predict` (the console script) is the same program.

  python -m experiments.predict --image=face.jpg --box=x0,y0,x1,y1 --output=overlay.png \
      --output_json=pred.json [--workdir=W [--checkpoint=STEP] | --model=DIR]
      [--ts=.. | --budget=MEAN_ITERATIONS | --budget_mmacs=..] [--t_fail=..]

Model: --model=DIR (written by experiments.export_model), or --workdir=W (a training run's
EMA weights), or else the package's default model (musica_jax/default_model/).

Images: --image=PATH (repeat it, or a comma-separated list) and/or --image_dir=DIR (every
.jpg/.jpeg/.png/.bmp in it, sorted). Boxes (x0,y0,x1,y1 in image pixels, 0-based):
  --box=...            once: the same box for every image; or once per image, in order.
                       Several faces in one image: boxes separated by ';'.
  --box_from_pts       the landmark box of the .pts file beside each image (300W layout);
                       images given without --box use it.
  neither              every face that dlib's HOG detector finds (peers extra), its box
                       mapped to the model's convention (musica_jax.detector).

Video: --video=DIR (its frames, sorted by name) or FILE (an animated GIF/TIFF, read by
PIL) tracks the faces (musica_jax.tracking: the next box from the previous landmarks; the
detector again when the estimated error reaches --t_fail, default 0.08 here). --output=DIR
gets one overlay PNG per frame; --output_json per frame: landmarks, estimated error,
iterations, re-detection.
Photos are turned upright by their EXIF orientation tag (a phone photo stored sideways);
the JSON gives each image's "exif_orientation" (1: none). --box is in the upright photo's
pixels; --box_from_pts maps the .pts (stored pixels) onto it. A float photo in 0..1 is
refused (musica_jax.images.check_image). Video frames that cannot be read are skipped,
counted and recorded in the JSON; the run goes on.
Output: --output is a .png/.jpg file for one image, else a directory that gets
<image name>.overlay.png per image. --output and --output_json are checked writable before
any work; an overlay that cannot be written is recorded in the JSON (written first) and
the run ends with one line naming --output. The overlay draws the box and the landmarks (green:
valid, red: estimated error >= --t_fail) and prints the estimated error and the iterations
used. --output_json gets every face's landmarks, estimated error, iterations and valid flag.
"""
from __future__ import annotations

from absl import app
from absl import flags

from experiments import common  # defines --workdir
from experiments import predict_lib

FLAGS = flags.FLAGS


def define_flags():
  """The flags of this entry point (defined when run as a program, so importing the
  module for its functions defines none)."""
  d = common.define_flag
  d("multi_string", "image", [], "Image path(s): repeat the flag or give a comma list.")
  d("string", "image_dir", None, "Folder of images (.jpg/.jpeg/.png/.bmp), sorted.")
  d("multi_string", "box", [], "Face box x0,y0,x1,y1 (several per image: ';'-separated); "
    "once for all images or once per image.")
  d("boolean", "box_from_pts", False, "Use the landmark box of the .pts beside each "
    "image when it has no --box.")
  d("string", "model", None, "Exported model directory (experiments.export_model).")
  d("string", "checkpoint", "latest", "With --workdir: checkpoint step, or 'latest'.")
  d("string", "output", None, "Overlay: a .png/.jpg file (one image) or a directory.")
  d("string", "output_json", None, "Where to write the predictions (JSON).")
  d("float", "ts", None, "Early exit: success threshold on the quitting score (the "
    "estimated error, or the model's quit head).")
  d("float", "budget", None, "Early exit by compute: mean iterations per face (1..3); "
    "the faces that need them most get the later iterations.")
  d("float", "budget_mmacs", None, "The same budget in millions of multiply-adds per face.")
  d("float", "t_fail", None, "Failure threshold: faces with estimated error >= t_fail are invalid.")
  d("integer", "max_batch", 64, "Faces per cascade call (a power of two).")
  d("string", "video", None, "A folder of frames or an animated GIF/TIFF: track faces.")
  d("string", "compilation_cache", "~/.cache/musica_jax/xla", "Persistent XLA "
    "compilation cache ('' to disable): a second run skips compiling.")


def main(argv):
  common.start(argv)                 # also: --output_json writable, before any work
  predict_lib.enable_compilation_cache(FLAGS.compilation_cache)
  if FLAGS.video:
    if FLAGS.image or FLAGS.image_dir or FLAGS.box or FLAGS.box_from_pts:
      raise app.UsageError("--video tracks faces on its own: no --image/--image_dir/--box")
    predict_lib.check_outputs(FLAGS.output, FLAGS.output_json, video=True)
    pred_obj = predict_lib.load_predictor(FLAGS.workdir, FLAGS.model, FLAGS.checkpoint,
                                          FLAGS.max_batch)
    predict_lib.run_video(FLAGS.video, pred_obj, FLAGS.ts, FLAGS.t_fail, FLAGS.output,
                          FLAGS.output_json, FLAGS.budget, FLAGS.budget_mmacs)
    return
  paths = predict_lib.image_paths(FLAGS.image, FLAGS.image_dir)
  boxes = predict_lib.boxes_for(paths, FLAGS.box, FLAGS.box_from_pts)
  predict_lib.overlay_paths(paths, FLAGS.output)            # one file for many images
  predict_lib.check_outputs(FLAGS.output, FLAGS.output_json)
  if not FLAGS.output and not FLAGS.output_json:
    print("note: neither --output nor --output_json given; printing only")
  orientations = []
  images = predict_lib.load_inputs(paths, boxes, orientations)
  pred_obj = predict_lib.load_predictor(FLAGS.workdir, FLAGS.model, FLAGS.checkpoint,
                                        FLAGS.max_batch)
  predict_lib.run(paths, boxes, pred_obj, FLAGS.ts, FLAGS.t_fail, FLAGS.output, FLAGS.output_json,
                  images, FLAGS.budget, FLAGS.budget_mmacs, orientations)


if __name__ == "__main__":
  define_flags()
  common.run(main)
