r"""ONNX (and LiteRT/TFLite) export of the cascade: `experiments.export_model --format=onnx`
(`--format=tflite`).

  python -m experiments.export_model --format=onnx --model=default|DIR (or --workdir=W)
      --output=DIR                                  # DIR/model.onnx + DIR/model.onnx.json
  python -m experiments.export_model --format=tflite --model=... --output=DIR
                                                    # DIR/model.tflite + .json (batch 1)

The program is the one of `--format=stablehlo` (`portable.cascade_function`: standardised
crops [B, 228, 228, 3] float32 -> landmarks [B, N, 2] in crop pixels, estimated error [B];
the full cascade; NaN in, NaN out); the side-car JSON is `portable.describe`'s with this
format's name and loader. model.onnx has a symbolic batch "B": an ONNX Loop runs the
one-face graph over the faces (as `portable` vmaps one face), so any batch size runs, one
face after another (no batching speed-up). Weights are float32 initializers.
  onnxruntime.InferenceSession("DIR/model.onnx").run(None, {"crops": crops})
  -> [landmarks, estimated_error]
model.tflite takes crops [1, 228, 228, 3] (signature serving_default, same names).

Converter (issue #29): tf2onnx 1.17 (maintained; TensorFlow graph -> ONNX). It cannot
convert the SavedModel of `--format=savedmodel`: jax2tf in this JAX (0.10) only does
native serialization (`native_serialization=False` / `enable_xla=False` are deprecated and
ignored), so that graph is one `XlaCallModule` op holding StableHLO, which tf2onnx has no
handler for ("pass1 convert failed for name: StatefulPartitionedCall/XlaCallModule"), and
which TFLite's converter refuses ("failed to legalize operation 'mhlo.real_dynamic_slice'").
jax2onnx (0.17.1) needs orbax-checkpoint < 0.11.37 (the project pins 0.12.8). So this
module lowers the cascade's jaxpr to plain TensorFlow ops itself (`JaxprToTF`: the lax
primitives the cascade and its ablation variants use, each one TF op or a few; what is
known at conversion time is computed with JAX itself; `scan` unrolled; gather/scatter
with XLA's index semantics) and hands the batch-1 graph to tf2onnx
(`tf2onnx.convert.from_function`, the converter of `--saved-model` minus the file) and to
`tf.lite.TFLiteConverter.from_saved_model`. A primitive it does not lower is one line
naming it. Why not ONNX straight from the jaxpr: tf2onnx does the ONNX side (op choice
per opset, its graph optimisations) and the same TF graph gives TFLite.

Needs TensorFlow, tf2onnx and onnx (`pip install 'musica-jax[onnx]'`): this module is in
experiments/, never imported by musica_jax.
"""
from __future__ import annotations

import importlib
import os
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from musica_jax import atomic_io
from musica_jax import portable

ONNX_FILE = "model.onnx"
TFLITE_FILE = "model.tflite"
OPSET = 17                     # tf2onnx 1.17 goes up to 18; onnxruntime runs both
INSTALL_HINT = "pip install 'musica-jax[onnx]'"
_BF16 = np.dtype(jnp.bfloat16)
_CATCH_ERRORS = "TF2ONNX_CATCH_ERRORS"    # tf2onnx.constants.ENV_TF2ONNX_CATCH_ERRORS


def require(*modules: str) -> None:
  """Imports `modules` or raises UserError with the one-line install hint."""
  for name in modules:
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise common.UserError(f"--format=onnx/tflite needs {name} ({e.__class__.__name__}: "
                             f"{e}); {INSTALL_HINT}") from None


def check_output(output: str, fmt: str) -> None:
  """Before the work (after export_model's check of DIR): the converter is installed and
  the file the export writes is not a directory in the way (an earlier export's file is
  replaced)."""
  require("tensorflow", *(("tf2onnx", "onnx") if fmt == "onnx" else ()))
  target = pathlib.Path(output) / (ONNX_FILE if fmt == "onnx" else TFLITE_FILE)
  if target.is_dir():
    raise common.UserError(f"--output={output}: {target} exists and is a directory (the "
                           f"--format={fmt} export writes that file)")


# --- jaxpr -> TensorFlow ops ------------------------------------------------------------

def _is_const(x) -> bool:
  return isinstance(x, (np.ndarray, np.generic))


def _sub_jaxpr(params: dict):
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if key in params:
      return params[key]
  return None


