"""The training and evaluation input pipelines (tf.data, host side) -> numpy batches.

Training stream. Global sample position p = step * batch_size + row. Position p belongs to
epoch e = p // M and slot s = p % M (M faces in the train split). Which face it shows:
  balancing none:     index_shuffle(s; seed, e), an exact permutation of the faces per epoch
                      (this is the "shuffle" and the "repeat" of the pipeline);
  balancing gdb/pdb:  inverse-CDF sampling of the balancing weights with a uniform drawn
                      statelessly from (seed, p).
Its augmentation key is folded from (seed, epoch, face index, slot) (the slot separates two
draws of one face in an epoch). Every piece is a pure function of (seed, p), so the batch
of step k is the same whether the iterator starts at 0 or at k, on any host layout with
the same global batch size. Host h of H takes rows [h * B/H, (h + 1) * B/H) of each
global batch. Then (the default, `face_cache`): the training photos are decoded once into
an in-memory uint8 cache of each face's region (DataConfig.train_cache_mb); parallel map
(per sample: face index, key, augment.sample_params: matrix, landmarks, photometric draws)
-> batch(B/H, drop_remainder) -> parallel map (per batch: face_cache.render_batch, the
warp of every crop from the cache in one XLA program, blur / low resolution of the drawn
samples, colour / occlusion / greyscale, standardise) -> prefetch. Without the cache
(over its budget, or train_cache_mb=0): parallel map (decode, augment_example,
standardise per sample) -> batch -> prefetch; the same draws, the same pixels up to float
rounding (tests/test_data_pipeline.py).

Evaluation: every face exactly once, in file_id order (crop from the face box, moved and
resized per face when --box_jitter > 0); global batches of eval_batch_size,
the last one padded (with mask False) so no face is dropped; host h takes its rows of each
batch, so every host sees the same number of batches.
"""
from __future__ import annotations

import os
from typing import Iterator

from absl import logging
import numpy as np
from data_pipelines.tf_setup import tf

from data_pipelines import augment
from data_pipelines import balancing as balancing_lib
from data_pipelines import config as config_lib
from data_pipelines import datasets
from data_pipelines import face_cache
from musica_jax import atomic_io
from musica_jax import face_frame
from musica_jax import host_memory
from musica_jax import schemes

AUTOTUNE = tf.data.AUTOTUNE
_SEED_MIX = 0x5DEECE66  # separates the sampling seed from the augmentation seed


def _local_batch(global_batch: int, process_count: int, flag: str) -> int:
  if process_count < 1 or global_batch % process_count:
    raise ValueError(f"--{flag}={global_batch} must be divisible by the number of "
                     f"processes ({process_count})")
  return global_batch // process_count


def _options(cfg) -> tf.data.Options:
  opts = tf.data.Options()
  opts.deterministic = True
  opts.experimental_optimization.map_parallelization = True
  return opts


def _parallel(cfg) -> int:
  return AUTOTUNE if cfg.num_parallel_calls in (-1, None) else cfg.num_parallel_calls




# ---------------------------------------------------------------------------------------
# Statistics and sizes.


def dataset_statistics(cfg: config_lib.DataConfig) -> dict:
  """Statistics of the TRAIN split, cached on disk next to the prepared data.

  Returns {"mean_shape": float32 [N, 2] mean landmarks in the 228-px crop frame (the
  cascade's initial shape), "std_shape": float32 [N, 2], "num_faces": int,
  "split": str, "crop_size": 228, "box_size": 142.0}.
  """
  path = datasets.stats_path(cfg, cfg.train_split)
  if os.path.exists(path):
    with np.load(path) as z:
      stats = {k: z[k] for k in z.files}
  else:
    stats = datasets.compute_statistics(datasets.load_split(cfg, cfg.train_split))
    atomic_io.write(path, lambda f: np.savez(f, **stats), binary=True)
  return {"mean_shape": stats["mean_shape"].astype(np.float32),
          "std_shape": stats["std_shape"].astype(np.float32),
          "num_faces": int(stats["num_faces"]), "split": cfg.train_split,
          "crop_size": face_frame.CROP_SIZE, "box_size": face_frame.BOX_SIZE}


def split_sizes(cfg: config_lib.DataConfig) -> dict:
  """Named split -> number of faces."""
  return {s: datasets.split_size(cfg, s) for s in datasets.available_splits(cfg)}


