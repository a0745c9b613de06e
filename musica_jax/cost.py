"""Model cost: multiply-adds, parameter counts and weight memory, analytically from the config.

Counted: the two convolutions (im2col products), local patch attention, the recurrent
FC (dense, or its two factors with `recurrent_rank`) and the head, per iteration. Not
counted: pyramid, patch sampling, pooling and activations (element-wise; under 1% here).
`tests/test_cost.py` cross-checks the count against XLA's cost analysis of the jitted
forward pass.
"""
from __future__ import annotations

import numpy as np

from musica_jax.config import ModelConfig


def stage_macs(config: ModelConfig, stage: int | None = None) -> dict:
  """Multiply-adds per face of one iteration by part: iteration `stage` (it reads
  `config.patches_per_stage[stage]` patches), or None: an iteration reading all P."""
  p, c, k = config.patch_size, config.conv_features, 9
  conv1_out = p - 2
  conv2_out = conv1_out // 2 - 2
  d = config.descriptor_size
  if config.extractor == "inverted_bottleneck":
    per_patch = {
        "ib1": _inverted_bottleneck_macs(p, 3, c, config.ib_expansion),
        "ib2": _inverted_bottleneck_macs(conv1_out // 2, c, c, config.ib_expansion),
    }
  else:
    per_patch = {
        "conv1": conv1_out ** 2 * k * 3 * c,
        "conv2": conv2_out ** 2 * k * c * c,
    }
  per_patch["attention"] = d * d if config.use_attention else 0
  read = config.num_patches if stage is None else config.patches_per_stage[stage]
  out = {name: v * read for name, v in per_patch.items()}
  out["global_attention"] = _global_attention_macs(config)
  # One multiply-add per kernel weight; a stage reading k < P patches multiplies only
  # their rows (`fast_inference.unstack_params`, the deployed path).
  out["recurrent"] = recurrent_weights(config, read)
  out["head"] = config.hidden_size * (2 * config.num_landmarks + 1)
  return out


def recurrent_weights(config: ModelConfig, patches: int | None = None) -> int:
  """Kernel weights of one stage's recurrent FC, which are also its multiply-adds per face:
  dense (P*D + H) H; factored (recurrent_rank r: (x @ u) @ v) r (P*D + H) + r H. With
  `patches`, the rows of that many patches (a stage reading fewer than P)."""
  h, r = config.hidden_size, config.recurrent_rank
  n_in = (config.recurrent_input_size if patches is None
          else patches * config.descriptor_size + h)
  return r * (n_in + h) if r else n_in * h


def _inverted_bottleneck_macs(side: int, cin: int, cout: int, expansion: int) -> int:
  """1x1 expand on side^2, depthwise 3x3 VALID and 1x1 project on (side-2)^2 positions."""
  hidden = cin * expansion
  return side ** 2 * cin * hidden + (side - 2) ** 2 * (9 * hidden + hidden * cout)


def _global_attention_macs(config: ModelConfig) -> int:
  """FC: all descriptors -> P weights. GCN: per patch D -> G and G -> 1 products plus two
  propagations over the P x P adjacency (dense products, as `knn_adjacency` computes them;
  the graph itself, distances and top-k, is not counted)."""
  p, d = config.num_patches, config.descriptor_size
  if config.global_attention == "fc":
    return p * d * p
  if config.global_attention == "gcn":
    return p * d * config.gcn_hidden + p * p * config.gcn_hidden + p * config.gcn_hidden + p * p
  return 0


def iteration_macs(config: ModelConfig) -> list[float]:
  """Multiply-adds per face of each iteration (they differ with `stage_patches`)."""
  return [float(sum(stage_macs(config, i).values())) for i in range(config.num_stages)]


def cascade_macs(config: ModelConfig, iterations: float | None = None) -> float:
  """Multiply-adds per face of the first `iterations` iterations (all by default). A
  fractional count (a mean over faces) interpolates between the whole ones: exact when
  every face runs the whole count just below or above it; `mean_macs` is exact."""
  n = config.num_stages if iterations is None else float(iterations)
  cum = np.concatenate([[0.0], np.cumsum(iteration_macs(config))])
  return float(np.interp(n, np.arange(len(cum)), cum))


def mean_macs(config: ModelConfig, iterations) -> float:
  """Mean multiply-adds per face of faces that ran `iterations` [F] iterations each."""
  cum = np.concatenate([[0.0], np.cumsum(iteration_macs(config))])
  return float(cum[np.asarray(iterations, np.int64).reshape(-1)].mean())


def parameter_count(config: ModelConfig) -> int:
  c, d, h = config.conv_features, config.descriptor_size, config.hidden_size
  per_stage = (27 * c + c) + (9 * c * c + c) + (h * (2 * config.num_landmarks + 1)
                                                  + 2 * config.num_landmarks + 1)
  per_stage += recurrent_weights(config) + h
  if config.extractor == "inverted_bottleneck":   # replace the two convs' parameters
    per_stage -= (27 * c + c) + (9 * c * c + c)
    for cin in (3, c):
      hidden = cin * config.ib_expansion
      per_stage += (cin * hidden + hidden) + (9 * hidden + hidden) + (hidden * c + c)
  if config.use_attention:
    per_stage += d * d + d
  p = config.num_patches
  if config.global_attention == "fc":
    per_stage += p * d * p + p
  elif config.global_attention == "gcn":
    per_stage += d * config.gcn_hidden + config.gcn_hidden + config.gcn_hidden + 1
  return per_stage * config.num_stages


BYTES_PER_WEIGHT = {"float32": 4, "bfloat16": 2}


def weight_megabytes(config: ModelConfig, dtype: str = "float32") -> float:
  """Memory of the weights in MB (1e6 bytes) stored as `dtype` (the exported model's
  params.npz is this plus a few kB of archive headers)."""
  if dtype not in BYTES_PER_WEIGHT:
    raise ValueError(f"dtype must be one of {sorted(BYTES_PER_WEIGHT)}, got {dtype!r}")
  return parameter_count(config) * BYTES_PER_WEIGHT[dtype] / 1e6