class JaxprToTF:
  """Evaluates a jaxpr with TensorFlow ops (plain ops only: no XLA-specific op), so the
  graph converts with tf2onnx and TFLite. Values are numpy arrays while they are known at
  conversion time (the weights, index arithmetic on constants: evaluated with JAX itself,
  so with XLA's semantics) and tf.Tensors once they depend on the input."""

  def __init__(self):
    import tensorflow as tf  # noqa: PLC0415
    self.tf = tf
    self.elementwise = _elementwise()

  # -- driver --
  def run(self, jaxpr, consts, args):
    from jax.extend import core as jcore  # noqa: PLC0415
    if isinstance(jaxpr, jcore.ClosedJaxpr):
      jaxpr, consts = jaxpr.jaxpr, list(jaxpr.consts) + list(consts)
    env = {}

    def read(v):
      if isinstance(v, jcore.Literal):
        return np.asarray(v.val, v.aval.dtype)
      return env[v]

    for v, c in zip(jaxpr.constvars, consts):
      env[v] = c if isinstance(c, self.tf.Tensor) else np.asarray(c)
    for v, a in zip(jaxpr.invars, args):
      env[v] = a
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      if all(_is_const(x) for x in ins):     # known at conversion time: JAX computes it
        outs = eqn.primitive.bind(*ins, **eqn.params)
        outs = [np.asarray(o) for o in (outs if eqn.primitive.multiple_results else [outs])]
      else:
        outs = self.eqn(eqn, ins)
        if not eqn.primitive.multiple_results:
          outs = [outs]
      for v, o in zip(eqn.outvars, outs):
        if not isinstance(v, jcore.DropVar):
          env[v] = o
    return [read(v) for v in jaxpr.outvars]

  def t(self, x, dtype=None):
    """x as a tf.Tensor (bfloat16 values as float32: see p_convert_element_type)."""
    if _is_const(x):
      x = np.asarray(x, dtype)
      return self.tf.constant(x.astype(np.float32) if x.dtype == _BF16 else x)
    return x

  def eqn(self, eqn, ins):
    name = eqn.primitive.name.replace("-", "_")
    sub = _sub_jaxpr(eqn.params)
    if name in ("scan",):
      return self.scan(eqn, ins)
    if sub is not None and name not in ("cond", "while"):   # jit, custom_jvp/vjp, remat
      return self.run(sub, [], ins)
    if name in self.elementwise:
      return self.elementwise[name](self.tf, *[self.t(x) for x in ins])
    fn = getattr(self, "p_" + name, None)
    if fn is None:
      raise common.UserError(f"--format=onnx/tflite: the model uses the JAX primitive "
                             f"{eqn.primitive.name!r}, which this converter "
                             f"(experiments/onnx_export.py) does not lower")
    return fn(eqn, ins)

  # -- structure --
  def scan(self, eqn, ins):
    tf = self.tf
    p = eqn.params
    nc, nk, n = p["num_consts"], p["num_carry"], p["length"]
    consts, carry, xs = ins[:nc], list(ins[nc:nc + nk]), ins[nc + nk:]
    ys = []
    for i in (reversed(range(n)) if p["reverse"] else range(n)):
      out = self.run(p["jaxpr"], [], [*consts, *carry, *[x[i] for x in xs]])
      carry, y = out[:nk], out[nk:]
      ys.append(y)
    if p["reverse"]:
      ys = ys[::-1]
    stacked = [np.stack(col) if all(_is_const(c) for c in col)
               else tf.stack([self.t(c) for c in col]) for col in zip(*ys)] if ys else []
    return [*carry, *stacked]

  # -- shapes --
  def p_broadcast_in_dim(self, eqn, ins):
    tf = self.tf
    x = self.t(ins[0])
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    inter = [1] * len(shape)
    for i, d in enumerate(dims):
      inter[d] = x.shape[i]
    return tf.broadcast_to(tf.reshape(x, inter), shape)

  def p_reshape(self, eqn, ins):
    if eqn.params.get("dimensions") is not None:
      raise common.UserError("--format=onnx/tflite: reshape with dimensions is not lowered")
    return self.tf.reshape(self.t(ins[0]), eqn.params["new_sizes"])

  def p_squeeze(self, eqn, ins):
    return self.tf.squeeze(self.t(ins[0]), axis=list(eqn.params["dimensions"]))

  def p_expand_dims(self, eqn, ins):
    x = self.t(ins[0])
    for d in sorted(eqn.params["dimensions"]):
      x = self.tf.expand_dims(x, d)
    return x

  def p_transpose(self, eqn, ins):
    return self.tf.transpose(self.t(ins[0]), eqn.params["permutation"])

  def p_slice(self, eqn, ins):
    p = eqn.params
    strides = p["strides"] or [1] * len(p["start_indices"])
    return self.tf.strided_slice(self.t(ins[0]), list(p["start_indices"]),
                                 list(p["limit_indices"]), list(strides))

  def p_concatenate(self, eqn, ins):
    return self.tf.concat([self.t(x) for x in ins], axis=eqn.params["dimension"])

  def p_stack(self, eqn, ins):
    return self.tf.stack([self.t(x) for x in ins], axis=eqn.params["axis"])

  def p_split(self, eqn, ins):
    return self.tf.split(self.t(ins[0]), list(eqn.params["sizes"]), axis=eqn.params["axis"])

  def p_pad(self, eqn, ins):
    tf = self.tf
    x, value = self.t(ins[0]), ins[1]
    cfg = eqn.params["padding_config"]
    if any(interior for _, _, interior in cfg):
      raise common.UserError("--format=onnx/tflite: interior padding is not lowered")
    x = tf.pad(x, [[max(lo, 0), max(hi, 0)] for lo, hi, _ in cfg],
               constant_values=self.t(value, x.dtype.as_numpy_dtype))
    begin = [max(-lo, 0) for lo, _, _ in cfg]
    end = [x.shape[i] - max(-hi, 0) for i, (_, hi, _) in enumerate(cfg)]
    return tf.strided_slice(x, begin, end) if any(begin) or end != list(x.shape) else x

  def p_iota(self, eqn, ins):          # no inputs: folded by `run`; kept for completeness
    p = eqn.params
    return np.asarray(jax.lax.broadcasted_iota(p["dtype"], p["shape"], p["dimension"]))

  def p_select_n(self, eqn, ins):
    tf = self.tf
    which, cases = self.t(ins[0]), [self.t(c) for c in ins[1:]]
    if which.dtype == tf.bool:
      return tf.where(which, cases[1], cases[0])
    out = cases[0]
    for k in range(1, len(cases)):
      out = tf.where(tf.equal(which, k), cases[k], out)
    return out

  def p_convert_element_type(self, eqn, ins):
    """bfloat16 (compute_dtype="bfloat16") is carried as float32 holding bfloat16 values
    (rounded here): onnxruntime's CPU kernels have no bfloat16 MatMul, and a product of
    two bfloat16 numbers is exact in float32, as XLA's bf16 x bf16 -> f32 products."""
    tf = self.tf
    x, new = self.t(ins[0]), np.dtype(eqn.params["new_dtype"])
    if new == _BF16:
      return tf.cast(tf.cast(x, tf.bfloat16), tf.float32)
    return tf.cast(x, new)

  def p_clamp(self, eqn, ins):
    lo, x, hi = (self.t(v) for v in ins)
    return self.tf.minimum(self.tf.maximum(x, lo), hi)

  def _reduce(self, fn, eqn, ins):
    return fn(self.t(ins[0]), axis=list(eqn.params["axes"]))

  def p_reduce_sum(self, eqn, ins):
    return self._reduce(self.tf.reduce_sum, eqn, ins)

  def p_reduce_max(self, eqn, ins):
    return self._reduce(self.tf.reduce_max, eqn, ins)

  def p_reduce_min(self, eqn, ins):
    return self._reduce(self.tf.reduce_min, eqn, ins)

  def p_reduce_prod(self, eqn, ins):
    return self._reduce(self.tf.reduce_prod, eqn, ins)

  def p_reduce_and(self, eqn, ins):
    return self._reduce(self.tf.reduce_all, eqn, ins)

  def p_reduce_or(self, eqn, ins):
    return self._reduce(self.tf.reduce_any, eqn, ins)

  def p_argmax(self, eqn, ins):
    (axis,) = eqn.params["axes"]
    return self.tf.argmax(self.t(ins[0]), axis=axis, output_type=eqn.params["index_dtype"])

  def p_argmin(self, eqn, ins):
    (axis,) = eqn.params["axes"]
    return self.tf.argmin(self.t(ins[0]), axis=axis, output_type=eqn.params["index_dtype"])

  def p_top_k(self, eqn, ins):
    values, idx = self.tf.math.top_k(self.t(ins[0]), k=eqn.params["k"])
    return [values, self.tf.cast(idx, np.int32)]

  def p_integer_pow(self, eqn, ins):
    x, y = self.t(ins[0]), eqn.params["y"]
    if y < 0 or y > 8:
      return self.tf.pow(x, self.tf.cast(y, x.dtype))
    out = self.tf.ones_like(x)
    for _ in range(y):
      out = out * x
    return out

  def p_optimization_barrier(self, eqn, ins):
    return [self.t(x) for x in ins]

  def p_dot_general(self, eqn, ins):
    """As XLA: batch dims first, then lhs free, then rhs free; one (batched) MatMul."""
    tf = self.tf
    lhs, rhs = self.t(ins[0]), self.t(ins[1])
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    ls, rs = list(lhs.shape), list(rhs.shape)
    lf = [d for d in range(len(ls)) if d not in lc and d not in lb]
    rf = [d for d in range(len(rs)) if d not in rc and d not in rb]
    size = lambda shape, dims: int(np.prod([shape[d] for d in dims], dtype=np.int64))
    bshape = [ls[d] for d in lb]
    a = tf.reshape(tf.transpose(lhs, [*lb, *lf, *lc]),
                   [*bshape, size(ls, lf), size(ls, lc)])
    b = tf.reshape(tf.transpose(rhs, [*rb, *rc, *rf]),
                   [*bshape, size(rs, rc), size(rs, rf)])
    out = tf.matmul(a, b)
    out = tf.reshape(out, [*bshape, *[ls[d] for d in lf], *[rs[d] for d in rf]])
    want = eqn.params.get("preferred_element_type")
    return out if want is None else tf.cast(out, np.dtype(want))

  # -- gather / scatter (XLA semantics, index_vector_dim last as JAX emits them) --
  def _full_starts(self, indices, operand_shape, window, start_map, batching_dims,
                   indices_batching_dims, clamp: bool):
    """[*batch, R] start of each window in every operand dim (int32)."""
    tf = self.tf
    batch_shape = list(indices.shape[:-1])
    cols = []
    for d, n in enumerate(operand_shape):
      if d in start_map:
        s = tf.cast(indices[..., start_map.index(d)], np.int32)
        if clamp:
          s = tf.clip_by_value(s, 0, n - window[d])
      elif d in batching_dims:
        axis = indices_batching_dims[batching_dims.index(d)]
        s = tf.constant(np.asarray(jax.lax.broadcasted_iota(np.int32, batch_shape, axis)))
      else:
        s = tf.zeros(batch_shape, np.int32)
      cols.append(s)
    return tf.stack(cols, axis=-1)

  def _in_bounds(self, starts, operand_shape, window):
    tf = self.tf
    hi = np.asarray([n - w for n, w in zip(operand_shape, window)], np.int32)
    return tf.reduce_all((starts >= 0) & (starts <= hi), axis=-1)

  @staticmethod
  def _grid(window):
    """[*window, R] offsets of every element of a window."""
    return np.stack(np.meshgrid(*[np.arange(w, dtype=np.int32) for w in window],
                                indexing="ij"), axis=-1)

  def p_gather(self, eqn, ins):
    tf = self.tf
    operand, indices = self.t(ins[0]), self.t(ins[1])
    p = eqn.params
    dn, sizes, mode = p["dimension_numbers"], list(p["slice_sizes"]), str(p["mode"])
    shape = list(operand.shape)
    rank = len(shape)
    start_map = [int(d) for d in dn.start_index_map]
    bdims = [int(d) for d in dn.operand_batching_dims]
    ibdims = [int(d) for d in dn.start_indices_batching_dims]
    fill = "FILL_OR_DROP" in mode
    raw = self._full_starts(indices, shape, sizes, start_map, bdims, ibdims, clamp=False)
    starts = self._full_starts(indices, shape, sizes, start_map, bdims, ibdims, clamp=True)
    nb = len(indices.shape) - 1
    # Trailing dims read whole (slice = dim: the start is 0) stay out of the index.
    lead = rank
    while lead > 0 and sizes[lead - 1] == shape[lead - 1]:
      lead -= 1
    full = (tf.reshape(starts[..., :lead], [*starts.shape[:-1], *[1] * lead, lead])
            + self._grid(sizes[:lead]))                           # [*batch, *sizes', R']
    out = tf.gather_nd(operand, full)                             # [*batch, *sizes]
    if fill:
      ok = self._in_bounds(raw, shape, sizes)
      value = p.get("fill_value")
      if value is None:
        value = np.nan if np.issubdtype(operand.dtype.as_numpy_dtype, np.inexact) else 0
      ok = tf.reshape(ok, [*ok.shape, *[1] * rank])
      out = tf.where(ok, out, tf.cast(value, operand.dtype))
    drop = set(int(d) for d in dn.collapsed_slice_dims) | set(bdims)
    keep = [d for d in range(rank) if d not in drop]
    out = tf.reshape(out, [*indices.shape[:-1], *[sizes[d] for d in keep]])
    offset_dims = [int(d) for d in dn.offset_dims]
    perm, b = [], 0
    for pos in range(nb + len(keep)):
      if pos in offset_dims:
        perm.append(nb + offset_dims.index(pos))
      else:
        perm.append(b)
        b += 1
    return tf.transpose(out, perm) if perm != list(range(len(perm))) else out

  def _scatter(self, eqn, ins, combine: str):
    tf = self.tf
    operand, indices, updates = self.t(ins[0]), self.t(ins[1]), self.t(ins[2])
    p = eqn.params
    dn, mode = p["dimension_numbers"], str(p["mode"])
    shape = list(operand.shape)
    rank = len(shape)
    uwd = [int(d) for d in dn.update_window_dims]
    inserted = [int(d) for d in dn.inserted_window_dims]
    start_map = [int(d) for d in dn.scatter_dims_to_operand_dims]
    bdims = [int(d) for d in dn.operand_batching_dims]
    ibdims = [int(d) for d in dn.scatter_indices_batching_dims]
    scatter_dims = [d for d in range(len(updates.shape)) if d not in uwd]
    updates = tf.transpose(updates, [*scatter_dims, *uwd])
    window, it = [], iter(uwd)
    for d in range(rank):
      window.append(1 if d in inserted or d in bdims else updates.shape[len(scatter_dims)
                                                                        + uwd.index(next(it))])
    batch = [updates.shape[i] for i in range(len(scatter_dims))]
    updates = tf.reshape(updates, [*batch, *window])
    raw = self._full_starts(indices, shape, window, start_map, bdims, ibdims, clamp=False)
    starts = self._full_starts(indices, shape, window, start_map, bdims, ibdims, clamp=True)
    full = tf.reshape(starts, [*batch, *[1] * rank, rank]) + self._grid(window)
    if "FILL_OR_DROP" in mode or "PROMISE" in mode:
      # An out-of-bounds window is dropped (XLA): write back what is there instead.
      ok = tf.reshape(self._in_bounds(raw, shape, window), [*batch, *[1] * rank])
      neutral = tf.gather_nd(operand, full) if combine == "set" else tf.zeros_like(updates)
      updates = tf.where(ok, updates, neutral)
    full = tf.reshape(full, [-1, rank])
    updates = tf.reshape(updates, [-1])
    if combine == "set":
      return tf.tensor_scatter_nd_update(operand, full, updates)
    return tf.tensor_scatter_nd_add(operand, full, updates)

  def p_scatter(self, eqn, ins):
    box = self._constant_box(eqn, ins)
    if box is None:
      return self._scatter(eqn, ins, "set")
    # One window at a known place (`x.at[a:b, c:d].set(u)`, the pyramid atlas): slices
    # and concatenations (a zero operand: a pad), exact copies without index tensors.
    operand, updates = ins[0], self.t(ins[2])
    if any(s < 0 or s + w > n for s, w, n in zip(box, updates.shape, operand.shape)):
      return self.t(operand)          # out of bounds: XLA drops the update (FILL_OR_DROP)
    return self._replace_box(operand, updates, box)

  def _replace_box(self, operand, update, start):
    tf = self.tf
    if _is_const(operand) and not np.any(operand):
      return tf.pad(update, [[s, n - s - w] for s, w, n in
                             zip(start, update.shape, operand.shape)])
    for d, (s, w, n) in enumerate(zip(start, update.shape, operand.shape)):
      if (s, w) == (0, n):
        continue
      cut = lambda lo, hi: (operand[(slice(None),) * d + (slice(lo, hi),)] if _is_const(operand)
                            else tf.strided_slice(operand, [0] * d + [lo],
                                                  list(operand.shape[:d]) + [hi]))
      middle = self._replace_box(cut(s, s + w), update, [*start[:d], 0, *start[d + 1:]])
      parts = [self.t(cut(0, s))] if s else []
      parts.append(middle)
      if s + w < n:
        parts.append(self.t(cut(s + w, n)))
      return tf.concat(parts, axis=d)
    return update

  @staticmethod
  def _constant_box(eqn, ins):
    """The window's start in every operand dim when the scatter writes one window, whole
    update, at constant indices; else None."""
    dn = eqn.params["dimension_numbers"]
    indices, updates = ins[1], ins[2]
    if (not _is_const(indices) or np.ndim(indices) != 1 or dn.inserted_window_dims
        or dn.operand_batching_dims or len(dn.update_window_dims) != len(updates.shape)):
      return None
    start = [0] * len(updates.shape)
    for k, d in enumerate(dn.scatter_dims_to_operand_dims):
      start[int(d)] = int(indices[k])
    return start

  def p_scatter_add(self, eqn, ins):
    return self._scatter(eqn, ins, "add")

  def p_dynamic_slice(self, eqn, ins):
    tf = self.tf
    x = self.t(ins[0])
    sizes = list(eqn.params["slice_sizes"])
    starts = [tf.clip_by_value(tf.cast(self.t(s), np.int32), 0, n - w)
              for s, n, w in zip(ins[1:], x.shape, sizes)]
    return tf.slice(x, tf.stack(starts), sizes)


