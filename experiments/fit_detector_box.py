r"""Fits the detector-box -> landmark-box mapping that box-free prediction uses.

  python -m experiments.fit_detector_box --data_dir=../shared/data/300w \
      --output_json=results/detector_box_fit_300w.json [--install]

Runs dlib's HOG face detector on the 300W training faces (upsample 0, retry with 1),
matches each detection to its face (IoU >= 0.3 with the ground-truth landmark box), and
fits `musica_jax.detector.BoxMapping` from the detector's box to the landmark box (the
cascade's training convention). --install writes it into musica_jax/detector_boxes.json,
which `Predictor.predict(images)` (no boxes) reads. Needs the peers extra (dlib).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags

from experiments import common
from experiments import peers_lib
from musica_jax import detector as detector_lib

FLAGS = flags.FLAGS


def define_flags():
  """The command's flags (defined only when run as a program); --data_dir is
  experiments.config_flags'."""
  d = common.define_flag
  d("string", "output_json", None, "Where to write the fit (JSON).")
  d("boolean", "install", False, "Write the fit into musica_jax/detector_boxes.json.")
  d("integer", "fit_max_faces", 0, "At most this many training faces (0 = all).")


def fit(data_dir: str, max_faces: int = 0) -> dict:
  dlib = detector_lib.import_dlib()
  train = peers_lib.split_items(data_dir, "train")
  if max_faces:
    train = train[::max(1, len(train) // max_faces)][:max_faces]
  det = peers_lib.detect_training_boxes(dlib, train)
  mapping = detector_lib.fit_box_mapping(det["detector_boxes"], det["landmark_boxes"])
  print(f"detector -> landmark box fit on {det['found']} training faces (HOG missed "
        f"{det['missed']}): {mapping.to_json()}", flush=True)
  return {"mapping": mapping.to_json(), "train_faces": len(train),
          "detector_found": det["found"], "detector_missed": det["missed"],
          "detector": "dlib.get_frontal_face_detector (HOG), upsample 0, retry with 1; "
                      "match IoU >= 0.3", "direction": "detector box -> landmark box",
          "data_dir": os.path.abspath(data_dir), "split": "train",
          "command": "python -m experiments.fit_detector_box " + " ".join(sys.argv[1:])}


def install(entry: dict, num_landmarks: int = 68, path=None) -> None:
  path = path or detector_lib.FITS_FILE
  fits = json.loads(path.read_text()) if os.path.isfile(path) else {}
  fits.setdefault(detector_lib.DLIB_HOG, {})[str(num_landmarks)] = entry
  common.write_json(path, fits, indent=1)
  print(f"installed in {path}")


def main(argv):
  common.start(argv)
  if not FLAGS.data_dir or not os.path.isdir(FLAGS.data_dir):
    raise app.UsageError(f"--data_dir={FLAGS.data_dir}: not a directory (300W, official "
                         f"layout)")
  try:
    entry = fit(FLAGS.data_dir, FLAGS.fit_max_faces)
  except ImportError as e:
    raise app.UsageError(str(e)) from e
  if FLAGS.output_json:
    common.write_json(FLAGS.output_json, entry, indent=1)
  if FLAGS.install:
    install(entry)


if __name__ == "__main__":
  define_flags()
  common.run(main)
