"""DataConfig: everything the input pipeline needs, as one plain dataclass.

Augmentation defaults follow the reference notes (the authors' WFLW code): each
augmentation fires with probability 0.5; rotation U(-30, 30) deg; shear U(-0.3, 0.3) on both
axes; one axis scaled U(0.6, 1.4); the box replaced by the landmark box scaled
U(1, 1.1) x U(1, 1.2) and shifted up to 0.2 of its size; per-channel colour "jetting";
greyscale with probability 0.5. The original drew one coin for the whole geometric block;
here every augmentation has its own coin (same marginal probability), so each can be
switched off or tuned alone. Horizontal flip: the original skipped it for WFLW, the paper
lists it; we follow the paper (flip_prob=0.5). The occlusion rectangle is off by default
(the issue asks for it as an option; set occlusion_prob=0.5 for the original behaviour).
Resolution and blur (issue #28: deployment faces from low-resolution video, webcams,
defocus, motion; off by default): the crop is blurred (an axis-aligned Gaussian) and/or
brought down to a face of U(lowres_min_px, lowres_max_px) px and back up
(augment.degrade). A starting point (its effect on val and robust-val not measured yet):
--lowres_prob=0.3 --blur_prob=0.2 with the default ranges.

Where prepared data goes (`tfds_dir`): "" means $TFDS_DATA_DIR when set, else
~/tensorflow_datasets. Under it: `<builder>/<config>/<version>/` (TFDS), where the config name
contains a fingerprint of the source folder (file names, sizes, mtimes), so a changed source
is re-prepared automatically; `musica_reports/` (what each preparation skipped) and
`musica_stats/` (cached dataset statistics).
"""
from __future__ import annotations

import dataclasses
import math
import os

from musica_jax import face_frame

DATASETS = ("ibug300w", "wflw", "pts_folder", "synthetic_faces")
BALANCING = ("gdb", "pdb", "none")
GDB_MAPPINGS = ("linear", "square", "sqrt")
# The two splits carved from --val_source (see DataConfig.val_fraction).
VAL_SPLIT = "val"
FIT_SPLIT = "train_fit"
# The ranges of the image-quality augmentation (DataConfig.lowres_*, blur_max_sigma).
MIN_FACE_PX = 8.0
MAX_BLUR_SIGMA = 12.0