def _binary_int_aware(float_fn, int_fn):
  def fn(tf, a, b):
    return (float_fn if a.dtype.is_floating else int_fn)(a, b)
  return fn


def _logical(logical_fn, bitwise_fn):
  def fn(tf, *xs):
    return (logical_fn if xs[0].dtype == tf.bool else bitwise_fn)(*xs)
  return fn


def _elementwise() -> dict:
  import tensorflow as tf  # noqa: PLC0415
  return {
      "add": lambda tf, a, b: tf.add(a, b), "sub": lambda tf, a, b: tf.subtract(a, b),
      "mul": lambda tf, a, b: tf.multiply(a, b),
      "div": _binary_int_aware(tf.math.divide, tf.truncatediv),
      "rem": lambda tf, a, b: tf.truncatemod(a, b),
      "max": lambda tf, a, b: tf.maximum(a, b), "min": lambda tf, a, b: tf.minimum(a, b),
      "pow": lambda tf, a, b: tf.pow(a, b),
      "neg": lambda tf, x: tf.negative(x), "abs": lambda tf, x: tf.abs(x),
      "sign": lambda tf, x: tf.sign(x), "floor": lambda tf, x: tf.floor(x),
      "ceil": lambda tf, x: tf.math.ceil(x), "round": lambda tf, x: tf.round(x),
      "exp": lambda tf, x: tf.exp(x), "log": lambda tf, x: tf.math.log(x),
      "exp2": lambda tf, x: tf.pow(tf.cast(2, x.dtype), x),
      "sqrt": lambda tf, x: tf.sqrt(x), "rsqrt": lambda tf, x: tf.math.rsqrt(x),
      "tanh": lambda tf, x: tf.tanh(x), "logistic": lambda tf, x: tf.sigmoid(x),
      "square": lambda tf, x: x * x, "is_finite": lambda tf, x: tf.math.is_finite(x),
      "lt": lambda tf, a, b: tf.less(a, b), "le": lambda tf, a, b: tf.less_equal(a, b),
      "gt": lambda tf, a, b: tf.greater(a, b), "ge": lambda tf, a, b: tf.greater_equal(a, b),
      "eq": lambda tf, a, b: tf.equal(a, b), "ne": lambda tf, a, b: tf.not_equal(a, b),
      "and": _logical(tf.logical_and, tf.bitwise.bitwise_and),
      "or": _logical(tf.logical_or, tf.bitwise.bitwise_or),
      "xor": _logical(tf.math.logical_xor, tf.bitwise.bitwise_xor),
      "not": _logical(tf.logical_not, tf.bitwise.invert),
      "stop_gradient": lambda tf, x: x, "copy": lambda tf, x: tf.identity(x),
      "copy_p": lambda tf, x: tf.identity(x),
  }


