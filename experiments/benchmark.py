"""Model-only speed benchmark: inference, latency, training step, early-exit savings.

  python -m experiments.benchmark --output_json=benchmarks/cpu.json
  python -m experiments.benchmark --variants=68/19 --batch_sizes=1 --repeats=2   # quick

Imports only JAX / Flax / Optax (never TensorFlow or data_pipelines), so it runs unchanged
on a GPU machine. The weights are synthetic (random initialisation) unless --params_npz
gives trained ones; speed does not depend on the values, but the early-exit threshold Ts
is then picked from the synthetic estimated-error distribution (mean iterations ~1.5),
and the JSON says so.

Timings are wall-clock over `--repeats` calls after a warm-up (compilation excluded); the
best and the median are reported (shared machines are noisy: compare ratios measured in
the same run). GFLOP/s counts 2 x the analytic multiply-adds of musica_jax.cost (convs,
attention, recurrent, head); the matrix-product peak is measured in the same run.
"""
from __future__ import annotations

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

from musica_jax import cascade
from musica_jax import config as config_lib
from musica_jax import cost
from musica_jax import fast_inference
from musica_jax import losses
from musica_jax import stage_net
from musica_jax import strict_json

_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Where to write the JSON results.")
_VARIANTS = flags.DEFINE_list("variants", ["68/68", "68/34", "68/19", "98/49"],
                              "Variants landmarks/patches ('tiny': a small test model).")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", None,
                                 "Inference batch sizes (default 1,64; 1,64,4096 on GPU).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (after warm-up).")
_LATENCY_SAMPLES = flags.DEFINE_integer("latency_samples", 50, "Batch-1 calls for p50/p90.")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch", 128, "Training-step batch (0: skip).")
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
  info["name"] = info["device_kind"] if d.platform == "gpu" else info.get("cpu_model", "cpu")
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


def matmul_peak(on_gpu: bool, repeats: int) -> float:
  n = 8192 if on_gpu else 2048
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  best, _ = timed(f, a, a, repeats=max(3, repeats))
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
  """Adam + cascade_loss, as in training (buffers donated, as a training loop would)."""
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


def bench_variant(name, batch_sizes, peak, on_gpu) -> dict:
  cfg = variant_config(name)
  params = (load_params(cfg, _PARAMS_NPZ.value) if _PARAMS_NPZ.value
            else stage_net.init_stacked(jax.random.key(0), cfg))
  macs = cost.cascade_macs(cfg)
  row = {"landmarks": cfg.num_landmarks, "patches": cfg.num_patches,
         "iterations": cfg.num_stages, "mmacs": macs / 1e6,
         "mparams": cost.parameter_count(cfg) / 1e6,
         "weight_mbytes_f32": 4 * cost.parameter_count(cfg) / 2 ** 20, "inference": {}}
  run = functools.partial(cascade.run_cascade_jit, config=cfg)
  for b in batch_sizes:
    images, init, _ = synthetic_inputs(cfg, b)
    best, med = timed(run, params, images, init, repeats=_REPEATS.value)
    gflops = 2 * macs * b / best / 1e9
    row["inference"][str(b)] = {"faces_per_s": b / best, "faces_per_s_median": b / med,
                                "ms_per_batch": best * 1e3, "gflops": gflops,
                                "fraction_of_matmul_peak": gflops / peak}
  # Batch-1 latency (all iterations, Ts = -inf): masked cascade and the selective path.
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
  row["batch1_latency"] = lat
  if _TRAIN_BATCH.value:
    b = _TRAIN_BATCH.value
    images, init, target = synthetic_inputs(cfg, b)
    opt, step = make_train_step(cfg, init, CORNERS[cfg.num_landmarks])
    state = [jax.tree.map(jnp.copy, params), None]
    state[1] = opt.init(state[0])

    def one():
      state[0], state[1], loss = step(state[0], state[1], images, target)
      return loss
    best, med = timed(lambda: one(), repeats=_TRAIN_REPEATS.value)
    row["train_step"] = {"batch": b, "samples_per_s": b / best,
                         "samples_per_s_median": b / med, "s_per_step": best,
                         "gflops": 3 * 2 * macs * b / best / 1e9}
  return row


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
  on_gpu = info["platform"] == "gpu"
  batch_sizes = ([int(x) for x in _BATCH_SIZES.value] if _BATCH_SIZES.value
                 else [1, 64, 4096] if on_gpu else [1, 64])
  peak = matmul_peak(on_gpu, _REPEATS.value)
  print(f"device: {info['name']} ({info['platform']}); matmul peak {peak:.1f} GFLOP/s")
  result = {"device": info, "matmul_peak_gflops": peak,
            "weights": "trained" if _PARAMS_NPZ.value else "synthetic (random init)",
            "settings": {"batch_sizes": batch_sizes, "repeats": _REPEATS.value,
                         "latency_samples": _LATENCY_SAMPLES.value,
                         "train_batch": _TRAIN_BATCH.value, "dtype": "float32"},
            "variants": {}, "early_exit": {}}
  for name in _VARIANTS.value:
    row = bench_variant(name, batch_sizes, peak, on_gpu)
    result["variants"][name] = row
    inf = "  ".join(f"b{b}: {row['inference'][str(b)]['faces_per_s']:8.1f}/s "
                    f"({100 * row['inference'][str(b)]['fraction_of_matmul_peak']:4.1f}%)"
                    for b in batch_sizes)
    lat = row["batch1_latency"]
    print(f"{name:>6} {row['mmacs']:6.1f} MMACs | {inf} | b1 p50/p90 masked "
          f"{lat['run_cascade_jit']['p50_ms']:.2f}/{lat['run_cascade_jit']['p90_ms']:.2f} ms, "
          f"selective {lat['selective_f32']['p50_ms']:.2f}/{lat['selective_f32']['p90_ms']:.2f}"
          + (f", bf16 {lat['selective_bf16_fc_weights']['p50_ms']:.2f}"
             if "selective_bf16_fc_weights" in lat else "")
          + (f" | train b{row['train_step']['batch']}: "
             f"{row['train_step']['samples_per_s']:.1f} samples/s" if "train_step" in row else ""))
  for name in _EARLY_EXIT_VARIANTS.value:
    if name not in _VARIANTS.value and not _PARAMS_NPZ.value:
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
  app.run(main)