@dataclasses.dataclass
class DataConfig:
  dataset: str = "synthetic_faces"   # ibug300w | wflw | pts_folder | synthetic_faces
  data_dir: str = ""                 # source folder (manual dir); unused for synthetic
  tfds_dir: str = ""                 # prepared data; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
  num_points: int = 68
  train_split: str = "train"         # pts_folder has one split: "all"
  eval_split: str = "common"         # for ibug300w; "test" for wflw/synthetic
  batch_size: int = 128              # GLOBAL batch; each host gets batch_size // process_count
  eval_batch_size: int = 64          # GLOBAL eval batch
  seed: int = 0
  balancing: str = "gdb"             # gdb | pdb | none

  # Validation split carved from the training faces (datasets.carve): `val` is a seeded
  # val_fraction of val_source's faces, whole photos chosen by hashing their ids (the
  # same faces whatever the storage order), `train_fit` is the rest. Train on train_fit,
  # choose checkpoints on val; the test sets are for the end. 0 = no carve.
  val_fraction: float = 0.1
  val_seed: int = 0
  val_source: str = "train"          # the split carved (pts_folder: "all")

  # Data balancing (paper 3.4). GDB: sampling weight = mapping(Mahalanobis distance over
  # the first gdb_components PCA components of the Procrustes-aligned training shapes).
  # Default mapping "linear": weight proportional to the distance ("we over-sample faces
  # in proportion to their Mahalanobis distance"). "square" / "sqrt": d**2 / d**0.5.
  gdb_components: int = 10
  gdb_mapping: str = "linear"
  # Weights are clipped to [min_weight_ratio, max_weight_ratio] x the median weight
  # (0 = no clip).
  balancing_min_ratio: float = 0.0
  balancing_max_ratio: float = 0.0
  pdb_bins: int = 13                 # PDB: histogram bins on the first principal axis

  # Augmentation (training only).
  augment: bool = True
  rotation_prob: float = 0.5
  rotation_max_deg: float = 30.0
  shear_prob: float = 0.5
  shear_max: float = 0.3             # both axes, U(-shear_max, shear_max)
  scale_prob: float = 0.5
  scale_min: float = 0.6             # one random axis scaled U(scale_min, scale_max)
  scale_max: float = 1.4
  flip_prob: float = 0.5
  # The labels' x convention offset in IMAGE pixels (label = image content + shift): the
  # mirrored face's labels are moved so that they keep it (augment.augment_example).
  # 0 for synthetic faces (drawn at the label); 300W: measured by
  # experiments.estimate_flip_shift on training faces (its per-folder numbers are more
  # constant in image than in crop pixels, as a property of the annotation would be).
  flip_label_shift: float = 0.0
  box_prob: float = 0.5              # box := landmark box scaled and shifted
  box_scale_x_max: float = 1.1       # U(1, box_scale_x_max)
  box_scale_y_max: float = 1.2       # U(1, box_scale_y_max)
  box_shift_max: float = 0.2         # fraction of the box size, each axis
  color_prob: float = 0.5
  color_clip_max: float = 0.25       # per channel, clip up to this fraction at each end
  greyscale_prob: float = 0.5
  occlusion_prob: float = 0.0
  occlusion_max_frac: float = 0.5    # rectangle sides up to this fraction of the crop
  # Image quality (augment.degrade, right after the warp; the landmarks do not move). Blur:
  # an axis-aligned Gaussian, sigma_y and sigma_x each U(0, blur_max_sigma) crop px (the
  # face box is 142 crop px: 3 px ~ 2% of the face; round defocus-like to elongated
  # motion-like). Low resolution: the crop is area-averaged down so that the face box
  # (142 crop px) becomes U(lowres_min_px, lowres_max_px) px, then bilinearly up to 228
  # (what a camera that saw the face at that size, and the crop of its frame, give).
  # Blur before resolution when both fire.
  lowres_prob: float = 0.0
  lowres_min_px: float = 40.0
  lowres_max_px: float = 120.0
  blur_prob: float = 0.0
  blur_max_sigma: float = 3.0

  # Evaluation only (robustness to the detector's box): each eval face box is moved by
  # U(-box_jitter, box_jitter) x its width / height and resized by 1 + U(-box_jitter,
  # box_jitter), drawn from (seed, file id): the same boxes for the same --seed. 0 = off.
  box_jitter: float = 0.0

  # synthetic_faces (generated locally; sizes are part of the prepared config).
  synthetic_train_size: int = 2000
  synthetic_test_size: int = 200
  synthetic_image_size: int = 192
  synthetic_seed: int = 1234         # data seed, independent of the training `seed`

  skip_bad: bool = False             # skip (count, report) bad files instead of failing
  num_parallel_calls: int = -1       # -1 = tf.data.AUTOTUNE
  # Training photos decoded once and held in memory (face_cache): the regions of the
  # training faces as uint8, up to this many MB (300W train_fit: 479 MB); over it, or 0,
  # each sample decodes its photo (the slower per-sample pipeline).
  train_cache_mb: int = 2048
  prefetch: int = 2                  # batches prefetched by tf.data


def default_tfds_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def resolve_tfds_dir(cfg: DataConfig) -> str:
  return os.path.abspath(os.path.expanduser(cfg.tfds_dir or default_tfds_dir()))


