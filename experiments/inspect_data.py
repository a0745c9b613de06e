r"""Counts faces and skipped items per split of a dataset, as JSON.

  python -m experiments.inspect_data --dataset=ibug300w --data_dir=DIR --output_json=PATH
  python -m experiments.inspect_data --dataset=wflw --num_points=98 --data_dir=DIR ...
  python -m experiments.inspect_data --dataset=pts_folder --data_dir=DIR ...

Prepares the data first (TFDS, cached under --tfds_dir). A corrupt image, a .pts with the
wrong number of points, a bad annotation line, ... make it exit with status 1 and a
message naming the file, unless --skip_bad (then they are counted under `skipped`).
Images without annotations and WFLW list entries whose image is missing are always counted
(never fatal). The splits val / train_fit carved from --val_source (--val_fraction,
--val_seed) are listed with their faces per source folder. With --balancing=gdb|pdb it
also reports the top-20 faces of the train split by score and their oversampling ratio
versus the median face.

  python -m experiments.inspect_data --flagfile=300w68.flags --train_split=train \
      --figure5=results/300w_figure5.png

`--figure5=PNG` draws the paper's Figure 5 from the --train_split faces: top row, a random
sample (--figure5_seed) of the top-20 faces by Mahalanobis distance from the mean shape
(GDB's score: --gdb_components PCA components of the Procrustes-aligned shapes); bottom
row, the faces with the most extreme values on the first principal axis (PDB's score;
half from each end). Each face is its evaluation crop with the annotated landmarks.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import os
import sys

from absl import flags
from absl import logging
import numpy as np

from data_pipelines import balancing as balancing_lib
from data_pipelines import config as config_lib
from data_pipelines import datasets
from data_pipelines import readers
from data_pipelines import sources
from experiments import common  # shared flags, flagfile lookup
from experiments import config_flags
from experiments import plots
from musica_jax import crop as crop_lib
from musica_jax import face_frame
from musica_jax import images as images_lib
from musica_jax import strict_json

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when run as a program, so tests can import the
  functions beside other entry points)."""
  d = common.define_flag
  d("string", "output_json", "", "Where to write the JSON report.")
  d("integer", "top_k", 20, "Faces listed in the balancing report.")
  d("string", "figure5", "", "Also draw the paper's Figure 5 (faces far from the mean by "
    "Mahalanobis distance vs by the first principal axis) to this PNG.")
  d("integer", "figure5_seed", 0, "Seed of Figure 5's random sample.")


def _parts(cfg, split: str) -> tuple[str, ...]:
  if split in (config_lib.VAL_SPLIT, config_lib.FIT_SPLIT):
    return ()   # skips are reported under --val_source
  if cfg.dataset == "ibug300w" and split in sources.IBUG300W_SPLITS:
    return sources.IBUG300W_SPLITS[split]
  return (split,)


def inspect(cfg, top_k: int = 20) -> dict:
  rep = datasets.report(cfg)
  skipped = rep.get("skipped", [])
  out = {"dataset": cfg.dataset, "data_dir": cfg.data_dir,
         "prepared_at": str(datasets.prepare(cfg).data_dir), "notes": rep.get("notes", []),
         "splits": {}}
  for split in datasets.available_splits(cfg):
    parts = _parts(cfg, split)
    items = [s for s in skipped if s.get("split") in parts]
    log = readers.SkipLog(items)
    entry = {"faces": datasets.split_size(cfg, split), "skipped": log.to_json()}
    if entry["faces"] == 0:
      entry["error"] = (f"empty split: every face skipped ({log.counts()}); evaluating on it "
                        "raises an error")
    out["splits"][split] = entry
  if config_lib.VAL_SPLIT in out["splits"]:
    fit = datasets.load_split(cfg, config_lib.FIT_SPLIT, allow_empty=True).file_ids
    val = datasets.load_split(cfg, config_lib.VAL_SPLIT, allow_empty=True).file_ids
    by_folder = lambda ids: dict(collections.Counter(os.path.dirname(f) or "." for f in ids))
    out["val_carve"] = {
        "source": cfg.val_source, "fraction": cfg.val_fraction, "seed": cfg.val_seed,
        "faces": {config_lib.FIT_SPLIT: len(fit), config_lib.VAL_SPLIT: len(val)},
        "val_by_folder": by_folder(val), "train_fit_by_folder": by_folder(fit),
        "overlap": len(set(fit) & set(val))}
  out["skipped_total"] = len(skipped)
  if cfg.balancing != "none":
    train = datasets.load_split(cfg, cfg.train_split)
    if len(train) > 2:
      bal = balancing_lib.compute(cfg, train.landmarks)
      w = bal.weights
      out["balancing"] = {
          "method": cfg.balancing, "split": cfg.train_split,
          "gdb_components": cfg.gdb_components, "gdb_mapping": cfg.gdb_mapping,
          "weight_min_max_over_median": [float(w.min() / np.median(w)),
                                         float(w.max() / np.median(w))],
          "top": balancing_lib.top_faces(bal, train.file_ids, top_k),
      }
  return out


