r"""Training throughput as JSON: the input pipeline alone, and (--end_to_end) the train
step alone on one fixed batch vs the step fed by the pipeline, so the input pipeline
cannot hide as the bottleneck.

  python -m experiments.pipeline_benchmark --flagfile=FLAGS --output_json=PATH \
      [--num_batches=20] [--warmup_batches=3] [--end_to_end [--rounds=2]]

Prints {"samples_per_sec": ..., ...} and writes it to --output_json when given. Data
preparation, compilation and the first (warm-up) batches are not timed.
"""
from __future__ import annotations

import os
import time

from absl import flags
from absl import logging

from data_pipelines import input_pipeline
from experiments import common  # shared flags, flagfile lookup
from experiments import config_flags
from musica_jax import host_memory
from musica_jax import strict_json

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when run as a program)."""
  d = common.define_flag
  d("string", "output_json", "", "Where to write the JSON result.")
  d("integer", "num_batches", 20, "Timed batches.")
  d("integer", "warmup_batches", 3, "Untimed batches first.")
  d("integer", "rounds", 2, "--end_to_end: the step alone and fed in this many "
    "alternations (num_batches steps each in all), so that the drift of a shared machine "
    "falls on both.")
  d("boolean", "end_to_end", False, "Also time the train step alone and fed by the "
    "pipeline (the model flags of the flagfile).")


def benchmark(cfg, num_batches: int, warmup: int) -> dict:
  t0 = time.perf_counter()
  it = input_pipeline.train_iterator(cfg)
  for _ in range(warmup):
    next(it)
  startup = time.perf_counter() - t0
  t1 = time.perf_counter()
  n = 0
  for _ in range(num_batches):
    n += len(next(it)["image"])
  dt = time.perf_counter() - t1
  return {"samples_per_sec": n / dt, "batches_per_sec": num_batches / dt,
          "batch_size": cfg.batch_size, "num_batches": num_batches, "seconds": dt,
          "startup_seconds": startup, "dataset": cfg.dataset, "train_split": cfg.train_split,
          "balancing": cfg.balancing, "augment": cfg.augment,
          "num_parallel_calls": cfg.num_parallel_calls, "cpu_count": os.cpu_count()}


def end_to_end(cfg, num_batches: int, warmup: int, rounds: int = 2) -> dict:
  """Train-step samples/s on one fixed batch, and with the pipeline feeding every step
  (num_batches steps each, in `rounds` alternations)."""
  import functools  # noqa: PLC0415
  import jax  # noqa: PLC0415  (JAX after TensorFlow's set-up)
  from musica_jax import parallel, schemes, training  # noqa: PLC0415
  model_cfg = config_flags.model_config_from_flags(cfg.num_points)
  train_cfg = training.TrainConfig()
  mesh = parallel.make_mesh()
  rep = parallel.replicated(mesh)
  init_shape = jax.device_put(input_pipeline.dataset_statistics(cfg)["mean_shape"], rep)
  state = jax.device_put(training.create_train_state(model_cfg, train_cfg), rep)
  step = jax.jit(functools.partial(training.train_step, model_cfg=model_cfg,
                                   train_cfg=train_cfg, scheme=schemes.get_scheme(cfg.num_points)),
                 in_shardings=(rep, parallel.batch_sharding(mesh), rep),
                 out_shardings=(rep, rep), donate_argnums=(0,))
  it = input_pipeline.train_iterator(cfg)
  fixed = parallel.shard_batch(next(it), mesh)
  for _ in range(warmup):   # both ways: the first fed steps also grow buffers and heap
    state, m = step(state, fixed, init_shape)
  for _ in range(warmup):
    state, m = step(state, parallel.shard_batch(next(it), mesh), init_shape)
  jax.block_until_ready(m)

  def timed(get_batch, steps):
    nonlocal state
    t = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, get_batch(), init_shape)
    jax.block_until_ready(m)
    return time.perf_counter() - t

  # The two in alternation, `rounds` times: drift of a shared machine falls on both.
  per_round = max(1, num_batches // rounds)
  alone_s, fed_s = [], []
  for _ in range(rounds):
    alone_s.append(timed(lambda: fixed, per_round))
    fed_s.append(timed(lambda: parallel.shard_batch(next(it), mesh), per_round))
  samples = cfg.batch_size * per_round * rounds
  alone, fed = samples / sum(alone_s), samples / sum(fed_s)
  return {"train_step_alone_samples_per_sec": alone, "end_to_end_samples_per_sec": fed,
          "end_to_end_slowdown": 1.0 - fed / alone,
          "end_to_end_slowdown_per_round": [1.0 - a / f for a, f in zip(alone_s, fed_s)],
          "end_to_end_steps": per_round * rounds, "landmarks": model_cfg.num_landmarks,
          "patches": model_cfg.num_patches, "device": str(jax.devices()[0].device_kind)}


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  host_memory.keep_large_buffers()   # as training does (train_lib): XLA's big buffers
  cfg = config_flags.data_config_from_flags()
  result = benchmark(cfg, FLAGS.num_batches, FLAGS.warmup_batches)
  if FLAGS.end_to_end:
    result.update(end_to_end(cfg, FLAGS.num_batches, FLAGS.warmup_batches, FLAGS.rounds))
  text = strict_json.dumps(result)
  print(text)
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  define_flags()
  common.run(main)