def validate(cfg: DataConfig) -> DataConfig:
  """Raises ValueError naming the flag when a field is out of range; returns cfg."""
  def need(cond, flag, msg):
    if not cond:
      raise ValueError(f"--{flag}: {msg}")
  need(cfg.dataset in DATASETS, "dataset", f"{cfg.dataset!r} not in {DATASETS}")
  need(cfg.balancing in BALANCING, "balancing", f"{cfg.balancing!r} not in {BALANCING}")
  need(cfg.gdb_mapping in GDB_MAPPINGS, "gdb_mapping",
       f"{cfg.gdb_mapping!r} not in {GDB_MAPPINGS}")
  need(cfg.dataset == "synthetic_faces" or cfg.data_dir, "data_dir",
       f"required for --dataset={cfg.dataset}")
  need(cfg.dataset != "wflw" or cfg.num_points == 98, "num_points", "WFLW has 98 points")
  need(cfg.dataset != "ibug300w" or cfg.num_points == 68, "num_points", "300W has 68 points")
  need(cfg.batch_size > 0, "batch_size", "must be positive")
  need(cfg.eval_batch_size > 0, "eval_batch_size", "must be positive")
  need(cfg.gdb_components >= 1, "gdb_components", "must be >= 1")
  need(cfg.pdb_bins >= 2, "pdb_bins", "must be >= 2")
  for f in ("rotation_prob", "shear_prob", "scale_prob", "flip_prob", "box_prob",
            "color_prob", "greyscale_prob", "occlusion_prob", "lowres_prob", "blur_prob"):
    need(0.0 <= getattr(cfg, f) <= 1.0, f, "a probability in [0, 1]")
  need(0 < cfg.scale_min <= cfg.scale_max, "scale_min", "need 0 < scale_min <= scale_max")
  need(cfg.box_scale_x_max >= 1 and cfg.box_scale_y_max >= 1, "box_scale_x_max",
       "box scale maxima must be >= 1")
  need(0 <= cfg.color_clip_max < 0.5, "color_clip_max", "must be in [0, 0.5)")
  need(0 < cfg.occlusion_max_frac <= 1, "occlusion_max_frac", "must be in (0, 1]")
  need(MIN_FACE_PX <= cfg.lowres_min_px <= face_frame.BOX_SIZE, "lowres_min_px",
       f"a face size in px in [{MIN_FACE_PX:g}, {face_frame.BOX_SIZE:g}] (the face box's "
       f"size in the crop), got {cfg.lowres_min_px}")
  need(cfg.lowres_min_px <= cfg.lowres_max_px <= face_frame.BOX_SIZE, "lowres_max_px",
       f"a face size in px in [--lowres_min_px={cfg.lowres_min_px:g}, "
       f"{face_frame.BOX_SIZE:g}], got {cfg.lowres_max_px}")
  need(0 < cfg.blur_max_sigma <= MAX_BLUR_SIGMA, "blur_max_sigma",
       f"crop px in (0, {MAX_BLUR_SIGMA:g}], got {cfg.blur_max_sigma}")
  need(0 <= cfg.val_fraction < 1, "val_fraction", "must be in [0, 1)")
  need(math.isfinite(cfg.flip_label_shift), "flip_label_shift", "must be a finite number")
  need(0 <= cfg.box_jitter < 1, "box_jitter", "must be in [0, 1)")
  carved = (VAL_SPLIT, FIT_SPLIT)
  need(cfg.val_source not in carved, "val_source", f"cannot carve {cfg.val_source!r} itself")
  uses_carve = cfg.train_split in carved or any(
      s in carved for s in cfg.eval_split.split(","))
  need(not uses_carve or cfg.val_fraction > 0, "val_fraction",
       f"must be > 0 for the carved splits {carved}")
  need(VAL_SPLIT not in cfg.eval_split.split(",") or cfg.train_split == FIT_SPLIT,
       "train_split", f"{cfg.train_split!r} with --eval_split={VAL_SPLIT}: train on "
       f"{FIT_SPLIT}, the faces of --val_source={cfg.val_source} not in {VAL_SPLIT}")
  need(cfg.train_cache_mb >= 0, "train_cache_mb", "must be >= 0 (0: no cache)")
  need(cfg.synthetic_train_size > 0 and cfg.synthetic_test_size > 0,
       "synthetic_train_size", "synthetic sizes must be positive")
  return cfg
