"""One cascade iteration's network (paper Fig. 4, reference notes "One iteration").

patches [B, P, 14, 14, 3] + hidden [B, 512]
  -> per patch: conv3x3/32 (VALID, ReLU) -> maxpool 2 -> conv3x3/32 (VALID, ReLU) -> maxpool 2
  -> descriptor 256 = centre 2x2 crop of conv2 ++ pool2 (channels)
  -> local patch attention: sigmoid(FC 256->256) * descriptor (weights shared over patches)
  -> recurrent: tanh(FC(concat(all P descriptors, hidden) -> 512))
  -> head: linear FC 512 -> 2N displacements (ALL landmarks) + 1 estimated error.

Performance notes (2-core CPU, XLA; measured, see experiments/benchmark.py):
- The 3x3 convolutions on 14x14x3 and 6x6x32 inputs are far too small for XLA's
  convolution kernels on CPU, so they are one matrix product over extracted 3x3
  neighbourhoods (im2col) across many patches. The kernels keep the [3, 3, in, out] layout.
- The per-patch part runs in a "channel-major, patch-minor" layout [C, H, W, m] (m patches
  last). Then im2col, pooling, cropping and the bilinear blend only slice *major* axes
  (contiguous runs of m floats, vectorised), whereas the [m, H, W, C] layout has 3 or 32
  floats in the minor axis and XLA's CPU loops on it about 5-10x slower. The products are
  kernel^T [out, 9 in] @ cols [9 in, H'W'm].
- Callers run `patch_features` on chunks of ~100-200 patches (see cascade.py): every
  intermediate then stays in cache and under glibc's 32 MB mmap threshold. XLA buffers of
  32 MB or more are fresh mmaps whose page faults cost about 0.5 ms/MB on this VM, more
  than the arithmetic.
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


@jax.custom_vjp
def bf16_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b (2-D) with bf16 operands and float32 accumulation, in the forward product AND
  the two backward ones (left to autodiff, the backward products of a mixed dot run in
  float32 and training gains nothing). a, b: any float dtype (float32 parameters get
  float32 gradients, accumulated in float32); the result is float32."""
  return jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                 preferred_element_type=jnp.float32)


def _bf16_matmul_fwd(a, b):
  a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  return (jnp.dot(a16, b16, preferred_element_type=jnp.float32),
          (a16, b16, jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype)))


def _bf16_matmul_bwd(res, g):
  a16, b16, a_like, b_like = res
  g16 = g.astype(jnp.bfloat16)
  da = jnp.dot(g16, b16.T, preferred_element_type=jnp.float32).astype(a_like.dtype)
  db = jnp.dot(a16.T, g16, preferred_element_type=jnp.float32).astype(b_like.dtype)
  return da, db


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def _matmul(a, b):
  """a @ b with float32 accumulation: bf16 products (`bf16_matmul`) when an operand is
  bf16, else the plain float32 product."""
  if jnp.bfloat16 in (a.dtype, b.dtype):
    return bf16_matmul(a, b)
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


# --- channel-major, patch-minor layout [C, H, W, m] -------------------------------------

