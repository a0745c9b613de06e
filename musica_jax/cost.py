"""Model cost: multiply-adds and parameter counts, analytically from the config.

Counted: the two convolutions (im2col products), local patch attention, the recurrent
FC and the head, per iteration. Not counted: pyramid, patch sampling, pooling and
activations (element-wise; under 1% here). `tests/test_cost.py` cross-checks the count
against XLA's cost analysis of the jitted forward pass.
"""
from __future__ import annotations

from musica_jax.config import ModelConfig


def stage_macs(config: ModelConfig) -> dict:
  p, c, k = config.patch_size, config.conv_features, 9
  conv1_out = p - 2
  conv2_out = conv1_out // 2 - 2
  d = config.descriptor_size
  per_patch = {
      "conv1": conv1_out ** 2 * k * 3 * c,
      "conv2": conv2_out ** 2 * k * c * c,
      "attention": d * d if config.use_attention else 0,
  }
  out = {name: v * config.num_patches for name, v in per_patch.items()}
  out["recurrent"] = (config.num_patches * d + config.hidden_size) * config.hidden_size
  out["head"] = config.hidden_size * (2 * config.num_landmarks + 1)
  return out


def cascade_macs(config: ModelConfig, iterations: float | None = None) -> float:
  """Multiply-adds of `iterations` iterations (all stages by default)."""
  n = config.num_stages if iterations is None else iterations
  return float(sum(stage_macs(config).values())) * n


def parameter_count(config: ModelConfig) -> int:
  c, d, h = config.conv_features, config.descriptor_size, config.hidden_size
  per_stage = (27 * c + c) + (9 * c * c + c) + (h * (2 * config.num_landmarks + 1)
                                                  + 2 * config.num_landmarks + 1)
  per_stage += (config.num_patches * d + h) * h + h
  if config.use_attention:
    per_stage += d * d + d
  return per_stage * config.num_stages
