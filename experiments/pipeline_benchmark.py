r"""Throughput of the training input pipeline alone (no model), as JSON.

  python -m experiments.pipeline_benchmark --flagfile=FLAGS --output_json=PATH \
      [--num_batches=20] [--warmup_batches=3]

Prints {"samples_per_sec": ..., ...} and writes it to --output_json when given. Data
preparation and the first (warm-up) batches are not timed.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

from data_pipelines import flags as data_flags
from data_pipelines import input_pipeline
from experiments import common  # shared flags, flagfile lookup

_OUTPUT_JSON = flags.DEFINE_string("output_json", "", "Where to write the JSON result.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 20, "Timed batches.")
_WARMUP = flags.DEFINE_integer("warmup_batches", 3, "Untimed batches first.")


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


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  cfg = data_flags.config_from_flags()
  result = benchmark(cfg, _NUM_BATCHES.value, _WARMUP.value)
  text = json.dumps(result)
  print(text)
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main, argv=common.resolve_flagfiles(sys.argv))