# ---------------------------------------------------------------------------------------
# Training.


def sample_index_fn(cfg: config_lib.DataConfig, num_faces: int, weights: np.ndarray | None):
  """tf function: global position p (int64 scalar) -> (face index, augmentation key [2])."""
  m = tf.constant(num_faces, tf.int64)
  seed = tf.constant(cfg.seed, tf.int64)
  cdf = None
  if weights is not None:
    c = np.cumsum(np.asarray(weights, np.float64))
    cdf = tf.constant((c / c[-1]).astype(np.float64))

  def fn(p):
    p = tf.cast(p, tf.int64)
    epoch, slot = p // m, p % m
    if cdf is None:
      idx = tf.random.experimental.index_shuffle(
          slot, seed=tf.stack([seed, epoch]), max_index=m - 1)
    else:
      u = tf.random.stateless_uniform([], seed=tf.stack([seed + _SEED_MIX, p]),
                                      dtype=tf.float64)
      idx = tf.minimum(tf.searchsorted(cdf, u[None], side="right", out_type=tf.int64)[0],
                       m - 1)
    key = tf.stack([seed, epoch])
    key = tf.random.experimental.stateless_fold_in(key, idx)
    key = tf.random.experimental.stateless_fold_in(key, slot)
    return idx, key

  return fn