# --- the cascade as TensorFlow functions ------------------------------------------------

def one_face_jaxpr(pred):
  """The portable program on one face as a ClosedJaxpr: crop [S, S, 3] -> (landmarks
  [N, 2], estimated error []).

  `portable.cascade_function` is `jax.vmap(one)`; its one-face function (`__wrapped__`,
  which jax.vmap sets) is traced directly: the batch-1 vmap would add a leading 1 to
  every array, and TFLite's kernels stop at 5-D (Slice) or 6-D."""
  cfg = pred.model_config
  s = cfg.image_size
  fn = portable.cascade_function(pred.params, cfg, pred.mean_shape)
  one = getattr(fn, "__wrapped__", None)
  if one is None:                    # no one-face function: vmap at batch 1, unbatched
    one = lambda crop: [x[0] for x in fn(crop[None])]
  return jax.make_jaxpr(one)(jax.ShapeDtypeStruct((s, s, 3), jnp.float32))


def tf_function(pred):
  """The cascade at batch 1 in plain TF ops: a tf.function crops [1, S, S, 3] ->
  {"landmarks": [1, N, 2], "estimated_error": [1]} (TFLite's graph; ONNX's Loop body)."""
  import tensorflow as tf  # noqa: PLC0415
  cfg = pred.model_config
  s = cfg.image_size
  closed = one_face_jaxpr(pred)
  lower = JaxprToTF()

  @tf.function(input_signature=[tf.TensorSpec([1, s, s, 3], tf.float32, name="crops")],
               autograph=False)
  def serve(crops):
    lm, err = (lower.t(x) for x in lower.run(closed, [], [crops[0]]))
    return {"landmarks": tf.identity(lm[None], name="landmarks"),
            "estimated_error": tf.identity(err[None], name="estimated_error")}
  return serve


