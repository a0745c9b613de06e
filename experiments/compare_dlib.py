r"""dlib's ERT 68-point model (Kazemi & Sullivan 2014) on 300W under our protocol.

  pip install -e '.[peers]'        # dlib-bin + face-recognition-models
  python -m experiments.compare_dlib --data_dir=../shared/data/300w \
      --output_json=results/dlib_300w_common.json [--eval_split=common]

The side by side with a MuSiCa model, both rows from one run, is
  python -m experiments.evaluate --flagfile=300w19.flags --model=default --with_dlib \
      --output_json=results/default_model_vs_dlib_common.json
which calls `peers_lib.dlib_side`.

The protocol and the code: experiments/peers_lib.py.
"""
from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

from experiments import common
from experiments import peers_lib

FLAGS = flags.FLAGS


def define_flags():
  """The flags of this entry point (defined when run as a program, so importing the
  module for its functions defines none). The data flags (--data_dir, --eval_split,
  --eval_batch_size, --tfds_dir, ...) are experiments.config_flags', so the 300w flagfiles
  work here."""
  d = common.define_flag
  d("string", "output_json", None, "Where to write the side-by-side JSON.")
  d("string", "box_fit_json", None, "Reuse the box fit from an earlier output JSON "
    "(skips running the detector on the training set).")
  d("integer", "fit_max_faces", 0, "Use at most this many training faces for the box "
    "fit (0 = all; for quick checks).")
  d("integer", "max_faces", 0, "Evaluate at most this many faces (0 = all; quick checks).")


def main(argv):
  common.start(argv)
  if not FLAGS.data_dir:
    raise app.UsageError("--data_dir is required (300W in the official layout; or "
                         "--flagfile=300w68.flags)")
  if not os.path.isdir(FLAGS.data_dir):
    raise app.UsageError(f"--data_dir={FLAGS.data_dir}: not a directory")
  if FLAGS.workdir:
    raise app.UsageError("--workdir: compare_dlib runs dlib alone; for a MuSiCa model beside "
                         "it use python -m experiments.evaluate --workdir=W (or --model=DIR) "
                         "--with_dlib")
  cfg = peers_lib.DlibConfig(data_dir=FLAGS.data_dir, output_json=FLAGS.output_json,
                             split=FLAGS.eval_split, box_fit_json=FLAGS.box_fit_json,
                             fit_max_faces=FLAGS.fit_max_faces, max_faces=FLAGS.max_faces)
  try:
    peers_lib.compare(cfg, "python -m experiments.compare_dlib " + " ".join(sys.argv[1:]))
  except ImportError as e:
    raise app.UsageError(str(e)) from e


if __name__ == "__main__":
  define_flags()
  common.run(main)
