"""One cascade iteration's network (paper Fig. 4, reference notes "One iteration").

patches [B, P, 14, 14, 3] + hidden [B, 512]
  -> per patch: conv3x3/32 (VALID, ReLU) -> maxpool 2 -> conv3x3/32 (VALID, ReLU) -> maxpool 2
  -> descriptor 256 = centre 2x2 crop of conv2 ++ pool2 (channels)
  -> local patch attention: sigmoid(FC 256->256) * descriptor (weights shared over patches)
  -> recurrent: tanh(FC(concat(all P descriptors, hidden) -> 512))
  -> head: linear FC 512 -> 2N displacements (ALL landmarks) + 1 estimated error.

The 3x3 convolutions on 14x14x3 and 6x6x32 inputs are far too small for XLA's
convolution kernels on CPU (about 7 GFLOP/s here, against ~97 for a matrix product), so
they are written as one matrix product over extracted 3x3 neighbourhoods (im2col) across
all patches of all faces. The kernels keep the usual [3, 3, in, out] layout.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from musica_jax.config import ModelConfig


def im2col3x3(x: jax.Array) -> jax.Array:
  """[..., H, W, C] -> [..., H-2, W-2, 9C]: VALID 3x3 neighbourhoods, (dy, dx, c) order."""
  h, w = x.shape[-3], x.shape[-2]
  cols = [x[..., dy:h - 2 + dy, dx:w - 2 + dx, :] for dy in range(3) for dx in range(3)]
  return jnp.concatenate(cols, axis=-1)


def max_pool2x2(x: jax.Array) -> jax.Array:
  """[..., H, W, C] -> [..., H//2, W//2, C], stride 2 (odd edges dropped, as VALID)."""
  *lead, h, w, c = x.shape
  x = x[..., :h // 2 * 2, :w // 2 * 2, :]
  x = x.reshape(*lead, h // 2, 2, w // 2, 2, c)
  return x.max(axis=(-4, -2))


class Conv3x3(nn.Module):
  """3x3 VALID convolution + bias as a matrix product over im2col columns."""
  features: int
  init_std: float

  @nn.compact
  def __call__(self, x):
    cin = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.truncated_normal(self.init_std),
                        (3, 3, cin, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return im2col3x3(x) @ kernel.reshape(9 * cin, self.features) + bias


class StageNet(nn.Module):
  """The network of one iteration. Returns (hidden, displacement, error, attention)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, patches: jax.Array, hidden: jax.Array):
    cfg = self.config
    dense = lambda n, name: nn.Dense(
        n, name=name, kernel_init=nn.initializers.truncated_normal(cfg.init_std))
    b, p = patches.shape[:2]
    x = nn.relu(Conv3x3(cfg.conv_features, cfg.init_std, name="conv1")(patches))
    x = max_pool2x2(x)
    c2 = nn.relu(Conv3x3(cfg.conv_features, cfg.init_std, name="conv2")(x))
    pooled = max_pool2x2(c2)
    h2, w2 = c2.shape[-3:-1]
    # Centre 2x2 of conv2 (rows/cols 1:3 of 4x4 at the default patch size).
    cy, cx = (h2 - 2) // 2, (w2 - 2) // 2
    centre = c2[..., cy:cy + 2, cx:cx + 2, :]
    desc = jnp.concatenate([centre, pooled[..., :2, :2, :]], axis=-1).reshape(b, p, -1)
    if cfg.use_attention:
      attention = nn.sigmoid(dense(desc.shape[-1], "attention")(desc))
      desc = desc * attention
      attention_mean = attention.mean(-1)
    else:
      attention_mean = jnp.ones((b, p), desc.dtype)
    rec_in = jnp.concatenate([desc.reshape(b, -1), hidden], axis=-1)
    hidden = jnp.tanh(dense(cfg.hidden_size, "recurrent")(rec_in))
    out = dense(2 * cfg.num_landmarks + 1, "head")(hidden)
    displacement = out[:, :-1].reshape(b, cfg.num_landmarks, 2)
    return hidden, displacement, out[:, -1], attention_mean


def init_stacked(key: jax.Array, config: ModelConfig) -> Any:
  """Parameters of every iteration, stacked on a leading stage axis [S, ...].

  Every stage is initialised (with its own key) even if early exit would skip it.
  """
  net = StageNet(config)
  p = config.patch_size
  patches = jnp.zeros((1, config.num_patches, p, p, 3), jnp.float32)
  hidden = jnp.zeros((1, config.hidden_size), jnp.float32)
  keys = jax.random.split(key, config.num_stages)
  return jax.vmap(lambda k: net.init(k, patches, hidden)["params"])(keys)


def apply_stage(config: ModelConfig, params, patches, hidden):
  return StageNet(config).apply({"params": params}, patches, hidden)
