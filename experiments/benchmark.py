"""Model-only speed benchmark: inference, latency, training step, early-exit savings.

  python -m experiments.benchmark --output_json=benchmarks/cpu.json
  python -m experiments.benchmark --variants=68/19 --batch_sizes=1 --repeats=2   # quick
  # On a GPU/TPU machine, one command (68/68 and 68/19; inference at batch 1, 64 and
  # 4096; training at batch 128 and 1024; float32 and bfloat16 compute):
  python -m experiments.benchmark --output_json=benchmarks/gpu_<device>.json
  # bf16 vs f32 training throughput of 300w19's model at batch 64, one run:
  python -m experiments.benchmark --variants=68/19 --sections=train --train_batch=64 \
      --compute_dtypes=float32,bfloat16 --output_json=benchmarks/train_bf16_300w19_cpu.json

Imports only JAX / Flax / Optax (never TensorFlow or data_pipelines), so it runs unchanged
on a GPU machine. The weights are synthetic (random initialisation) unless --params_npz
gives trained ones; speed does not depend on the values, but the early-exit threshold Ts
is then picked from the synthetic estimated-error distribution (mean iterations ~1.5),
and the JSON says so.

Timings are wall-clock over `--repeats` calls after a warm-up (compilation excluded); the
best and the median are reported (shared machines are noisy: compare ratios measured in
the same run; the training steps of the compute dtypes are timed in alternation). GFLOP/s
counts 2 x the analytic multiply-adds of musica_jax.cost (convs, attention, recurrent,
head); the matrix-product peak (a large square product, float32 and bf16 operands with
float32 accumulation) is measured in the same run, and each fraction is against the peak
of its own compute dtype.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import platform
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from musica_jax import cascade
from musica_jax import config as config_lib
from musica_jax import cost
from musica_jax import fast_inference
from musica_jax import losses
from musica_jax import stage_net
from musica_jax import strict_json

_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Where to write the JSON results.")
_VARIANTS = flags.DEFINE_list("variants", None,
                              "Variants landmarks/patches ('tiny': a small test model). Default "
                              "68/68,68/34,68/19,98/49 on CPU, 68/68,68/19 on GPU/TPU.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", None,
                                 "Inference batch sizes (default 1,64; 1,64,4096 on GPU/TPU).")
_SECTIONS = flags.DEFINE_multi_enum(
    "sections", ["inference", "latency", "train", "early_exit"],
    ["inference", "latency", "train", "early_exit"], "What to measure.")
_COMPUTE_DTYPES = flags.DEFINE_list(
    "compute_dtypes", None, "Compute dtypes of the inference and training measurements "
    "(float32, bfloat16; default float32 on CPU, float32,bfloat16 on GPU/TPU).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (after warm-up).")
_LATENCY_SAMPLES = flags.DEFINE_integer("latency_samples", 50, "Batch-1 calls for p50/p90.")
_TRAIN_BATCH = flags.DEFINE_list("train_batch", None,
                                  "Training-step batches (default 128; 128,1024 on GPU/TPU; "
                                  "0: skip).")
_PEAK_SIZE = flags.DEFINE_integer(
    "peak_size", 0, "Side of the square matrix product of the peak probe (0: 4096 on CPU, "
    "8192 on GPU/TPU; a 2048 product reads half the peak on the 2-core development CPU).")
_TRAIN_REPEATS = flags.DEFINE_integer("train_repeats", 3, "Timed training steps.")
_EARLY_EXIT_VARIANTS = flags.DEFINE_list("early_exit_variants", ["68/68", "68/19"],
                                         "Variants for the early-exit section.")
_EARLY_EXIT_BATCH = flags.DEFINE_integer("early_exit_batch", 64, "Faces in the early-exit set.")
_TARGET_ITERATIONS = flags.DEFINE_float("target_iterations", 1.5,
                                        "Mean iterations at which Ts is chosen.")
_BF16 = flags.DEFINE_bool("bf16", True, "Also time the batch-1 selective path with bf16 FC weights.")
_PARAMS_NPZ = flags.DEFINE_string(
    "params_npz", None, "Optional trained weights (one variant): an .npz of the stacked "
    "parameter tree with keys like 'recurrent/kernel'.")

TINY = config_lib.ModelConfig(num_landmarks=10, patch_indices=(0, 2, 4, 6, 8, 9),
                              hidden_size=64, image_size=64)
CORNERS = {68: (36, 45), 98: (60, 72), 10: (0, 9)}


def variant_config(name: str) -> config_lib.ModelConfig:
  if name == "tiny":
    return TINY
  n, p = (int(x) for x in name.split("/"))
  scheme = {68: "ibug68", 98: "wflw98"}[n]
  return config_lib.for_scheme(scheme, p)


def device_info() -> dict:
  d = jax.devices()[0]
  info = {"platform": d.platform, "device_kind": d.device_kind, "num_devices": jax.device_count(),
          "jax": jax.__version__, "python": platform.python_version(),
          "cpu_count": os.cpu_count()}
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        info["cpu_model"] = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  info["name"] = info["device_kind"] if d.platform != "cpu" else info.get("cpu_model", "cpu")
  return info


def timed(fn, *args, repeats: int):
  """(best, median) seconds of `repeats` calls after one warm-up call."""
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return min(ts), float(np.median(ts))


def matmul_peak(on_accelerator: bool, repeats: int, compute_dtype: str = "float32") -> float:
  """GFLOP/s of a large square matrix product (n = 4096 on CPU, 8192 on GPU/TPU, or
  --peak_size): the rate the model's own products are compared with. bfloat16: bf16
  operands, float32 accumulation, as the model computes. Two distinct operands, the best
  of the calls."""
  n = _PEAK_SIZE.value or (8192 if on_accelerator else 4096)
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), jnp.float32).astype(compute_dtype)
  b = jax.random.normal(k2, (n, n), jnp.float32).astype(compute_dtype)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  best, _ = timed(f, a, b, repeats=max(3, repeats))
  return 2 * n ** 3 / best / 1e9


def synthetic_inputs(cfg, batch, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  images = jax.random.normal(k1, (batch, cfg.image_size, cfg.image_size, 3), jnp.float32)
  centre = (cfg.image_size - 1) / 2
  init = centre + 0.3 * cfg.image_size * jax.random.uniform(
      k2, (cfg.num_landmarks, 2), minval=-1, maxval=1)
  target = init + 0.02 * cfg.image_size * jax.random.normal(k3, (batch, cfg.num_landmarks, 2))
  return images, init, target


def load_params(cfg, path):
  data = np.load(path)
  tree = {}
  for key in data.files:
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(data[key])
  want = jax.eval_shape(lambda: stage_net.init_stacked(jax.random.key(0), cfg))
  if jax.tree.structure(want) != jax.tree.structure(tree) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(tree))):
    raise ValueError(f"{path} does not match the parameter tree of {cfg}")
  return tree


def make_train_step(cfg, init_shape, corners):
  """Adam + cascade_loss, as in training (buffers donated, as a training loop would).
  cfg.compute_dtype sets the products' dtype; parameters and Adam stay float32."""
  opt = optax.adam(1e-3)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, images, target):
    def loss_fn(p):
      out = cascade.run_cascade(p, images, init_shape, cfg)
      return losses.cascade_loss(out.shapes, out.errors, target, corners)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return opt, step