def figure5_faces(cfg, landmarks, per_row: int = 6, top: int = 20, seed: int = 0) -> dict:
  """Indices of Figure 5's faces: {"mahalanobis": a random `per_row` of the `top` faces by
  Mahalanobis distance, "first_axis": the `per_row` most extreme on the first principal
  axis (half from each end), plus each face's score}."""
  if len(landmarks) < max(top, per_row) + 1:
    raise ValueError(f"Figure 5 needs more than {max(top, per_row)} faces, the split has "
                     f"{len(landmarks)}")
  gdb = balancing_lib.compute(dataclasses.replace(cfg, balancing="gdb"), landmarks)
  pdb = balancing_lib.compute(dataclasses.replace(cfg, balancing="pdb"), landmarks)
  top_idx = np.argsort(-gdb.score)[:top]
  rng = np.random.default_rng(seed)
  maha = top_idx[np.sort(rng.choice(top, per_row, replace=False))]
  order = np.argsort(pdb.score)
  first = np.concatenate([order[:per_row // 2], order[::-1][:per_row - per_row // 2]])
  return {"mahalanobis": maha, "first_axis": first, "mahalanobis_score": gdb.score,
          "first_axis_score": pdb.score}


def draw_figure5(cfg, path: str, seed: int = 0) -> dict:
  """Writes Figure 5 to `path`; returns the faces drawn (file ids and scores)."""
  train = datasets.load_split(cfg, cfg.train_split)
  picks = figure5_faces(cfg, train.landmarks, seed=seed)
  rows = [("mahalanobis", "Mahalanobis d"), ("first_axis", "1st axis")]
  idx = np.concatenate([picks[k] for k, _ in rows])
  photos = [images_lib.read_image(io.BytesIO(train.images[i]), exif_transpose=False) for i in idx]
  crops, scale, offset, _, _ = crop_lib.face_crops(photos, [train.boxes[i][None] for i in idx])
  crops = np.asarray(crops)[:len(idx)]
  points = face_frame.to_crop(train.landmarks[idx], scale[:len(idx)], offset[:len(idx)])
  fig, axes = plots.plt.subplots(2, len(idx) // 2, figsize=(2.2 * len(idx) // 2, 5.2))
  out = {}
  for r, (key, label) in enumerate(rows):
    out[key] = []
    for c, i in enumerate(picks[key]):
      k = r * (len(idx) // 2) + c
      img = crops[k]
      lo, hi = img.min(), img.max()
      ax = axes[r, c]
      ax.imshow((img - lo) / max(hi - lo, 1e-6))
      ax.scatter(points[k, :, 0], points[k, :, 1], s=2, c="lime")
      score = picks[f"{key}_score"][i]
      ax.set_title(f"{label} {score:.2f}", fontsize=8)
      ax.axis("off")
      out[key].append({"file_id": str(train.file_ids[i]), "score": float(score)})
  fig.suptitle(f"Top: random {len(picks['mahalanobis'])} of the 20 faces farthest from the "
               f"mean (Mahalanobis, {cfg.gdb_components} components). Bottom: extremes of "
               f"the first principal axis. {cfg.dataset} {cfg.train_split}, "
               f"{len(train)} faces", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plots.plt.close(fig)
  return out


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # TFDS is chatty at INFO
  try:
    cfg = config_flags.data_config_from_flags()
    result = inspect(cfg, FLAGS.top_k)
    if FLAGS.figure5:
      result["figure5"] = draw_figure5(cfg, FLAGS.figure5, FLAGS.figure5_seed)
  except readers.DataError as e:
    print(f"inspect_data: error: {e}\n(use --skip_bad to count and skip bad items)",
          file=sys.stderr)
    sys.exit(1)
  except ValueError as e:   # a data flag out of range or inconsistent
    print(f"inspect_data: error: {e}", file=sys.stderr)
    sys.exit(1)
  text = strict_json.dumps(result, indent=1)
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      f.write(text + "\n")
  summary = {s: (e["faces"], e["skipped"]["count"]) for s, e in result["splits"].items()}
  print(f"faces, skipped per split: {summary}")
  if "val_carve" in result:
    c = result["val_carve"]
    print(f"val carved from {c['source']} (fraction {c['fraction']:g}, seed {c['seed']}): "
          f"{c['faces']}, val per folder {c['val_by_folder']}, overlap {c['overlap']}")
  if "figure5" in result:
    print(f"wrote {FLAGS.figure5} (Figure 5: {len(result['figure5']['mahalanobis'])} + "
          f"{len(result['figure5']['first_axis'])} faces)")
  if "balancing" in result:
    print("top faces by balancing score:")
    for t in result["balancing"]["top"]:
      print(f"  {t['file_id']:40s} score {t['score']:8.3f}  x{t['oversampling_vs_median']:.2f}"
            " vs median")


if __name__ == "__main__":
  define_flags()
  common.run(main)