def side_car(pred, fmt: str, load: str, batch: str, command: str) -> dict:
  """`portable.describe` (the stablehlo side-car: inputs, outputs, crop rule, mean shape)
  with this format's name, loader and batch."""
  info = portable.describe(pred.model_config, pred.mean_shape, ["cpu"], "float32",
                           dict(pred.metadata, exported_with=command))
  info.update(format=f"musica-jax-{fmt}", load=load)     # weights: float32 constants
  info["input"]["batch"] = batch
  info.pop("platforms", None)
  return info


OUTPUTS = ("landmarks", "estimated_error")


def loop_over_faces(one, batch_name: str = "B"):
  """The batch-1 model `one` (crops [1, S, S, 3] -> landmarks [1, N, 2], estimated_error
  [1]) run by an ONNX Loop over the faces of crops [B, S, S, 3] (B symbolic): the body is
  `one`'s graph on crops[i][None], its outputs squeezed and stacked by the Loop. The
  weights stay initializers of the main graph (the body reads them from the outer scope).
  """
  import onnx  # noqa: PLC0415
  from onnx import TensorProto  # noqa: PLC0415
  from onnx import helper  # noqa: PLC0415
  g = one.graph
  inits = {t.name for t in g.initializer}
  (inp,) = [v for v in g.input if v.name not in inits]
  outs = {v.name: v for v in g.output}
  if set(outs) != set(OUTPUTS):
    raise ValueError(f"the batch-1 model's outputs are {sorted(outs)}, not {OUTPUTS}")
  rename = lambda name: f"face/{name}" if name else name
  body_nodes = [helper.make_node("Gather", ["crops", "face/i"], ["face/crop"], axis=0),
                helper.make_node("Unsqueeze", ["face/crop", "face/axis0"],
                                 [rename(inp.name)])]
  for node in g.node:
    n = onnx.NodeProto()
    n.CopyFrom(node)
    n.input[:] = [rename(x) for x in node.input]
    n.output[:] = [rename(x) for x in node.output]
    n.name = rename(node.name)
    body_nodes.append(n)
  body_outputs = [helper.make_tensor_value_info("face/cond_out", TensorProto.BOOL, [])]
  body_nodes.append(helper.make_node("Identity", ["face/cond"], ["face/cond_out"]))
  for name in OUTPUTS:
    body_nodes.append(helper.make_node("Squeeze", [rename(name), "face/axis0"],
                                       [f"face/{name}_0"]))
    dims = [d.dim_value for d in outs[name].type.tensor_type.shape.dim][1:]
    body_outputs.append(helper.make_tensor_value_info(f"face/{name}_0", TensorProto.FLOAT,
                                                      dims))
  body = helper.make_graph(
      body_nodes, "face",
      [helper.make_tensor_value_info("face/i", TensorProto.INT64, []),
       helper.make_tensor_value_info("face/cond", TensorProto.BOOL, [])], body_outputs)
  weights = []
  for t in g.initializer:
    w = onnx.TensorProto()
    w.CopyFrom(t)
    w.name = rename(t.name)
    weights.append(w)
  weights.append(helper.make_tensor("face/axis0", TensorProto.INT64, [1], [0]))
  weights.append(helper.make_tensor("zero", TensorProto.INT64, [], [0]))
  s = [d.dim_value for d in inp.type.tensor_type.shape.dim][1:]
  main = [helper.make_node("Shape", ["crops"], ["shape"]),
          helper.make_node("Gather", ["shape", "zero"], ["faces"], axis=0),
          helper.make_node("Loop", ["faces", ""], list(OUTPUTS), body=body)]
  out_info = [helper.make_tensor_value_info(
      name, TensorProto.FLOAT,
      [batch_name, *[d.dim_value for d in outs[name].type.tensor_type.shape.dim][1:]])
      for name in OUTPUTS]
  graph = helper.make_graph(
      main, "musica_cascade",
      [helper.make_tensor_value_info("crops", TensorProto.FLOAT, [batch_name, *s])],
      out_info, initializer=weights)
  model = helper.make_model(graph, opset_imports=list(one.opset_import),
                            producer_name="musica-jax experiments.onnx_export")
  model.ir_version = one.ir_version
  onnx.checker.check_model(model)
  return model


