r"""The peer comparison, flag-free: dlib's ERT 68-point model (Kazemi & Sullivan 2014) on
300W under our protocol. Shared by the programs: experiments.compare_dlib (dlib alone,
`compare`), experiments.evaluate --with_dlib (both rows from one run, `dlib_side`),
experiments.fit_detector_box and experiments.deploy_benchmark (`split_items`,
`detect_training_boxes`, `find_dlib_model`, `box_to_rect`). Errors are app.UsageError
naming the flag or file (one line under common.run); tests call these in-process.

Protocol (issue 6). Both methods get a face box derived from the ground-truth landmarks.
dlib's shape model was trained on boxes of dlib's HOG face detector, which sit differently
on the face than a landmark box (larger, lower), so the landmark box is first mapped to
dlib's box convention with a linear fit learned on the 300W TRAINING faces where the HOG
detector finds the face (detector box vs landmark box):
    det_cx = cx + a * w          det_w = c * w + d * h
    det_cy = cy + b * h          det_h = e * w + f * h
(cx, cy, w, h: centre and size of the landmark box; least squares per line; translation
and scale equivariant). dlib then runs on the common test split (554 faces) from the
mapped box (rounded to dlib's integer rectangle). MuSiCa runs from the landmark box itself
(its training convention), via the same evaluation code as experiments.evaluate.

Metrics (musica_jax.metrics): NME inter-pupil (eye centres; the paper's convention) and
inter-ocular (outer eye corners), FR and AUC at 0.08 / 0.10 of the inter-ocular NME, and
dlib's speed (ms per face of the shape predictor, single thread, this machine).

Note: dlib's 68-point model was trained on the 300W training faces (iBUG's release); its
licence restricts the model to non-commercial use.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import time

from absl import app
import numpy as np

from data_pipelines import readers
from data_pipelines import sources
from experiments import common
from musica_jax import detector as detector_lib
from musica_jax import images as images_lib
from musica_jax import metrics
from musica_jax import schemes

DLIB_MODEL_FILE = "shape_predictor_68_face_landmarks.dat"


# ---------------------------------------------------------------------------------------
# dlib.


def find_dlib_model() -> pathlib.Path:
  """shape_predictor_68_face_landmarks.dat of the face-recognition-models package, found
  without importing it (it imports pkg_resources)."""
  spec = importlib.util.find_spec("face_recognition_models")
  if spec is None:
    raise ImportError(f"face_recognition_models is not installed: {detector_lib.INSTALL_HINT}")
  dirs = list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin)]
  for d in dirs:
    path = pathlib.Path(d) / "models" / DLIB_MODEL_FILE
    if path.is_file():
      return path
  raise FileNotFoundError(f"{DLIB_MODEL_FILE} not found under {dirs} (face_recognition_models "
                          f"installed without its models?)")


import_dlib = detector_lib.import_dlib     # experiments.evaluate --with_dlib calls it here


def box_to_rect(dlib, box):
  x0, y0, x1, y1 = (int(round(v)) for v in box)
  return dlib.rectangle(x0, y0, x1, y1)


def detect_training_boxes(dlib, items, upsample_retry: bool = True) -> dict:
  """HOG detections matched to the training faces: {"landmark_boxes", "detector_boxes",
  "found", "missed", "seconds"}. Upsampling 0 first; 1 when nothing matched."""
  detector = dlib.get_frontal_face_detector()
  lbs, dbs, missed = [], [], 0
  t0 = time.perf_counter()
  for item in items:
    image = images_lib.read_image(item.image_path, exif_transpose=False)
    k, dets = None, []
    for upsample in ((0, 1) if upsample_retry else (0,)):
      dets = [[float(r.left()), float(r.top()), float(r.right()), float(r.bottom())]
              for r in detector(image, upsample)]
      k = detector_lib.match_detection(item.box, dets)
      if k is not None:
        break
    if k is None:
      missed += 1
      continue
    lbs.append(np.asarray(item.box, np.float64))
    dbs.append(dets[k])
  return {"landmark_boxes": np.asarray(lbs).reshape(-1, 4),
    "detector_boxes": np.asarray(dbs).reshape(-1, 4), "found": len(lbs),
    "missed": missed, "seconds": time.perf_counter() - t0}


def run_dlib(dlib, predictor, items, mapping) -> tuple[np.ndarray, float]:
  """dlib landmarks [M, 68, 2] (0-based pixels) from the mapped landmark boxes, and the
  shape predictor's mean milliseconds per face."""
  out, seconds = [], 0.0
  boxes = mapping.apply(np.stack([it.box for it in items]))
  for item, box in zip(items, boxes):
    image = images_lib.read_image(item.image_path, exif_transpose=False)
    rect = box_to_rect(dlib, box)
    t0 = time.perf_counter()
    shape = predictor(image, rect)
    seconds += time.perf_counter() - t0
    out.append([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)])
  return np.asarray(out, np.float64), 1e3 * seconds / max(len(items), 1)


