r"""Training throughput as JSON: the input pipeline alone, and (--end_to_end) the train
step alone on one fixed batch vs the step fed by the pipeline, so the input pipeline
cannot hide as the bottleneck.

  python -m experiments.pipeline_benchmark --flagfile=FLAGS --output_json=PATH \
      [--num_batches=20] [--warmup_batches=3] [--end_to_end]

Prints {"samples_per_sec": ..., ...} and writes it to --output_json when given. Data
preparation, compilation and the first (warm-up) batches are not timed.
"""
from __future__ import annotations

import os
import time

from absl import flags
from absl import logging

from data_pipelines import flags as data_flags
from data_pipelines import input_pipeline
from experiments import common  # shared flags, flagfile lookup
from experiments import config_flags
from musica_jax import strict_json

_OUTPUT_JSON = flags.DEFINE_string("output_json", "", "Where to write the JSON result.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 20, "Timed batches.")
_WARMUP = flags.DEFINE_integer("warmup_batches", 3, "Untimed batches first.")
_END_TO_END = flags.DEFINE_boolean("end_to_end", False, "Also time the train step alone and "
                                   "fed by the pipeline (the model flags of the flagfile).")


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


def end_to_end(cfg, num_batches: int, warmup: int) -> dict:
  """Train-step samples/s on one fixed batch, and with the pipeline feeding every step."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax
  from musica_jax import parallel, schemes, training
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
  for _ in range(warmup):
    state, m = step(state, fixed, init_shape)
  jax.block_until_ready(m)

  def timed(get_batch):
    nonlocal state
    t = time.perf_counter()
    for _ in range(num_batches):
      state, m = step(state, get_batch(), init_shape)
    jax.block_until_ready(m)
    return cfg.batch_size * num_batches / (time.perf_counter() - t)

  alone = timed(lambda: fixed)
  fed = timed(lambda: parallel.shard_batch(next(it), mesh))
  return {"train_step_alone_samples_per_sec": alone, "end_to_end_samples_per_sec": fed,
          "end_to_end_slowdown": 1.0 - fed / alone, "landmarks": model_cfg.num_landmarks,
          "patches": model_cfg.num_patches, "device": str(jax.devices()[0].device_kind)}


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  cfg = data_flags.config_from_flags()
  result = benchmark(cfg, _NUM_BATCHES.value, _WARMUP.value)
  if _END_TO_END.value:
    result.update(end_to_end(cfg, _NUM_BATCHES.value, _WARMUP.value))
  text = strict_json.dumps(result)
  print(text)
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  common.run(main)
