"""A factored recurrent layer from a dense one (ModelConfig.recurrent_rank).

Each stage's recurrent FC has a dense kernel [P*D + H, H] (recurrent_rank 0) or two
factors u [P*D + H, r] @ v [r, H] (recurrent_rank r). `convert_params` turns the
parameters of a trained model into those of a model that differs only in its recurrent
rank, to fine-tune it (experiments.train --init_from):

- dense -> rank r: the rank-r truncated SVD of each stage's kernel K = U S V^T,
  u = U_r sqrt(S_r), v = sqrt(S_r) V_r^T (balanced factors: both get gradients of the
  same scale), computed in float64 and stored in float32. By Eckart-Young the best rank-r
  kernel in the Frobenius norm (not necessarily for the landmarks: fine-tune after);
- rank r -> dense: K = u @ v (exact);
- rank r -> rank r' != r: the SVD of u @ v. Columns beyond the rank of u @ v (r' > r) are
  zero in both factors and get no gradient: raising the rank of a factored model adds
  nothing;
- the same rank: the parameters as they are.
The patch set may grow (`patch_indices` of the target a superset of the source's, e.g.
MuSiCa34 -> MuSiCa68): the per-patch network is shared over patches, so only the
recurrent layer's input rows change; each source patch keeps its rows (now at its
position in the target's order) and every new patch gets zero rows, so the grown model
computes exactly the source's function until fine-tuning teaches it to use the new
patches. It may also shrink (a subset, e.g. MuSiCa68 -> the default's 34 patches): the
kept patches keep their rows and the dropped ones' are removed, which changes the function
(their descriptors no longer reach the hidden state): fine-tune after. The pyramid levels
may change for the same number of iterations (e.g. (2, 1, 0) -> (2, 0, 0)): no parameter
depends on the level, so each iteration keeps its weights and reads the new level
(fine-tune after). Every other parameter is copied. numpy only (no
jit); the SVD of the shipped model's 3 x [9216, 512] kernels takes about a second.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from musica_jax import model_io
from musica_jax.config import ModelConfig

# Fields that may differ between the source and the target of `convert_params`:
# the recurrent rank (what the conversion changes), the compute dtype and the execution
# layout (execution choices, not part of the trained model).
CONVERTIBLE_FIELDS = ("recurrent_rank", "compute_dtype", "execution")


def truncated_svd(kernel, rank: int):
  """kernel [..., in, out] (stacked stages allowed) -> (u [..., in, rank], v [..., rank,
  out], relative error [...]): u @ v is the best rank-`rank` approximation of each
  kernel, u = U_r sqrt(s_r), v = sqrt(s_r) V_r^T (float32); the relative error is
  ||K - u v||_F / ||K||_F (from the discarded singular values)."""
  k = np.asarray(kernel, np.float64)
  if not 1 <= rank <= min(k.shape[-2:]):
    raise ValueError(f"rank must be in 1..{min(k.shape[-2:])} for a {k.shape[-2:]} kernel, "
                     f"got {rank}")
  uu, s, vt = np.linalg.svd(k, full_matrices=False)
  root = np.sqrt(s[..., :rank])
  u = (uu[..., :, :rank] * root[..., None, :]).astype(np.float32)
  v = (root[..., :, None] * vt[..., :rank, :]).astype(np.float32)
  total = np.sum(s ** 2, axis=-1)
  rel = np.sqrt(np.sum(s[..., rank:] ** 2, axis=-1) / np.maximum(total, np.finfo(float).tiny))
  return u, v, rel


def dense_kernel(recurrent: dict) -> np.ndarray:
  """The kernel [..., in, out] of a recurrent layer's parameters, dense or factored."""
  if "kernel" in recurrent:
    return np.asarray(recurrent["kernel"], np.float32)
  u = np.asarray(recurrent["u"], np.float64)
  return np.matmul(u, np.asarray(recurrent["v"], np.float64)).astype(np.float32)


def grows_patches(source: ModelConfig, target: ModelConfig) -> bool:
  """Whether the target's patch set is a strict superset of the source's (each patch
  once)."""
  a, b = tuple(source.patch_indices), tuple(target.patch_indices)
  return a != b and len(set(b)) == len(b) and set(a) < set(b)


def shrinks_patches(source: ModelConfig, target: ModelConfig) -> bool:
  """Whether the target's patch set is a strict subset of the source's (each patch
  once)."""
  a, b = tuple(source.patch_indices), tuple(target.patch_indices)
  return a != b and len(set(b)) == len(b) and set(b) < set(a)