def with_dtype(cfg, compute_dtype: str):
  return dataclasses.replace(cfg, compute_dtype=compute_dtype)


def bench_inference(cfg, params, batch_sizes, peaks, dtypes) -> dict:
  """{dtype: {batch: faces/s, ...}} of the full masked cascade (`run_cascade_jit`)."""
  macs = cost.cascade_macs(cfg)
  out = {}
  for dt in dtypes:
    run = functools.partial(cascade.run_cascade_jit, config=with_dtype(cfg, dt))
    out[dt] = {}
    for b in batch_sizes:
      images, init, _ = synthetic_inputs(cfg, b)
      best, med = timed(run, params, images, init, repeats=_REPEATS.value)
      gflops = 2 * macs * b / best / 1e9
      out[dt][str(b)] = {"faces_per_s": b / best, "faces_per_s_median": b / med,
                         "ms_per_batch": best * 1e3, "gflops": gflops,
                         "fraction_of_matmul_peak": gflops / peaks[dt]}
  return out


def bench_train(cfg, params, batches, dtypes, peaks) -> dict:
  """{batch: {dtype: samples/s, ...}}: the compute dtypes' steps timed in alternation
  (round after round, each its best), so a shared machine's load hits them alike."""
  macs = cost.cascade_macs(cfg)
  out = {}
  for b in batches:
    images, init, target = synthetic_inputs(cfg, b)
    runners = {}
    for dt in dtypes:
      opt, step = make_train_step(with_dtype(cfg, dt), init, CORNERS[cfg.num_landmarks])
      state = [jax.tree.map(jnp.copy, params), None]
      state[1] = opt.init(state[0])

      def one(step=step, state=state):
        state[0], state[1], loss = step(state[0], state[1], images, target)
        return loss
      jax.block_until_ready(one())                  # compile + warm up
      runners[dt] = one
    times = {dt: [] for dt in dtypes}
    for _ in range(max(1, _TRAIN_REPEATS.value)):
      for dt, one in runners.items():
        t0 = time.perf_counter()
        jax.block_until_ready(one())
        times[dt].append(time.perf_counter() - t0)
    row = {}
    for dt in dtypes:
      best, med = min(times[dt]), float(np.median(times[dt]))
      gflops = 3 * 2 * macs * b / best / 1e9
      row[dt] = {"samples_per_s": b / best, "samples_per_s_median": b / med,
                 "s_per_step": best, "gflops": gflops,
                 "fraction_of_matmul_peak": gflops / peaks[dt]}
    if "float32" in row and "bfloat16" in row:
      row["bfloat16_speedup"] = row["bfloat16"]["samples_per_s"] / row["float32"]["samples_per_s"]
      row["bfloat16_speedup_median"] = (row["bfloat16"]["samples_per_s_median"]
                                        / row["float32"]["samples_per_s_median"])
    out[str(b)] = row
    del runners
  return out