def summarise(pred, gt, scheme=schemes.IBUG68) -> tuple[dict, np.ndarray]:
  """NME (percent) both ways, FR/AUC on the inter-ocular NME; per face for matching."""
  pred = np.asarray(pred, np.float64)
  gt = np.asarray(gt, np.float64)
  ip = np.asarray(metrics.per_face_nme(pred, gt, scheme, "interpupil"))
  io = np.asarray(metrics.per_face_nme(pred, gt, scheme, "interocular"))
  out = {"faces": int(len(gt)), "nme_interpupil": float(ip.mean() * 100),
         "nme_interocular": float(io.mean() * 100)}
  out.update(metrics.fr_auc(io))
  return out, io


# ---------------------------------------------------------------------------------------
# Data.


def split_items(data_dir: str, name: str) -> list[sources.FaceItem]:
  """The annotated faces of a 300W split, sorted by file_id: the scan (and the ids) of
  data_pipelines.sources, which the prepared data are made from (no TensorFlow)."""
  try:
    scan = sources.scan_ibug300w(data_dir, parts=sources.ibug300w_parts(name))
  except (readers.DataError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  return sorted((it for items in scan.splits.values() for it in items),
                key=lambda it: it.file_id)


def dlib_side(data_dir: str, split: str = "common", box_fit_json: str | None = None,
              fit_max_faces: int = 0, max_faces: int = 0) -> dict:
  """dlib on one 300W split under the protocol: {"row": summary row, "box_fit": how the box
  mapping was obtained, "file_ids": [M] face ids in order, "nme_interocular_per_face": [M]}."""
  dlib = import_dlib()
  model_path = find_dlib_model()
  if box_fit_json:
    try:
      fit = json.loads(pathlib.Path(box_fit_json).read_text())["box_fit"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
      raise app.UsageError(f"{box_fit_json}: no box_fit in it ({e})") from e
    mapping = detector_lib.BoxMapping(**fit["mapping"])
    box_fit = dict(fit, reused_from=os.path.abspath(box_fit_json))
  else:
    train = split_items(data_dir, "train")
    if fit_max_faces:
      train = train[::max(1, len(train) // fit_max_faces)][:fit_max_faces]
    det = detect_training_boxes(dlib, train)
    mapping = detector_lib.fit_box_mapping(det["landmark_boxes"], det["detector_boxes"])
    box_fit = {"mapping": mapping.to_json(), "train_faces": len(train),
               "detector_found": det["found"], "detector_missed": det["missed"],
               "detector": "dlib.get_frontal_face_detector (HOG), upsample 0, "
                           "retry with 1; match IoU >= 0.3",
               "detector_seconds": det["seconds"]}
    print(f"dlib box fit on {det['found']} training faces (HOG missed {det['missed']}): "
          f"{mapping.to_json()}", flush=True)
  items = split_items(data_dir, split)
  if max_faces:
    items = items[:max_faces]
  gt = np.stack([it.landmarks for it in items]).astype(np.float64)
  sp = dlib.shape_predictor(str(model_path))
  pred, ms = run_dlib(dlib, sp, items, mapping)
  summary, io = summarise(pred, gt)
  row = {"method": "dlib ERT 68 (shape_predictor_68_face_landmarks.dat)",
         "dlib_version": getattr(dlib, "__version__", "?"), "model_file": str(model_path),
         "box": "landmark box mapped by box_fit, rounded to dlib.rectangle", **summary,
         "ms_per_face": ms, "timing": "shape predictor call only, 1 thread, CPU"}
  print(f"dlib on {split} ({row['faces']} faces): NME inter-pupil {row['nme_interpupil']:.2f}% "
        f"inter-ocular {row['nme_interocular']:.2f}% FR@0.08 {row['fr_008'] * 100:.2f}% "
        f"AUC@0.08 {row['auc_008']:.4f}; {ms:.2f} ms/face", flush=True)
  return {"row": row, "box_fit": box_fit, "file_ids": [it.file_id for it in items],
    "nme_interocular_per_face": io}


PROTOCOL = ("face box from the ground-truth landmarks; dlib gets it mapped to its "
            "HOG-detector box convention by a linear fit on the 300W training faces the "
            "detector finds")


@dataclasses.dataclass(frozen=True)
class DlibConfig:
  """The flags of experiments.compare_dlib."""
  data_dir: str
  output_json: str | None = None
  split: str = "common"
  box_fit_json: str | None = None
  fit_max_faces: int = 0
  max_faces: int = 0


def compare(cfg: DlibConfig, command: str = "") -> dict:
  """dlib's row alone (the side-by-side with a MuSiCa model is experiments.evaluate
  --with_dlib, which runs both in one command); written to cfg.output_json when given."""
  side = dlib_side(cfg.data_dir, cfg.split, cfg.box_fit_json, cfg.fit_max_faces,
                   cfg.max_faces)
  result = {"protocol": PROTOCOL, "data_dir": os.path.abspath(cfg.data_dir),
            "split": cfg.split, "command": command, "fr_auc_normalisation": "interocular",
            "rows": [side["row"]], "box_fit": side["box_fit"]}
  if cfg.output_json:
    common.write_json(cfg.output_json, result, indent=2)
  return result
