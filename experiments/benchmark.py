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

from absl import app
from absl import flags

from experiments import benchmark_lib
from experiments import common

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when run as a program)."""
  d = common.define_flag
  d("string", "output_json", None, "Where to write the JSON results.")
  d("list", "variants", None, "Variants landmarks/patches ('tiny': a small test model). "
    "Default 68/68,68/34,68/19,98/49 on CPU, 68/68,68/19 on GPU/TPU.")
  d("list", "batch_sizes", None, "Inference batch sizes (default 1,64; 1,64,4096 on GPU/TPU).")
  d("multi_enum", "sections", list(benchmark_lib.SECTIONS), "What to measure.",
    enum_values=list(benchmark_lib.SECTIONS))
  d("list", "compute_dtypes", None, "Compute dtypes of the inference and training "
    "measurements (float32, bfloat16; default float32 on CPU, float32,bfloat16 on GPU/TPU).")
  d("integer", "repeats", 5, "Timed calls per measurement (after warm-up).")
  d("integer", "latency_samples", 50, "Batch-1 calls for p50/p90.")
  d("list", "train_batch", None, "Training-step batches (default 128; 128,1024 on GPU/TPU; "
    "0: skip).")
  d("integer", "peak_size", 0, "Side of the square matrix product of the peak probe (0: "
    "4096 on CPU, 8192 on GPU/TPU; a 2048 product reads half the peak on the 2-core "
    "development CPU).")
  d("integer", "train_repeats", 3, "Timed training steps.")
  d("list", "early_exit_variants", ["68/68", "68/19"], "Variants for the early-exit section.")
  d("integer", "early_exit_batch", 64, "Faces in the early-exit set.")
  d("float", "target_iterations", 1.5, "Mean iterations at which Ts is chosen.")
  d("bool", "bf16", True, "Also time the batch-1 selective path with bf16 FC weights.")
  d("string", "params_npz", None, "Optional trained weights (one variant): an .npz of the "
    "stacked parameter tree with keys like 'recurrent/kernel'.")


def config_from_flags() -> benchmark_lib.BenchmarkConfig:
  ints = lambda values: tuple(int(x) for x in values) if values else None
  try:
    batch_sizes, train_batches = ints(FLAGS.batch_sizes), ints(FLAGS.train_batch)
  except ValueError as e:
    raise app.UsageError(f"--batch_sizes/--train_batch: integers expected ({e})") from None
  tup = lambda values: tuple(values) if values else None
  return benchmark_lib.BenchmarkConfig(
      variants=tup(FLAGS.variants), batch_sizes=batch_sizes, sections=tuple(FLAGS.sections),
      compute_dtypes=tup(FLAGS.compute_dtypes), repeats=FLAGS.repeats,
      latency_samples=FLAGS.latency_samples, train_batches=train_batches,
      peak_size=FLAGS.peak_size, train_repeats=FLAGS.train_repeats,
      early_exit_variants=tuple(FLAGS.early_exit_variants),
      early_exit_batch=FLAGS.early_exit_batch, target_iterations=FLAGS.target_iterations,
      bf16=FLAGS.bf16, params_npz=FLAGS.params_npz)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  result = benchmark_lib.run(config_from_flags())
  if FLAGS.output_json:
    common.write_json(FLAGS.output_json, result)


if __name__ == "__main__":
  define_flags()
  common.run(main)
