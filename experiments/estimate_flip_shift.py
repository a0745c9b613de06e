r"""Estimates the labels' horizontal convention offset (--flip_label_shift) on TRAINING faces.

  python -m experiments.estimate_flip_shift --flagfile=300w19.flags \
      --output_json=results/flip_shift_300w.json [--model=default|DIR]

Why: if the annotations sit `delta` px right of the image content (label = content +
delta in x), mirroring image and labels with one affine puts the mirrored labels at
content - delta, so a model trained with half the faces mirrored learns offset 0 and
predicts every (unmirrored) face `delta` LEFT of its label. For a model trained with
--flip_prob=0.5 and --flip_label_shift=0 (the shipped default), the mean x residual
(prediction - label) on its training faces therefore estimates -delta.

It runs the model on the faces of --train_split (box: the ground-truth landmark box, as
the evaluation pipeline) and reports the mean x and y residual per source folder, both in
image pixels and in crop pixels (image px x crop scale, 142 px per face box side). The
convention offset is a constant in one of the two frames: image px (a pixel convention
of the annotation tool) or crop px (a bias proportional to the face size). The frame
chosen is the one whose per-folder means spread less relative to their mean; a
per-face fit residual_crop = a + b * crop_scale gives the same evidence (a = 0: image
frame, b = 0: crop frame). The shift to use is delta = -(mean residual) in image px.
"""
from __future__ import annotations

import io
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags
import numpy as np

from data_pipelines import datasets
from data_pipelines import readers
from experiments import common
from experiments import config_flags
from musica_jax import face_frame
from musica_jax import images as images_lib
from musica_jax import predictor as predictor_lib

FLAGS = flags.FLAGS
_BATCH = 64


def define_flags():
  """The flags of this entry point (defined when run as a program, so importing the
  module for its functions defines none)."""
  d = common.define_flag
  d("string", "output_json", "", "Where to write the JSON report.")
  d("string", "model", "default", "An exported model directory, or 'default' (the shipped "
    "model, trained with --flip_prob=0.5).")


def _group(file_id: str) -> str:
  """The source folder of a face (300W: lfpw/trainset, helen/trainset, afw)."""
  return os.path.dirname(file_id) or "."


def residuals(pred: predictor_lib.Predictor, data: datasets.SplitData) -> dict:
  """Per face: mean (prediction - label) over the landmarks [M, 2] in image px, crop scale."""
  res = np.zeros((len(data), 2), np.float64)
  for start in range(0, len(data), _BATCH):
    idx = range(start, min(start + _BATCH, len(data)))
    images = [images_lib.read_image(io.BytesIO(data.images[i]), exif_transpose=False) for i in idx]
    boxes = [data.boxes[i] for i in idx]
    out = pred.predict(images, boxes)
    res[list(idx)] = (out.landmarks.astype(np.float64) - data.landmarks[list(idx)]).mean(1)
  scale, _ = face_frame.crop_frames(data.boxes)
  return {"image_px": res, "crop_scale": scale.astype(np.float64)}


def _mean_se(v: np.ndarray) -> tuple[float, float]:
  return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def summarise(file_ids, r: dict) -> dict:
  img, scale = r["image_px"], r["crop_scale"]
  crop = img * scale[:, None]
  groups = sorted({_group(f) for f in file_ids})
  per = {}
  for g in groups:
    m = np.array([_group(f) == g for f in file_ids])
    (xi, xi_se), (xc, xc_se) = _mean_se(img[m, 0]), _mean_se(crop[m, 0])
    per[g] = {"faces": int(m.sum()), "mean_crop_scale": float(scale[m].mean()),
              "x_image_px": xi, "x_image_px_se": xi_se, "x_crop_px": xc, "x_crop_px_se": xc_se,
              "y_image_px": float(img[m, 1].mean()), "y_crop_px": float(crop[m, 1].mean())}
  spread = {}
  for frame in ("image_px", "crop_px"):
    means = np.array([per[g][f"x_{frame}"] for g in groups])
    allm = float((img[:, 0] if frame == "image_px" else crop[:, 0]).mean())
    spread[frame] = {"all_faces": allm,
                     "relative_spread": float((means.max() - means.min()) / abs(allm))}
  # Per face: residual_crop_x = a + b * crop_scale (image frame: a = 0, b = -delta_image).
  design = np.stack([np.ones_like(scale), scale], 1)
  coef, *_ = np.linalg.lstsq(design, crop[:, 0], rcond=None)
  dof = max(len(scale) - 2, 1)
  sigma2 = float(((crop[:, 0] - design @ coef) ** 2).sum() / dof)
  se = np.sqrt(np.diag(sigma2 * np.linalg.inv(design.T @ design)))
  frame = min(spread, key=lambda k: spread[k]["relative_spread"])
  return {
      "per_folder": per, "frames": spread,
      "fit_crop_x_vs_scale": {"a_crop_px": float(coef[0]), "a_se": float(se[0]),
                              "b_image_px": float(coef[1]), "b_se": float(se[1])},
      "more_constant_frame": frame,
      "delta_image_px": -spread["image_px"]["all_faces"],
      "delta_crop_px": -spread["crop_px"]["all_faces"],
  }


def main(argv):
  common.start(argv)
  try:
    cfg = config_flags.data_config_from_flags()
    data = datasets.load_split(cfg, cfg.train_split)
  except (readers.DataError, ValueError) as e:
    print(f"estimate_flip_shift: error: {e}", file=sys.stderr)
    sys.exit(1)
  if FLAGS.model == "default":
    pred = predictor_lib.Predictor.default()
  else:
    pred = predictor_lib.Predictor.from_model_dir(FLAGS.model)
  result = summarise(list(data.file_ids), residuals(pred, data))
  result.update({
      "command": "python -m experiments.estimate_flip_shift " + " ".join(sys.argv[1:]),
      "model": FLAGS.model, "split": cfg.train_split, "faces": len(data),
      "note": "residual = prediction - label (mean over landmarks, then faces); "
              "delta = -residual is the labels' x offset from the image content; use "
              "--flip_label_shift=delta_image_px"})
  for g, v in result["per_folder"].items():
    print(f"{g:16s} faces {v['faces']:5d}  x {v['x_image_px']:+.3f} image px "
          f"{v['x_crop_px']:+.3f} crop px (scale {v['mean_crop_scale']:.3f})  "
          f"y {v['y_image_px']:+.3f} image px")
  f = result["fit_crop_x_vs_scale"]
  print(f"per face x_crop = a + b * scale: a {f['a_crop_px']:+.3f} +- {f['a_se']:.3f} crop px, "
        f"b {f['b_image_px']:+.3f} +- {f['b_se']:.3f} image px")
  for k, v in result["frames"].items():
    print(f"{k}: all faces {v['all_faces']:+.3f}, relative spread over folders "
          f"{v['relative_spread']:.2f}")
  print(f"more constant in {result['more_constant_frame']}; delta = "
        f"{result['delta_image_px']:+.3f} image px / {result['delta_crop_px']:+.3f} crop px")
  if FLAGS.output_json:
    common.write_json(FLAGS.output_json, result)


if __name__ == "__main__":
  define_flags()
  common.run(main)
