"""The model-only speed benchmark of experiments.benchmark, flag-free: `run(BenchmarkConfig)`
returns the result dict (the entry point writes it as JSON). Imports only JAX / Flax /
Optax (never TensorFlow or data_pipelines), so it runs unchanged on a GPU machine; see
experiments/benchmark.py for what is measured and how."""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import platform
import time

from absl import app
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

SECTIONS = ("inference", "latency", "train", "early_exit")


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
  """The flags of experiments.benchmark; None = the platform's default (CPU / GPU-TPU)."""
  variants: tuple[str, ...] | None = None
  batch_sizes: tuple[int, ...] | None = None
  sections: tuple[str, ...] = SECTIONS
  compute_dtypes: tuple[str, ...] | None = None
  repeats: int = 5
  latency_samples: int = 50
  train_batches: tuple[int, ...] | None = None
  peak_size: int = 0
  train_repeats: int = 3
  early_exit_variants: tuple[str, ...] = ("68/68", "68/19")
  early_exit_batch: int = 64
  target_iterations: float = 1.5
  bf16: bool = True
  params_npz: str | None = None


def settings(config: BenchmarkConfig, on_accelerator: bool) -> BenchmarkConfig:
  """The config with the platform's defaults, checked (errors name the flag)."""
  acc = on_accelerator
  variants = config.variants or (("68/68", "68/19") if acc
                                 else ("68/68", "68/34", "68/19", "98/49"))
  for name in list(variants) + list(config.early_exit_variants):
    try:
      variant_config(name)
    except (ValueError, KeyError) as e:
      raise app.UsageError(f"--variants={name}: landmarks/patches such as 68/19 expected "
                           f"({e})") from None
  dtypes = config.compute_dtypes or (("float32", "bfloat16") if acc else ("float32",))
  bad = [d for d in dtypes if d not in config_lib.COMPUTE_DTYPES]
  if bad:
    raise app.UsageError(f"--compute_dtypes: {bad} not in {config_lib.COMPUTE_DTYPES}")
  train = config.train_batches or ((128, 1024) if acc else (128,))
  return dataclasses.replace(
      config, variants=tuple(variants), compute_dtypes=tuple(dtypes),
      batch_sizes=config.batch_sizes or ((1, 64, 4096) if acc else (1, 64)),
      train_batches=tuple(b for b in train if b > 0))


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


def matmul_peak(on_accelerator: bool, repeats: int, compute_dtype: str = "float32",
                peak_size: int = 0) -> float:
  """GFLOP/s of a large square matrix product (n = 4096 on CPU, 8192 on GPU/TPU, or
  peak_size): the rate the model's own products are compared with. bfloat16: bf16
  operands, float32 accumulation, as the model computes. Two distinct operands, the best
  of the calls."""
  n = peak_size or (8192 if on_accelerator else 4096)
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


def bench_inference(cfg, params, batch_sizes, peaks, dtypes, repeats: int) -> dict:
  """{dtype: {batch: faces/s, ...}} of the full masked cascade (`run_cascade_jit`)."""
  macs = cost.cascade_macs(cfg)
  out = {}
  for dt in dtypes:
    run = functools.partial(cascade.run_cascade_jit, config=with_dtype(cfg, dt))
    out[dt] = {}
    for b in batch_sizes:
      images, init, _ = synthetic_inputs(cfg, b)
      best, med = timed(run, params, images, init, repeats=repeats)
      gflops = 2 * macs * b / best / 1e9
      out[dt][str(b)] = {"faces_per_s": b / best, "faces_per_s_median": b / med,
                         "ms_per_batch": best * 1e3, "gflops": gflops,
                         "fraction_of_matmul_peak": gflops / peaks[dt]}
  return out


def bench_train(cfg, params, batches, dtypes, peaks, repeats: int) -> dict:
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
    for _ in range(max(1, repeats)):
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


def variant_params(cfg, params_npz: str | None):
  """Trained weights from params_npz, else the random initialisation."""
  return (load_params(cfg, params_npz) if params_npz
          else stage_net.init_stacked(jax.random.key(0), cfg))


def bench_variant(name, s: BenchmarkConfig, peaks) -> dict:
  cfg = variant_config(name)
  params = variant_params(cfg, s.params_npz)
  macs = cost.cascade_macs(cfg)
  row = {"landmarks": cfg.num_landmarks, "patches": cfg.num_patches,
         "iterations": cfg.num_stages, "mmacs": macs / 1e6,
         "mparams": cost.parameter_count(cfg) / 1e6,
         "weight_mbytes_f32": 4 * cost.parameter_count(cfg) / 2 ** 20}
  if "inference" in s.sections:
    row["inference"] = bench_inference(cfg, params, s.batch_sizes, peaks, s.compute_dtypes,
                                       s.repeats)
  if "latency" in s.sections:
    row["batch1_latency"] = bench_latency(cfg, params, s.latency_samples, s.bf16)
  if "train" in s.sections and s.train_batches:
    row["train_step"] = bench_train(cfg, params, s.train_batches, s.compute_dtypes, peaks,
                                    s.train_repeats)
  return row