def conv3x3_cm(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """VALID 3x3 conv + bias: [Cin, H, W, m] -> [Cout, H-2, W-2, m] (float32).

  cols[(dy, dx, c), (y, x, m)] = x[c, y+dy, x+dx, m]: the same (dy, dx, c) order as
  kernel.reshape(9 Cin, Cout), so no transpose is needed anywhere. The product runs in
  x's dtype (bfloat16 compute: bf16 operands) and accumulates in float32.
  """
  cin, h, w, m = x.shape
  cout = kernel.shape[-1]
  cols = jnp.stack([x[:, dy:h - 2 + dy, dx:w - 2 + dx] for dy in range(3) for dx in range(3)])
  cols = cols.reshape(9 * cin, (h - 2) * (w - 2) * m)
  out = _matmul(kernel.reshape(9 * cin, cout).T, cols)
  return out.reshape(cout, h - 2, w - 2, m) + bias.astype(jnp.float32)[:, None, None, None]


def max_pool2x2_cm(x: jax.Array) -> jax.Array:
  """[C, H, W, m] -> [C, H//2, W//2, m], stride 2 (odd edges dropped)."""
  c, h, w, m = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2].reshape(c, h // 2, 2, w // 2, 2, m)
  return x.max(axis=(2, 4))


def patch_features(params, patches_cm: jax.Array, use_attention: bool,
                   compute_dtype: str = "float32"):
  """Per-patch part of one iteration on patches [C, ps, ps, m] (channel-major).

  Returns (attended descriptors [m, D] in the (y, x, channel) order of StageNet,
  mean attention [m]). `params` is one stage's parameter dict. compute_dtype
  "bfloat16": the products take bf16 operands and accumulate in float32; activations are
  stored in bf16 between layers (the descriptors too), biases and the sigmoid in float32.
  """
  dt = jnp.dtype(compute_dtype)
  x = jax.nn.relu(conv3x3_cm(patches_cm.astype(dt), params["conv1"]["kernel"],
                             params["conv1"]["bias"])).astype(dt)
  x = max_pool2x2_cm(x)
  c2 = jax.nn.relu(conv3x3_cm(x, params["conv2"]["kernel"], params["conv2"]["bias"])).astype(dt)
  pooled = max_pool2x2_cm(c2)
  h2, w2 = c2.shape[1:3]
  cy, cx = (h2 - 2) // 2, (w2 - 2) // 2
  desc = jnp.concatenate([c2[:, cy:cy + 2, cx:cx + 2], pooled[:, :2, :2]], axis=0)  # [2C,2,2,m]
  desc = desc.transpose(1, 2, 0, 3).reshape(-1, desc.shape[-1])     # [D, m], (y, x, ch)
  if use_attention:
    att = params["attention"]
    a = jax.nn.sigmoid(_matmul(att["kernel"].T, desc)
                       + att["bias"].astype(jnp.float32)[:, None])
    desc = (desc * a).astype(dt)
    attention_mean = a.mean(0)
  else:
    attention_mean = jnp.ones(desc.shape[-1], jnp.float32)
  return desc.T, attention_mean


def recurrent_head(config: ModelConfig, params, desc: jax.Array, hidden: jax.Array):
  """desc [B, P*D] + hidden [B, H] -> (hidden, displacement [B, N, 2], error [B])."""
  b = desc.shape[0]
  rec = params["recurrent"]
  dt = jnp.dtype(config.compute_dtype)
  rec_in = jnp.concatenate([desc.astype(dt), hidden.astype(dt)], axis=-1)
  hidden = jnp.tanh(_dense(rec_in, rec["kernel"], rec["bias"], dt))
  out = _dense(hidden, params["head"]["kernel"], params["head"]["bias"], dt)
  return hidden, out[:, :-1].reshape(b, config.num_landmarks, 2), out[:, -1]


def _dense(x, kernel, bias, compute_dtype=jnp.float32):
  """x @ kernel + bias with f32 accumulation. The operands are bf16 when the compute
  dtype is bf16 or the kernel is stored in bf16 (exported models); the result is f32."""
  if jnp.dtype(compute_dtype) == jnp.bfloat16:
    return bf16_matmul(x, kernel) + bias.astype(jnp.float32)
  if kernel.dtype != x.dtype:
    x = x.astype(kernel.dtype)
  return jnp.dot(x, kernel, preferred_element_type=jnp.float32) + bias.astype(jnp.float32)


def to_channel_major(patches: jax.Array) -> jax.Array:
  """[B, P, ps, ps, C] -> [C, ps, ps, B*P] (patch index b*P + p)."""
  b, p, h, w, c = patches.shape
  return patches.reshape(b * p, h, w, c).transpose(3, 1, 2, 0)


# --- the Flax module: declares the parameter tree ---------------------------------------

class _ConvParams(nn.Module):
  """Declares a 3x3 conv's kernel [3, 3, in, out] and bias (same names as before)."""
  features: int
  init_std: float

  @nn.compact
  def __call__(self, cin: int):
    kernel = self.param("kernel", nn.initializers.truncated_normal(self.init_std),
                        (3, 3, cin, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return kernel, bias


class _DenseParams(nn.Module):
  """Declares kernel [in, out] then bias [out], exactly as nn.Dense does (same init)."""
  features: int
  init_std: float

  @nn.compact
  def __call__(self, cin: int):
    kernel = self.param("kernel", nn.initializers.truncated_normal(self.init_std),
                        (cin, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return kernel, bias


class StageNet(nn.Module):
  """The network of one iteration. Returns (hidden, displacement, error, attention)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, patches: jax.Array, hidden: jax.Array):
    cfg = self.config
    b, p = patches.shape[:2]
    c = patches.shape[-1]
    d = cfg.descriptor_size
    params = {}
    params["conv1"] = dict(zip(("kernel", "bias"), _ConvParams(
        cfg.conv_features, cfg.init_std, name="conv1")(c)))
    params["conv2"] = dict(zip(("kernel", "bias"), _ConvParams(
        cfg.conv_features, cfg.init_std, name="conv2")(cfg.conv_features)))
    if cfg.use_attention:
      params["attention"] = dict(zip(("kernel", "bias"), _DenseParams(
          d, cfg.init_std, name="attention")(d)))
    params["recurrent"] = dict(zip(("kernel", "bias"), _DenseParams(
        cfg.hidden_size, cfg.init_std, name="recurrent")(p * d + hidden.shape[-1])))
    params["head"] = dict(zip(("kernel", "bias"), _DenseParams(
        2 * cfg.num_landmarks + 1, cfg.init_std, name="head")(cfg.hidden_size)))
    desc, attention_mean = patch_features(params, to_channel_major(patches), cfg.use_attention,
                                          cfg.compute_dtype)
    hidden, displacement, error = recurrent_head(cfg, params, desc.reshape(b, p * d), hidden)
    return hidden, displacement, error, attention_mean.reshape(b, p)


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
