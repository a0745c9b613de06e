"""The layers of the per-patch network and its dense products, in the channel-major,
patch-minor layout [C, H, W, m] the cascade runs (`stage_net`'s module docstring says why):
im2col 3x3 convolutions and 2x2 max pooling, 1x1 and depthwise convolutions (the Table 4
inverted bottleneck), and the products with bfloat16 operands and float32 accumulation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


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


def matmul(a, b):
  """a @ b with float32 accumulation: bf16 products (`bf16_matmul`) when an operand is
  bf16, else the plain float32 product."""
  if jnp.bfloat16 in (a.dtype, b.dtype):
    return bf16_matmul(a, b)
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


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
  out = matmul(kernel.reshape(9 * cin, cout).T, cols)
  return out.reshape(cout, h - 2, w - 2, m) + bias.astype(jnp.float32)[:, None, None, None]


def max_pool2x2_cm(x: jax.Array) -> jax.Array:
  """[C, H, W, m] -> [C, H//2, W//2, m], stride 2 (odd edges dropped)."""
  c, h, w, m = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2].reshape(c, h // 2, 2, w // 2, 2, m)
  return x.max(axis=(2, 4))


def product(x, kernel, compute_dtype=jnp.float32):
  """x @ kernel with f32 accumulation. The operands are bf16 when the compute dtype is
  bf16 or the kernel is stored in bf16 (exported models); the result is f32."""
  if jnp.dtype(compute_dtype) == jnp.bfloat16:
    return bf16_matmul(x, kernel)
  if kernel.dtype != x.dtype:
    x = x.astype(kernel.dtype)
  return jnp.dot(x, kernel, preferred_element_type=jnp.float32)


def dense(x, kernel, bias, compute_dtype=jnp.float32):
  """x @ kernel + bias (`product`, then the bias in f32)."""
  return product(x, kernel, compute_dtype) + bias.astype(jnp.float32)


def conv1x1_cm(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """1x1 conv + bias: [Cin, H, W, m] -> [Cout, H, W, m] (kernel [Cin, Cout])."""
  cin, h, w, m = x.shape
  out = jnp.dot(kernel.T, x.reshape(cin, h * w * m))
  return out.reshape(kernel.shape[1], h, w, m) + bias[:, None, None, None]


def depthwise3x3_cm(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """VALID depthwise 3x3 conv + bias: [C, H, W, m] -> [C, H-2, W-2, m] (kernel [3, 3, C])."""
  _, h, w, _ = x.shape
  out = sum(x[:, dy:h - 2 + dy, dx:w - 2 + dx] * kernel[dy, dx][:, None, None, None]
            for dy in range(3) for dx in range(3))
  return out + bias[:, None, None, None]


def to_channel_major(patches: jax.Array) -> jax.Array:
  """[B, P, ps, ps, C] -> [C, ps, ps, B*P] (patch index b*P + p)."""
  b, p, h, w, c = patches.shape
  return patches.reshape(b * p, h, w, c).transpose(3, 1, 2, 0)