def convert_onnx(pred, opset: int = OPSET):
  """The cascade as an onnx.ModelProto with a symbolic batch (`loop_over_faces` of the
  batch-1 graph that tf2onnx converts from `tf_function`)."""
  require("tensorflow", "tf2onnx", "onnx")
  import tf2onnx  # noqa: PLC0415
  serve = tf_function(pred)
  # tf2onnx deep-copies the whole graph before each of its optimizer passes, to roll a
  # failed pass back ("catch errors"): most of the conversion time here. A failed pass
  # then raises instead (the export fails loudly, nothing is written).
  old = os.environ.get(_CATCH_ERRORS)
  os.environ[_CATCH_ERRORS] = "FALSE"
  try:
    one, _ = tf2onnx.convert.from_function(serve, input_signature=serve.input_signature,
                                           opset=opset)
  finally:
    if old is None:
      os.environ.pop(_CATCH_ERRORS, None)
    else:
      os.environ[_CATCH_ERRORS] = old
  return loop_over_faces(one)


def export_onnx(output: str, pred, command: str = "python -m experiments.export_model "
                "--format=onnx") -> dict:
  """--format=onnx: DIR/model.onnx + DIR/model.onnx.json."""
  model = convert_onnx(pred)
  blob = model.SerializeToString()
  out = pathlib.Path(output)
  out.mkdir(parents=True, exist_ok=True)
  atomic_io.write(out / ONNX_FILE, lambda f: f.write(blob), binary=True)
  cfg = pred.model_config
  print(f"wrote {out / ONNX_FILE} ({len(blob) / 1e6:.1f} MB, opset {OPSET}, batch B, "
        f"{cfg.num_landmarks} landmarks / {cfg.num_patches} patches)")
  info = side_car(pred, "onnx", "onnxruntime.InferenceSession(PATH).run(None, "
                  "{'crops': crops}) -> [landmarks, estimated_error]",
                  "symbolic 'B' (any B >= 1; an ONNX Loop runs the faces one after "
                  "another)", command)
  info["opset"] = OPSET
  info["converter"] = "experiments/onnx_export.py (jaxpr -> TF ops) + tf2onnx " + \
      importlib.import_module("tf2onnx").__version__
  common.write_json(out / (ONNX_FILE + ".json"), info, indent=1)
  return {"output": str((out / ONNX_FILE).resolve()), "bytes": len(blob), **info}


