"""One cascade iteration's network (paper Fig. 4, reference notes "One iteration").

patches [B, P, 14, 14, 3] + hidden [B, 512]
  -> per patch: conv3x3/32 (VALID, ReLU) -> maxpool 2 -> conv3x3/32 (VALID, ReLU) -> maxpool 2
  -> descriptor 256 = centre 2x2 crop of conv2 ++ pool2 (channels)
  -> local patch attention: sigmoid(FC 256->256) * descriptor (weights shared over patches)
  -> recurrent: tanh(FC(concat(all P descriptors, hidden) -> 512)) (recurrent_rank r > 0:
     the FC's kernel is u [P*D + H, r] @ v [r, 512], computed as (x @ u) @ v)
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

from musica_jax import layers
from musica_jax.config import ModelConfig


def patch_features(params, patches_cm: jax.Array, use_attention: bool,
                   compute_dtype: str = "float32"):
  """Per-patch part of one iteration on patches [C, ps, ps, m] (channel-major).

  Returns (attended descriptors [m, D] in the (y, x, channel) order of StageNet,
  mean attention [m]). `params` is one stage's parameter dict. compute_dtype
  "bfloat16": the products take bf16 operands and accumulate in float32; activations are
  stored in bf16 between layers (the descriptors too), biases and the sigmoid in float32.
  """
  dt = jnp.dtype(compute_dtype)
  if "ib1_expand" in params:           # extractor="inverted_bottleneck" (float32 products)
    c2 = inverted_bottleneck_maps(params, patches_cm).astype(dt)
  else:
    x = jax.nn.relu(layers.conv3x3_cm(patches_cm.astype(dt), params["conv1"]["kernel"],
                               params["conv1"]["bias"])).astype(dt)
    x = layers.max_pool2x2_cm(x)
    c2 = jax.nn.relu(layers.conv3x3_cm(x, params["conv2"]["kernel"],
                                params["conv2"]["bias"])).astype(dt)
  pooled = layers.max_pool2x2_cm(c2)
  h2, w2 = c2.shape[1:3]
  cy, cx = (h2 - 2) // 2, (w2 - 2) // 2
  desc = jnp.concatenate([c2[:, cy:cy + 2, cx:cx + 2], pooled[:, :2, :2]], axis=0)  # [2C,2,2,m]
  desc = desc.transpose(1, 2, 0, 3).reshape(-1, desc.shape[-1])     # [D, m], (y, x, ch)
  if use_attention:
    att = params["attention"]
    a = jax.nn.sigmoid(layers.matmul(att["kernel"].T, desc)
                       + att["bias"].astype(jnp.float32)[:, None])
    desc = (desc * a).astype(dt)
    attention_mean = a.mean(0)
  else:
    attention_mean = jnp.ones(desc.shape[-1], jnp.float32)
  return desc.T, attention_mean


def recurrent_head(config: ModelConfig, params, desc: jax.Array, hidden: jax.Array,
                   centres: jax.Array | None = None):
  """desc [B, P*D] + hidden [B, H] -> (hidden, displacement [B, N, 2], error [B]).

  centres [B, P, 2]: the patch centres (the GCN's patch graph; unused otherwise).
  """
  b = desc.shape[0]
  if config.global_attention != "none":
    desc = global_patch_attention(config, params, desc, centres)
  rec = params["recurrent"]
  dt = jnp.dtype(config.compute_dtype)
  rec_in = jnp.concatenate([desc.astype(dt), hidden.astype(dt)], axis=-1)
  if config.recurrent_rank:          # factored kernel u @ v: (x @ u) @ v, never u @ v
    pre = layers.product(layers.product(rec_in, rec["u"], dt), rec["v"], dt) + rec["bias"].astype(
        jnp.float32)
  else:
    pre = layers.dense(rec_in, rec["kernel"], rec["bias"], dt)
  hidden = jnp.tanh(pre)
  out = layers.dense(hidden, params["head"]["kernel"], params["head"]["bias"], dt)
  return hidden, out[:, :-1].reshape(b, config.num_landmarks, 2), out[:, -1]


# --- Table 4 ablations: inverted-bottleneck extractor, global patch attention -----------

def inverted_bottleneck_cm(params, prefix: str, x: jax.Array) -> jax.Array:
  """MobileNetV2 block without residual (the spatial size changes): 1x1 expand, ReLU6,
  depthwise 3x3 VALID, ReLU6, linear 1x1 projection. [Cin, H, W, m] -> [Cout, H-2, W-2, m]."""
  e, d, pr = (params[f"{prefix}_{n}"] for n in ("expand", "depthwise", "project"))
  x = jax.nn.relu6(layers.conv1x1_cm(x, e["kernel"], e["bias"]))
  x = jax.nn.relu6(layers.depthwise3x3_cm(x, d["kernel"], d["bias"]))
  return layers.conv1x1_cm(x, pr["kernel"], pr["bias"])


def inverted_bottleneck_maps(params, patches_cm: jax.Array) -> jax.Array:
  """The conv extractor's layout with each 3x3 conv replaced by an inverted bottleneck:
  [3, ps, ps, m] -> ib1 -> maxpool 2 -> ib2 -> [C, ps/2 - 3, ps/2 - 3, m] (the 'c2' map,
  linear as MobileNetV2's bottleneck outputs)."""
  x = layers.max_pool2x2_cm(inverted_bottleneck_cm(params, "ib1", patches_cm))
  return inverted_bottleneck_cm(params, "ib2", x)


def knn_adjacency(centres: jax.Array, k: int) -> jax.Array:
  """[B, P, 2] patch centres -> [B, P, P] symmetric-normalised adjacency D^-1/2 (A+I) D^-1/2
  of the graph joining each patch to its k nearest patches (made symmetric), with self loops
  (Kipf & Welling's GCN propagation matrix)."""
  p = centres.shape[1]
  k = min(k, p - 1)
  d2 = jnp.sum((centres[:, :, None, :] - centres[:, None, :, :]) ** 2, axis=-1)
  eye = jnp.eye(p, dtype=bool)
  if k > 0:
    _, nearest = jax.lax.top_k(-jnp.where(eye, jnp.inf, d2), k)       # [B, P, k]
    a = jax.nn.one_hot(nearest, p, dtype=jnp.float32).sum(axis=2) > 0
    a = a | jnp.swapaxes(a, 1, 2)
  else:
    a = jnp.zeros(d2.shape, bool)
  a = (a | eye).astype(jnp.float32)
  inv_sqrt = jax.lax.rsqrt(a.sum(-1))
  return a * inv_sqrt[:, :, None] * inv_sqrt[:, None, :]


def global_patch_attention(config: ModelConfig, params, desc: jax.Array,
                           centres: jax.Array | None) -> jax.Array:
  """desc [B, P*D] -> desc with each patch's descriptor scaled by a weight in (0, 1)
  computed from all patches of the face ("fc") or from its graph neighbourhood ("gcn")."""
  b = desc.shape[0]
  p, d = config.num_patches, config.descriptor_size
  g = params["global_attention"]
  if config.global_attention == "fc":
    weights = jax.nn.sigmoid(layers.dense(desc, g["kernel"], g["bias"]))            # [B, P]
  elif config.global_attention == "gcn":
    if centres is None:
      raise ValueError("global_attention='gcn' needs the patch centres (its patch graph)")
    adj = knn_adjacency(centres.astype(jnp.float32), config.gcn_neighbours)
    h = desc.reshape(b, p, d)
    matmul = lambda x, w: jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    h = jax.nn.relu(jnp.einsum("bpq,bqf->bpf", adj, matmul(h, g["kernel"]))
                    + g["bias"].astype(jnp.float32))                          # [B, P, G]
    g2 = params["global_attention_out"]
    s = jnp.einsum("bpq,bq->bp", adj, matmul(h, g2["kernel"])[..., 0])
    weights = jax.nn.sigmoid(s + g2["bias"][0].astype(jnp.float32))           # [B, P]
  else:
    raise ValueError(f"unknown global_attention {config.global_attention!r}")
  return (desc.reshape(b, p, d) * weights[..., None].astype(desc.dtype)).reshape(b, p * d)


# --- the Flax module: declares the parameter tree ---------------------------------------

class _KernelBias(nn.Module):
  """Declares `kernel` (truncated normal, std `init_std`) then `bias` (zeros, the kernel's
  last dimension), as nn.Dense / nn.Conv do: a 3x3 conv [3, 3, in, out], a dense layer
  [in, out], a depthwise 3x3 [3, 3, C]."""
  init_std: float

  @nn.compact
  def __call__(self, kernel_shape: tuple[int, ...]) -> dict:
    return {"kernel": self.param("kernel", nn.initializers.truncated_normal(self.init_std),
                                 tuple(kernel_shape), jnp.float32),
            "bias": self.param("bias", nn.initializers.zeros, (kernel_shape[-1],), jnp.float32)}


# Standard deviation of a unit normal truncated to [-2, 2] (flax's truncated_normal(std)
# draws that times std).
_TRUNCATED_STD = 0.87962566103423978


class _FactoredDense(nn.Module):
  """Declares a factored dense layer kernel = u [in, rank] @ v [rank, out], then `bias`
  (zeros, [out]).

  Init: u truncated normal with std sqrt(1/in) (x @ u keeps the scale of x's entries),
  v with std init_std sqrt(in/rank) / 0.88, so that the entries of u @ v have the variance
  of the dense kernel's (truncated normal, std init_std): the layer starts at the dense
  model's scale (u and v both at init_std would give u @ v entries of std ~sqrt(rank)
  init_std^2: 10x smaller at rank 128, 0.01)."""
  init_std: float
  rank: int

  @nn.compact
  def __call__(self, kernel_shape: tuple[int, int]) -> dict:
    n_in, n_out = kernel_shape
    v_std = self.init_std * (n_in / self.rank) ** 0.5 / _TRUNCATED_STD
    tn = nn.initializers.truncated_normal
    return {"u": self.param("u", tn((1.0 / n_in) ** 0.5), (n_in, self.rank), jnp.float32),
            "v": self.param("v", tn(v_std), (self.rank, n_out), jnp.float32),
            "bias": self.param("bias", nn.initializers.zeros, (n_out,), jnp.float32)}


def _declare_inverted_bottlenecks(cfg: ModelConfig, cin: int) -> dict:
  """Parameters of `inverted_bottleneck_maps` (called inside StageNet's compact scope).

  He-scaled init (not `init_std`): with std 0.01 the three stacked products of each block
  would scale its input by ~2e-5 (1e-4 for the second), the two blocks by ~1e-8, against
  ~1e-2 for the two convolutions with std 0.01. (So at equal steps this extractor starts
  from a differently scaled initialisation than the conv baseline.)
  """
  out = {}
  c = cfg.conv_features
  for name, c_in in (("ib1", cin), ("ib2", c)):
    hidden = c_in * cfg.ib_expansion
    out[f"{name}_expand"] = _KernelBias((2.0 / c_in) ** 0.5, name=f"{name}_expand")(
        (c_in, hidden))
    out[f"{name}_depthwise"] = _KernelBias((2.0 / 9) ** 0.5, name=f"{name}_depthwise")(
        (3, 3, hidden))
    out[f"{name}_project"] = _KernelBias((1.0 / hidden) ** 0.5, name=f"{name}_project")(
        (hidden, c))
  return out


def _declare_global_attention(cfg: ModelConfig) -> dict:
  """Parameters of `global_patch_attention` (none for global_attention="none")."""
  p, d = cfg.num_patches, cfg.descriptor_size
  dense = lambda name, cin, cout: {name: _KernelBias(cfg.init_std, name=name)((cin, cout))}
  if cfg.global_attention == "fc":
    return dense("global_attention", p * d, p)
  if cfg.global_attention == "gcn":
    return {**dense("global_attention", d, cfg.gcn_hidden),
            **dense("global_attention_out", cfg.gcn_hidden, 1)}
  return {}


class StageNet(nn.Module):
  """The network of one iteration. Returns (hidden, displacement, error, attention)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, patches: jax.Array, hidden: jax.Array, centres: jax.Array | None = None,
               patch_mask: jax.Array | None = None):
    cfg = self.config
    b, p = patches.shape[:2]
    c = patches.shape[-1]
    d = cfg.descriptor_size
    params = {}
    if cfg.extractor == "inverted_bottleneck":
      params.update(_declare_inverted_bottlenecks(cfg, c))
    else:
      f = cfg.conv_features
      params["conv1"] = _KernelBias(cfg.init_std, name="conv1")((3, 3, c, f))
      params["conv2"] = _KernelBias(cfg.init_std, name="conv2")((3, 3, f, f))
    if cfg.use_attention:
      params["attention"] = _KernelBias(cfg.init_std, name="attention")((d, d))
    params.update(_declare_global_attention(cfg))
    rec_shape = (p * d + hidden.shape[-1], cfg.hidden_size)
    if cfg.recurrent_rank:
      params["recurrent"] = _FactoredDense(cfg.init_std, cfg.recurrent_rank,
                                           name="recurrent")(rec_shape)
    else:
      params["recurrent"] = _KernelBias(cfg.init_std, name="recurrent")(rec_shape)
    params["head"] = _KernelBias(cfg.init_std, name="head")(
        (cfg.hidden_size, 2 * cfg.num_landmarks + 1))
    desc, attention_mean = patch_features(params, layers.to_channel_major(patches),
                                          cfg.use_attention, cfg.compute_dtype)
    attention_mean = attention_mean.reshape(b, p)
    if patch_mask is not None:         # ModelConfig.stage_patches: unread patches -> 0
      desc = desc.reshape(b, p, d) * patch_mask[None, :, None].astype(desc.dtype)
      attention_mean = attention_mean * patch_mask[None, :]
    hidden, displacement, error = recurrent_head(cfg, params, desc.reshape(b, p * d), hidden,
                                                 centres)
    return hidden, displacement, error, attention_mean


def init_stacked(key: jax.Array, config: ModelConfig) -> Any:
  """Parameters of every iteration, stacked on a leading stage axis [S, ...].

  Every stage is initialised (with its own key) even if early exit would skip it.
  """
  net = StageNet(config)
  p = config.patch_size
  patches = jnp.zeros((1, config.num_patches, p, p, 3), jnp.float32)
  hidden = jnp.zeros((1, config.hidden_size), jnp.float32)
  centres = jnp.zeros((1, config.num_patches, 2), jnp.float32)
  keys = jax.random.split(key, config.num_stages)
  return jax.vmap(lambda k: net.init(k, patches, hidden, centres)["params"])(keys)


def apply_stage(config: ModelConfig, params, patches, hidden, centres=None, patch_mask=None):
  return StageNet(config).apply({"params": params}, patches, hidden, centres, patch_mask)