def bench_variant(name, batch_sizes, train_batches, peaks, dtypes) -> dict:
  cfg = variant_config(name)
  params = (load_params(cfg, _PARAMS_NPZ.value) if _PARAMS_NPZ.value
            else stage_net.init_stacked(jax.random.key(0), cfg))
  macs = cost.cascade_macs(cfg)
  row = {"landmarks": cfg.num_landmarks, "patches": cfg.num_patches,
         "iterations": cfg.num_stages, "mmacs": macs / 1e6,
         "mparams": cost.parameter_count(cfg) / 1e6,
         "weight_mbytes_f32": 4 * cost.parameter_count(cfg) / 2 ** 20}
  if "inference" in _SECTIONS.value:
    row["inference"] = bench_inference(cfg, params, batch_sizes, peaks, dtypes)
  if "latency" in _SECTIONS.value:
    row["batch1_latency"] = bench_latency(cfg, params)
  if "train" in _SECTIONS.value and train_batches:
    row["train_step"] = bench_train(cfg, params, train_batches, dtypes, peaks)
  return row


def bench_latency(cfg, params) -> dict:
  """Batch-1 latency (all iterations, Ts = -inf): masked cascade and the selective path."""
  run = functools.partial(cascade.run_cascade_jit, config=cfg)
  images, init, _ = synthetic_inputs(cfg, 1)
  fast = fast_inference.FastCascade(params, cfg)
  lat = {}
  paths = {"run_cascade_jit": lambda: run(params, images, init),
           "selective_f32": lambda: fast.run(images, init)}
  if _BF16.value:
    fast16 = fast_inference.FastCascade(params, cfg, weight_dtype=jnp.bfloat16)
    paths["selective_bf16_fc_weights"] = lambda: fast16.run(images, init)
  for key, fn in paths.items():
    jax.block_until_ready(fn())
    ts = []
    for _ in range(max(1, _LATENCY_SAMPLES.value)):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      ts.append(time.perf_counter() - t0)
    ts = np.asarray(ts) * 1e3
    lat[key] = {"p50_ms": float(np.percentile(ts, 50)), "p90_ms": float(np.percentile(ts, 90)),
                "min_ms": float(ts.min())}
  if _BF16.value:
    a = np.asarray(fast.run(images, init).landmarks)
    b16 = np.asarray(fast16.run(images, init).landmarks)
    lat["selective_bf16_fc_weights"]["max_landmark_deviation_px"] = float(np.abs(a - b16).max())
  return lat


