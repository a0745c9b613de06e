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
"""
from __future__ import annotations

import collections
import os
import sys

from absl import flags
from absl import logging
import numpy as np

from data_pipelines import balancing as balancing_lib
from data_pipelines import config as config_lib
from data_pipelines import datasets
from data_pipelines import flags as data_flags
from data_pipelines import readers
from data_pipelines import sources
from experiments import common  # shared flags, flagfile lookup
from musica_jax import strict_json

_OUTPUT_JSON = flags.DEFINE_string("output_json", "", "Where to write the JSON report.")
_TOP = flags.DEFINE_integer("top_k", 20, "Faces listed in the balancing report.")


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


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # TFDS is chatty at INFO
  try:
    cfg = data_flags.config_from_flags()
    result = inspect(cfg, _TOP.value)
  except readers.DataError as e:
    print(f"inspect_data: error: {e}\n(use --skip_bad to count and skip bad items)",
          file=sys.stderr)
    sys.exit(1)
  except ValueError as e:   # a data flag out of range or inconsistent
    print(f"inspect_data: error: {e}", file=sys.stderr)
    sys.exit(1)
  text = strict_json.dumps(result, indent=1)
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      f.write(text + "\n")
  summary = {s: (e["faces"], e["skipped"]["count"]) for s, e in result["splits"].items()}
  print(f"faces, skipped per split: {summary}")
  if "val_carve" in result:
    c = result["val_carve"]
    print(f"val carved from {c['source']} (fraction {c['fraction']:g}, seed {c['seed']}): "
          f"{c['faces']}, val per folder {c['val_by_folder']}, overlap {c['overlap']}")
  if "balancing" in result:
    print("top faces by balancing score:")
    for t in result["balancing"]["top"]:
      print(f"  {t['file_id']:40s} score {t['score']:8.3f}  x{t['oversampling_vs_median']:.2f}"
            " vs median")


if __name__ == "__main__":
  common.run(main)
