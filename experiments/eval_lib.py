"""Batched evaluation of a cascade over a whole split (every face counted, padding masked)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from data_pipelines import input_pipeline
from musica_jax import metrics
from musica_jax import parallel
from musica_jax import training
from musica_jax.config import ModelConfig
from musica_jax.schemes import LandmarkScheme



@functools.lru_cache(maxsize=8)
def _eval_fn(model_cfg: ModelConfig, scheme: LandmarkScheme, capacities=None):
  return jax.jit(functools.partial(training.eval_outputs, model_cfg=model_cfg, scheme=scheme,
                                   capacities=capacities))


# Per-face outputs whose faces are on axis 1 ([S, F, ...], per iteration); the rest [F, ...].
PER_ITERATION = ("nme_interpupil_per_iteration", "nme_interocular_per_iteration",
                 "nme_box_per_iteration", "estimated_error", "true_error", "attention",
                 "shapes")


def run_split(params, data_cfg, split: str, model_cfg: ModelConfig, scheme: LandmarkScheme,
              init_shape, mesh, ts=-np.inf, t_fail=np.inf, keep_landmarks: bool = False,
              quit_params=None, capacities=None) -> dict:
  """Per-face numpy outputs over `split` (padding removed), in dataset order.

  quit_params: the model's quit head (None: quit on the estimated error); capacities:
  the budget path's per-stage capacities for each batch of eval_batch_size faces."""
  parallel.check_batch_size(data_cfg.eval_batch_size, "--eval_batch_size")
  fn = _eval_fn(model_cfg, scheme, None if capacities is None else tuple(capacities))
  init_shape = jnp.asarray(init_shape)
  chunks, masks, ids, frames = [], [], [], []
  for local in input_pipeline.eval_iterator(data_cfg, split, jax.process_index(),
                                            jax.process_count()):
    batch = parallel.shard_batch(local, mesh)
    out = fn(params, batch, init_shape, ts=jnp.float32(ts), t_fail=jnp.float32(t_fail),
             quit_params=quit_params)
    if not keep_landmarks:
      out = {k: v for k, v in out.items() if k not in ("landmarks", "shapes")}
    if jax.process_count() > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
    chunks.append(jax.device_get(out))
    masks.append(local["mask"])
    ids.append(local["file_id"])
    frames.append((local["crop_scale"], local["crop_offset"]))
  if not chunks:
    raise ValueError(f"split {split!r} of {data_cfg.dataset} gave no faces")
  if jax.process_count() > 1:
    masks = [multihost_utils.process_allgather(m, tiled=True) for m in masks]
  mask = np.concatenate(masks).astype(bool)
  result = {}
  for key in chunks[0]:
    axis = 1 if key in PER_ITERATION else 0
    arr = np.concatenate([np.asarray(c[key]) for c in chunks], axis=axis)
    result[key] = np.compress(mask, arr, axis=axis)
  if jax.process_count() == 1:
    result["file_id"] = np.concatenate(ids)[mask]
    result["crop_scale"] = np.concatenate([f[0] for f in frames])[mask]
    result["crop_offset"] = np.concatenate([f[1] for f in frames])[mask]
  return result


def escalate(per_face: dict, again: dict, t: float) -> tuple[dict, np.ndarray]:
  """`run_split`'s per-face outputs of a cheaper schedule with the faces whose final
  estimated error is >= t (or not finite) taken from `again` (the model's own full cascade
  on the same faces; `Predictor.predict`'s escalation), their iterations those of both.
  -> (merged outputs, [F] bool: escalated)."""
  if "file_id" in per_face and list(per_face["file_id"]) != list(again["file_id"]):
    raise RuntimeError("escalation: the two cascades ran on different faces")
  up = ~(per_face["estimated_error"][-1] < t)
  out = {}
  for key, v in per_face.items():
    if key in ("file_id", "crop_scale", "crop_offset"):
      out[key] = v
      continue
    axis = 1 if key in PER_ITERATION else 0
    m = up.reshape((1,) * axis + (-1,) + (1,) * (np.ndim(v) - axis - 1))
    out[key] = np.where(m, again[key], v)
  out["iterations"] = per_face["iterations"] + np.where(up, again["iterations"], 0)
  return out, up


def summarise(per_face: dict, fr_thresholds=(0.08, 0.10), with_early_exit: bool = False) -> dict:
  """The evaluation JSON fields for one split (NMEs in percent)."""
  last = lambda k: per_face[k][-1]
  out = {"faces": int(per_face["iterations"].shape[0])}
  out["nme_interpupil"] = float(last("nme_interpupil_per_iteration").mean() * 100)
  out["nme_interocular"] = float(last("nme_interocular_per_iteration").mean() * 100)
  out["nme_box"] = float(last("nme_box_per_iteration").mean() * 100)
  io = last("nme_interocular_per_iteration")
  # Non-finite predictions are failures (metrics.failure_rate), never silently skipped.
  out["nonfinite_faces"] = metrics.nonfinite_count(io)
  out.update(metrics.fr_auc(io, fr_thresholds))
  out["nme_per_iteration"] = [float(x.mean() * 100)
                              for x in per_face["nme_interocular_per_iteration"]]
  out["nme_interpupil_per_iteration"] = [float(x.mean() * 100)
                                         for x in per_face["nme_interpupil_per_iteration"]]
  out["mean_estimated_error"] = float(last("estimated_error").mean())
  out["mean_shape_baseline"] = {
      "nme_interocular": float(per_face["nme_interocular_init"].mean() * 100),
      "nme_interpupil": float(per_face["nme_interpupil_init"].mean() * 100)}
  if with_early_exit:
    out["mean_iterations"] = float(per_face["iterations"].mean())
    out["nme_early_exit"] = float(per_face["nme_interocular_early_exit"].mean() * 100)
    out["nme_early_exit_interpupil"] = float(per_face["nme_interpupil_early_exit"].mean() * 100)
    out["invalid_fraction"] = float(1.0 - per_face["valid"].mean())
  return out


def on_devices(loaded) -> tuple:
  """(parameters of a loaded model (`common.load_model`) replicated over all devices,
  the mesh) for `run_split`."""
  mesh = parallel.make_mesh()
  return parallel.replicate(loaded.params, mesh), mesh