def pick_ts(errors: np.ndarray, target: float) -> tuple[float, float]:
  """Ts (midway between two estimates) whose mean iterations is closest to `target`."""
  s = errors.shape[0]

  def mean_iters(ts):
    below = errors < ts
    return float(np.where(below.any(0), below.argmax(0) + 1, s).mean())
  e = np.unique(errors.ravel())
  cands = np.concatenate([[e[0] - 1], (e[1:] + e[:-1]) / 2, [e[-1] + 1]])
  its = np.asarray([mean_iters(t) for t in cands])
  i = int(np.argmin(np.abs(its - target)))
  return float(cands[i]), float(its[i])


def bench_early_exit(name) -> dict:
  cfg = variant_config(name)
  params = (load_params(cfg, _PARAMS_NPZ.value) if _PARAMS_NPZ.value
            else stage_net.init_stacked(jax.random.key(0), cfg))
  b = _EARLY_EXIT_BATCH.value
  images, init, _ = synthetic_inputs(cfg, b, seed=1)
  run = functools.partial(cascade.run_cascade_jit, config=cfg)
  full = run(params, images, init)
  ts, mean_it = pick_ts(np.asarray(full.errors), _TARGET_ITERATIONS.value)
  masked = run(params, images, init, ts=ts)
  fast = fast_inference.FastCascade(params, cfg)
  selective = fast.run(images, init, ts)
  same = bool(np.array_equal(np.asarray(selective.iterations), np.asarray(masked.iterations))
              and np.allclose(selective.landmarks, masked.landmarks, atol=1e-4))
  its = np.asarray(masked.iterations)
  caps = tuple(int((its > i).sum()) for i in range(1, cfg.num_stages))   # same work, budget
  full_t, _ = timed(lambda: run(params, images, init, ts=ts), repeats=_REPEATS.value)
  sel_t, _ = timed(lambda: fast.run(images, init, ts), repeats=_REPEATS.value)
  cap_t, _ = timed(lambda: fast.run(images, init, capacities=caps), repeats=_REPEATS.value)
  # Batch 1: every face on its own, through the masked cascade and the selective path.
  n1 = min(b, 16)
  singles = [images[i:i + 1] for i in range(n1)]
  full1, _ = timed(lambda: [run(params, x, init, ts=ts).landmarks for x in singles],
                   repeats=max(1, _REPEATS.value // 2))
  sel1, _ = timed(lambda: [fast.run(x, init, ts).landmarks for x in singles],
                  repeats=max(1, _REPEATS.value // 2))
  sel_its = np.asarray([int(fast.run(x, init, ts).iterations[0]) for x in singles])
  shift = np.abs(np.asarray(masked.landmarks) - np.asarray(full.landmarks))
  return {
      "weights": "trained (--params_npz)" if _PARAMS_NPZ.value else
                 "synthetic (random init, untrained): Ts picked from the synthetic "
                 "estimated-error distribution; NME is meaningless here",
      "ts": ts, "mean_iterations": mean_it, "batch": b, "capacities": caps,
      "selective_matches_masked": same,
      "batched": {"masked_full_ms": full_t * 1e3, "selective_ts_ms": sel_t * 1e3,
                  "speedup": full_t / sel_t, "budget_same_counts_ms": cap_t * 1e3,
                  "budget_speedup": full_t / cap_t},
      "batch1": {"faces": n1, "mean_iterations": float(sel_its.mean()),
                 "masked_full_ms_per_face": full1 / n1 * 1e3,
                 "selective_ms_per_face": sel1 / n1 * 1e3, "speedup": full1 / sel1},
      "mean_landmark_shift_vs_full_cascade_px": float(shift.mean()),
      "ideal_speedup": cfg.num_stages / mean_it,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  t_start = time.perf_counter()
  info = device_info()
  on_acc = info["platform"] != "cpu"
  ints = lambda flag, default: [int(x) for x in flag.value] if flag.value else default
  try:
    batch_sizes = ints(_BATCH_SIZES, [1, 64, 4096] if on_acc else [1, 64])
    train_batches = [b for b in ints(_TRAIN_BATCH, [128, 1024] if on_acc else [128]) if b > 0]
  except ValueError as e:
    raise app.UsageError(f"--batch_sizes/--train_batch: integers expected ({e})") from None
  variants = _VARIANTS.value or (["68/68", "68/19"] if on_acc
                                 else ["68/68", "68/34", "68/19", "98/49"])
  for name in list(variants) + list(_EARLY_EXIT_VARIANTS.value):
    try:
      variant_config(name)
    except (ValueError, KeyError) as e:
      raise app.UsageError(f"--variants={name}: landmarks/patches such as 68/19 expected "
                           f"({e})") from None
  dtypes = _COMPUTE_DTYPES.value or (["float32", "bfloat16"] if on_acc else ["float32"])
  bad = [d for d in dtypes if d not in config_lib.COMPUTE_DTYPES]
  if bad:
    raise app.UsageError(f"--compute_dtypes: {bad} not in {config_lib.COMPUTE_DTYPES}")
  peaks = {dt: matmul_peak(on_acc, _REPEATS.value, dt)
           for dt in sorted(set(dtypes) | {"float32"})}
  print(f"device: {info['name']} ({info['platform']}); matmul peak "
        + ", ".join(f"{dt} {v:.1f}" for dt, v in peaks.items()) + " GFLOP/s", flush=True)
  result = {"device": info, "matmul_peak_gflops": peaks["float32"],
            "matmul_peak_gflops_by_dtype": peaks,
            "weights": "trained" if _PARAMS_NPZ.value else "synthetic (random init)",
            "settings": {"variants": variants, "sections": _SECTIONS.value,
                         "batch_sizes": batch_sizes, "repeats": _REPEATS.value,
                         "latency_samples": _LATENCY_SAMPLES.value,
                         "train_batches": train_batches, "train_repeats": _TRAIN_REPEATS.value,
                         "compute_dtypes": dtypes,
                         "one_batched_pass": cascade.one_batched_pass()},
            "variants": {}, "early_exit": {}}
  for name in variants:
    row = bench_variant(name, batch_sizes, train_batches, peaks, dtypes)
    result["variants"][name] = row
    parts = [f"{name:>6} {row['mmacs']:6.1f} MMACs"]
    for dt, rows in row.get("inference", {}).items():
      parts.append(f"{dt} " + "  ".join(
          f"b{b}: {r['faces_per_s']:8.1f}/s ({100 * r['fraction_of_matmul_peak']:4.1f}%)"
          for b, r in rows.items()))
    if "batch1_latency" in row:
      lat = row["batch1_latency"]
      parts.append(f"b1 p50/p90 masked {lat['run_cascade_jit']['p50_ms']:.2f}/"
                   f"{lat['run_cascade_jit']['p90_ms']:.2f} ms, selective "
                   f"{lat['selective_f32']['p50_ms']:.2f}/{lat['selective_f32']['p90_ms']:.2f}"
                   + (f", bf16 {lat['selective_bf16_fc_weights']['p50_ms']:.2f}"
                      if "selective_bf16_fc_weights" in lat else ""))
    for b, r in row.get("train_step", {}).items():
      parts.append(f"train b{b}: " + ", ".join(
          f"{dt} {r[dt]['samples_per_s']:.1f} samples/s" for dt in dtypes)
          + (f" (bf16 x{r['bfloat16_speedup']:.2f})" if "bfloat16_speedup" in r else ""))
    print(" | ".join(parts), flush=True)
  for name in _EARLY_EXIT_VARIANTS.value if "early_exit" in _SECTIONS.value else []:
    if name not in variants and not _PARAMS_NPZ.value:
      continue
    ee = bench_early_exit(name)
    result["early_exit"][name] = ee
    print(f"early exit {name}: Ts={ee['ts']:.4g} mean iterations {ee['mean_iterations']:.2f}; "
          f"batch {ee['batch']} selective (Ts) x{ee['batched']['speedup']:.2f}, budget "
          f"{ee['capacities']} x{ee['batched']['budget_speedup']:.2f}; batch 1 selective "
          f"x{ee['batch1']['speedup']:.2f}")
  result["total_seconds"] = time.perf_counter() - t_start
  print(f"total {result['total_seconds']:.0f} s")
  if _OUTPUT_JSON.value:
    path = pathlib.Path(_OUTPUT_JSON.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(strict_json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
  common.run(main)