def changes_levels(source: ModelConfig, target: ModelConfig) -> bool:
  """Whether the target reads other pyramid levels with as many iterations."""
  a, b = tuple(source.levels), tuple(target.levels)
  return a != b and len(a) == len(b)


def check_compatible(source: ModelConfig, target: ModelConfig) -> None:
  """ValueError naming the first field (other than CONVERTIBLE_FIELDS, patch_indices
  when the target's patches include the source's or are some of them, and levels of the
  same length) in which the two configs differ."""
  for f in dataclasses.fields(ModelConfig):
    if f.name in CONVERTIBLE_FIELDS:
      continue
    if f.name == "patch_indices" and (grows_patches(source, target)
                                      or shrinks_patches(source, target)):
      continue
    if f.name == "levels" and changes_levels(source, target):
      continue
    if f.name == "stage_patches":      # the same parameters, whatever each stage reads
      continue
    name, a, b = f.name, getattr(source, f.name), getattr(target, f.name)
    if a != b:
      if name == "patch_indices" and len(a) != len(b):
        name, a, b = "num_patches", len(a), len(b)
      raise ValueError(f"the model config differs from the source model's in {name} "
                       f"(source {_short(a)}, new {_short(b)}); only recurrent_rank may "
                       f"differ, patch_indices may add patches to the source's or keep "
                       f"some of them, and "
                       f"levels may change for as many iterations")


def _short(value) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def convert_params(params: Any, source: ModelConfig, target: ModelConfig):
  """The stacked parameters of a `source` model -> (those of a `target` model (float32
  numpy), a dict saying what was done: "recurrent": "copied" | "factorised" | "densified"
  | "refactorised", and for an SVD "relative_error" per stage; "new_patches" /
  "dropped_patches": the landmark indices of the added / removed patches when the patch
  set grows / shrinks). The configs must agree in every field but recurrent_rank and a
  grown or shrunk patch set (`check_compatible`)."""
  check_compatible(source, target)
  out = dict(jax.tree.map(lambda x: np.asarray(x, np.float32), params))
  out, info = _convert(out, source.recurrent_rank, target.recurrent_rank)
  if grows_patches(source, target) or shrinks_patches(source, target):
    out = _relay_patches(out, source, target)
    new = [int(i) for i in target.patch_indices if i not in set(source.patch_indices)]
    dropped = [int(i) for i in source.patch_indices if i not in set(target.patch_indices)]
    info.update({"new_patches": new} if new else {"dropped_patches": dropped})
  if changes_levels(source, target):
    info["levels"] = {"source": list(source.levels), "new": list(target.levels)}
  model_io.check_params(out, target, "source model")
  return out, info


def _relay_patches(out: dict, source: ModelConfig, target: ModelConfig) -> dict:
  """The recurrent layer's input rows [S, P*D + H, ...] (the dense kernel or the factor u)
  re-laid for the target's patches: patch p's D rows at its target position, zeros for the
  new patches, none for the dropped ones, the hidden state's H rows last (stage_net: rec_in
  = concat(descriptors in patch order, hidden))."""
  d = source.descriptor_size
  rec = dict(out["recurrent"])
  name = "kernel" if "kernel" in rec else "u"
  w = rec[name]
  s, _, cols = w.shape
  where = {lm: k for k, lm in enumerate(source.patch_indices)}
  grown = np.zeros((s, target.num_patches * d + target.hidden_size, cols), w.dtype)
  for j, lm in enumerate(target.patch_indices):
    if lm in where:
      grown[:, j * d:(j + 1) * d] = w[:, where[lm] * d:(where[lm] + 1) * d]
  grown[:, target.num_patches * d:] = w[:, source.num_patches * d:]
  rec[name] = grown
  out["recurrent"] = rec
  return out


def _convert(out: dict, rs: int, rt: int):
  if rs == rt:
    return out, {"recurrent": "copied", "source_recurrent_rank": rs, "recurrent_rank": rt}
  rec = out["recurrent"]
  kernel = dense_kernel(rec)
  info = {"source_recurrent_rank": rs, "recurrent_rank": rt}
  if rt == 0:
    out["recurrent"] = {"bias": rec["bias"], "kernel": kernel}
    return out, {"recurrent": "densified", **info}
  u, v, rel = truncated_svd(kernel, rt)
  out["recurrent"] = {"bias": rec["bias"], "u": u, "v": v}
  return out, {"recurrent": "factorised" if rs == 0 else "refactorised", **info,
               "relative_error": [round(float(e), 6) for e in np.ravel(rel)]}