def make_train_dataset(cfg: config_lib.DataConfig, start_step: int = 0,
                       process_index: int = 0, process_count: int = 1,
                       data: datasets.SplitData | None = None,
                       cache: face_cache.FaceCache | None | str = "auto") -> tf.data.Dataset:
  """The training stream (module docstring). `cache`: "auto" builds the face cache
  (face_cache.build, within cfg.train_cache_mb); None decodes each sample's photo; or a
  FaceCache of `data`."""
  config_lib.validate(cfg)
  local = _local_batch(cfg.batch_size, process_count, "batch_size")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  data = data if data is not None else datasets.load_split(cfg, cfg.train_split)
  bal = balancing_lib.compute(cfg, data.landmarks)
  index_fn = sample_index_fn(cfg, len(data), bal.weights)
  if isinstance(cache, str):
    cache = face_cache.build(cfg, data.images, data.landmarks, data.boxes,
                             cfg.train_cache_mb << 20)
    if cache is None and cfg.train_cache_mb > 0:
      logging.warning("no face cache (the regions of the %d training faces need more than "
                      "--train_cache_mb=%d, or a photo header is unreadable): each sample "
                      "decodes its photo, ~4x slower", len(data), cfg.train_cache_mb)
  landmarks = tf.constant(data.landmarks)
  boxes = tf.constant(data.boxes)
  perm = tf.constant(schemes.get_scheme(cfg.num_points).flip_permutation, tf.int32)
  global_b, host_off = cfg.batch_size, process_index * local

  def position(j):
    return (j // local) * global_b + host_off + j % local

  ds = tf.data.Dataset.range(start_step * local, np.iinfo(np.int64).max)
  if cache is None:
    images = tf.constant(data.images, tf.string)

    def load(j):
      idx, key = index_fn(position(j))
      image = augment.decode(tf.gather(images, idx))
      if cfg.augment:
        crop, points = augment.augment_example(cfg, key, image, tf.gather(landmarks, idx),
                                               tf.gather(boxes, idx), perm)
      else:
        crop, points, _ = augment.eval_example(image, tf.gather(landmarks, idx),
                                               tf.gather(boxes, idx))
      return {"image": augment.standardise(crop), "landmarks": points}

    ds = ds.map(load, num_parallel_calls=_parallel(cfg), deterministic=True)
    ds = ds.batch(local, drop_remainder=True)
  else:
    # Per sample only its parameters (small tensors); the pixels per batch, from the
    # decoded cache (face_cache.render_batch). Its ~80 MB batch buffers are served from
    # the heap instead of a fresh mmap each (page faults: 1,500 vs 2,400 samples/s).
    host_memory.keep_large_buffers()
    mosaic = face_cache.as_tensor(cache.mosaic)
    cells, regions = tf.constant(cache.cell), tf.constant(cache.region)

    def sample(j):
      idx, key = index_fn(position(j))
      p = augment.sample_params(cfg, key, tf.gather(landmarks, idx), tf.gather(boxes, idx),
                                perm)
      p["transform"] = face_cache.affine_transform(p.pop("matrix"))
      p["cell"], p["region"] = tf.gather(cells, idx), tf.gather(regions, idx)
      if cfg.augment and cfg.occlusion_prob > 0:
        shape = [face_frame.CROP_SIZE, face_frame.CROP_SIZE, 3]
        p["occlusion_noise"] = tf.cond(p["occlusion"],
                                       lambda: augment.occlusion_noise(key, shape),
                                       lambda: tf.zeros(shape))
      return p

    def render(batch):
      return {"image": face_cache.render_batch(cfg, mosaic, batch),
              "landmarks": batch["landmarks"]}

    ds = ds.map(sample, num_parallel_calls=_parallel(cfg), deterministic=True)
    ds = ds.batch(local, drop_remainder=True)
    ds = ds.map(render, num_parallel_calls=_parallel(cfg), deterministic=True)
  ds = ds.prefetch(cfg.prefetch)
  return ds.with_options(_options(cfg))


def train_iterator(cfg: config_lib.DataConfig, start_step: int = 0, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict]:
  """Endless numpy batches: "image" float32 [B_local, 228, 228, 3] (per-image
  standardised), "landmarks" float32 [B_local, N, 2] (crop pixels). Batch k is a pure
  function of (cfg, k): start_step=k resumes exactly."""
  ds = make_train_dataset(cfg, start_step, process_index, process_count)
  return ds.as_numpy_iterator()


# ---------------------------------------------------------------------------------------
# Evaluation.


def make_eval_dataset(cfg: config_lib.DataConfig, split: str, process_index: int = 0,
                      process_count: int = 1,
                      data: datasets.SplitData | None = None) -> tf.data.Dataset:
  config_lib.validate(cfg)
  local = _local_batch(cfg.eval_batch_size, process_count, "eval_batch_size")
  data = data if data is not None else datasets.load_split(cfg, split)
  m = len(data)
  steps = -(-m // cfg.eval_batch_size)
  # The crop comes from the (optionally jittered) box; "box" stays the dataset's box (the
  # NME box normaliser), mapped into that crop.
  scale_np, offset_np = face_frame.crop_frames(
      datasets.jitter_boxes(data.boxes, data.file_ids, cfg.box_jitter, cfg.seed))
  images = tf.constant(data.images, tf.string)
  landmarks = tf.constant(data.landmarks)
  boxes = tf.constant(data.boxes)
  scales = tf.constant(scale_np)
  offsets = tf.constant(offset_np)
  file_ids = tf.constant(data.file_ids.astype(str))
  global_b, host_off = cfg.eval_batch_size, process_index * local

  def load(j):
    p = (j // local) * global_b + host_off + j % local
    valid = p < m
    idx = tf.where(valid, p, 0)
    s, o = tf.gather(scales, idx), tf.gather(offsets, idx)
    matrix = tf.stack([[s, 0.0, o[0]], [0.0, s, o[1]], [0.0, 0.0, 1.0]])
    image = augment.decode(tf.gather(images, idx))
    crop = augment.warp(image, matrix)
    box = tf.gather(boxes, idx)
    return {
        "image": augment.standardise(crop),
        "landmarks": augment.transform_points(matrix, tf.gather(landmarks, idx)),
        "mask": valid,
        "box": tf.concat([box[:2] * s + o, box[2:] * s + o], 0),
        "file_id": tf.where(valid, tf.gather(file_ids, idx), ""),
        "crop_scale": s,
        "crop_offset": o,
    }

  ds = tf.data.Dataset.range(steps * local)
  ds = ds.map(load, num_parallel_calls=_parallel(cfg), deterministic=True)
  ds = ds.batch(local, drop_remainder=True)   # exact: steps * local rows
  ds = ds.prefetch(cfg.prefetch)
  return ds.with_options(_options(cfg))


def eval_iterator(cfg: config_lib.DataConfig, split: str, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict]:
  """One pass over `split`, no augmentation. Batches of eval_batch_size // process_count:
  "image", "landmarks" (crop pixels), "mask" bool [B] (False on padding), "box" float32
  [B, 4] (crop coords), "file_id" (bytes; b"" on padding), "crop_scale" [B],
  "crop_offset" [B, 2] (image_xy = (crop_xy - crop_offset) / crop_scale)."""
  return make_eval_dataset(cfg, split, process_index, process_count).as_numpy_iterator()