def convert_tflite(pred) -> bytes:
  """The cascade at batch 1 as a TFLite flatbuffer (builtin ops only; signature
  serving_default: crops -> landmarks, estimated_error)."""
  require("tensorflow")
  import tensorflow as tf  # noqa: PLC0415
  module = tf.Module()
  module.serve = tf_function(pred)
  with tempfile.TemporaryDirectory() as tmp:    # a SavedModel keeps the signature's names
    tf.saved_model.save(module, tmp, signatures={"serving_default": module.serve})
    conv = tf.lite.TFLiteConverter.from_saved_model(tmp)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return conv.convert()


def export_tflite(output: str, pred, command: str = "python -m experiments.export_model "
                  "--format=tflite") -> dict:
  """--format=tflite: DIR/model.tflite (batch 1) + DIR/model.tflite.json."""
  blob = convert_tflite(pred)
  out = pathlib.Path(output)
  out.mkdir(parents=True, exist_ok=True)
  atomic_io.write(out / TFLITE_FILE, lambda f: f.write(blob), binary=True)
  print(f"wrote {out / TFLITE_FILE} ({len(blob) / 1e6:.1f} MB, batch 1)")
  info = side_car(pred, "tflite", "tf.lite.Interpreter(model_path=PATH) (or ai_edge_litert"
                  "'s Interpreter).get_signature_runner()(crops=crops) -> {'landmarks', "
                  "'estimated_error'}", "fixed: 1", command)
  common.write_json(out / (TFLITE_FILE + ".json"), info, indent=1)
  return {"output": str((out / TFLITE_FILE).resolve()), "bytes": len(blob), **info}