def bench_latency(cfg, params, samples: int, bf16: bool) -> dict:
  """Batch-1 latency (all iterations, Ts = -inf): masked cascade and the selective path."""
  run = functools.partial(cascade.run_cascade_jit, config=cfg)
  images, init, _ = synthetic_inputs(cfg, 1)
  fast = fast_inference.FastCascade(params, cfg)
  lat = {}
  paths = {"run_cascade_jit": lambda: run(params, images, init),
           "selective_f32": lambda: fast.run(images, init)}
  if bf16:
    fast16 = fast_inference.FastCascade(params, cfg, weight_dtype=jnp.bfloat16)
    paths["selective_bf16_fc_weights"] = lambda: fast16.run(images, init)
  for key, fn in paths.items():
    jax.block_until_ready(fn())
    ts = []
    for _ in range(max(1, samples)):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      ts.append(time.perf_counter() - t0)
    ts = np.asarray(ts) * 1e3
    lat[key] = {"p50_ms": float(np.percentile(ts, 50)), "p90_ms": float(np.percentile(ts, 90)),
                "min_ms": float(ts.min())}
  if bf16:
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


def bench_early_exit(name, s: BenchmarkConfig) -> dict:
  cfg = variant_config(name)
  params = variant_params(cfg, s.params_npz)
  b = s.early_exit_batch
  images, init, _ = synthetic_inputs(cfg, b, seed=1)
  run = functools.partial(cascade.run_cascade_jit, config=cfg)
  full = run(params, images, init)
  ts, mean_it = pick_ts(np.asarray(full.errors), s.target_iterations)
  masked = run(params, images, init, ts=ts)
  fast = fast_inference.FastCascade(params, cfg)
  selective = fast.run(images, init, ts)
  same = bool(np.array_equal(np.asarray(selective.iterations), np.asarray(masked.iterations))
              and np.allclose(selective.landmarks, masked.landmarks, atol=1e-4))
  its = np.asarray(masked.iterations)
  caps = tuple(int((its > i).sum()) for i in range(1, cfg.num_stages))   # same work, budget
  full_t, _ = timed(lambda: run(params, images, init, ts=ts), repeats=s.repeats)
  sel_t, _ = timed(lambda: fast.run(images, init, ts), repeats=s.repeats)
  cap_t, _ = timed(lambda: fast.run(images, init, capacities=caps), repeats=s.repeats)
  # Batch 1: every face on its own, through the masked cascade and the selective path.
  n1 = min(b, 16)
  singles = [images[i:i + 1] for i in range(n1)]
  full1, _ = timed(lambda: [run(params, x, init, ts=ts).landmarks for x in singles],
                   repeats=max(1, s.repeats // 2))
  sel1, _ = timed(lambda: [fast.run(x, init, ts).landmarks for x in singles],
                  repeats=max(1, s.repeats // 2))
  sel_its = np.asarray([int(fast.run(x, init, ts).iterations[0]) for x in singles])
  shift = np.abs(np.asarray(masked.landmarks) - np.asarray(full.landmarks))
  return {
      "weights": "trained (--params_npz)" if s.params_npz else
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


def _print_variant(name: str, row: dict, dtypes) -> None:
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


def run(config: BenchmarkConfig) -> dict:
  """Every section of `config` on this machine: the result dict (printed as it goes)."""
  t_start = time.perf_counter()
  info = device_info()
  on_acc = info["platform"] != "cpu"
  s = settings(config, on_acc)
  peaks = {dt: matmul_peak(on_acc, s.repeats, dt, s.peak_size)
           for dt in sorted(set(s.compute_dtypes) | {"float32"})}
  print(f"device: {info['name']} ({info['platform']}); matmul peak "
        + ", ".join(f"{dt} {v:.1f}" for dt, v in peaks.items()) + " GFLOP/s", flush=True)
  result = {"device": info, "matmul_peak_gflops": peaks["float32"],
            "matmul_peak_gflops_by_dtype": peaks,
            "weights": "trained" if s.params_npz else "synthetic (random init)",
            "settings": {"variants": list(s.variants), "sections": list(s.sections),
                         "batch_sizes": list(s.batch_sizes), "repeats": s.repeats,
                         "latency_samples": s.latency_samples,
                         "train_batches": list(s.train_batches),
                         "train_repeats": s.train_repeats,
                         "compute_dtypes": list(s.compute_dtypes),
                         "one_batched_pass": cascade.one_batched_pass()},
            "variants": {}, "early_exit": {}}
  for name in s.variants:
    result["variants"][name] = bench_variant(name, s, peaks)
    _print_variant(name, result["variants"][name], s.compute_dtypes)
  for name in s.early_exit_variants if "early_exit" in s.sections else []:
    if name not in s.variants and not s.params_npz:
      continue
    ee = bench_early_exit(name, s)
    result["early_exit"][name] = ee
    print(f"early exit {name}: Ts={ee['ts']:.4g} mean iterations {ee['mean_iterations']:.2f}; "
          f"batch {ee['batch']} selective (Ts) x{ee['batched']['speedup']:.2f}, budget "
          f"{ee['capacities']} x{ee['batched']['budget_speedup']:.2f}; batch 1 selective "
          f"x{ee['batch1']['speedup']:.2f}")
  result["total_seconds"] = time.perf_counter() - t_start
  print(f"total {result['total_seconds']:.0f} s")
  return result
