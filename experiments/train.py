r"""Trains a MuSiCa cascade.

  python -m experiments.train --flagfile=wflw98.flags --data_dir=/data/WFLW --workdir=/ckpt/wflw98

Flagfiles live in experiments/configs/ (looked up there when not found in the working
directory); flags after the flagfile override it. A run restarted on the same --workdir
resumes from its latest checkpoint with the same data order. See WORKSPACE.md.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import sys
import time

# TensorFlow (input pipeline only) must never take the accelerators from JAX.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from data_pipelines import flags as data_flags
from data_pipelines import input_pipeline
from experiments import common
from experiments import eval_lib
from musica_jax import checkpoints
from musica_jax import parallel
from musica_jax import schemes
from musica_jax import training

FLAGS = flags.FLAGS
flags.mark_flag_as_required("workdir")


def initialise_distributed() -> None:
  """--distributed: auto-detected cluster, the manual flags, or one process."""
  try:
    how = parallel.initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address,
                                          FLAGS.num_processes, FLAGS.process_id)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  logging.info("distributed: %s", how)


def train_config_from_flags() -> training.TrainConfig:
  if FLAGS.steps <= 0:
    raise app.UsageError(f"--steps must be positive, got {FLAGS.steps}")
  return training.TrainConfig(steps=FLAGS.steps, learning_rate=FLAGS.learning_rate,
                              decay_steps=FLAGS.decay_steps, decay_factor=FLAGS.decay_factor,
                              ema_decay=FLAGS.ema_decay, seed=FLAGS.seed,
                              compute_dtype=FLAGS.compute_dtype)


class MetricWriter:
  """Progress to metrics.jsonl (always) and TensorBoard event files (process 0)."""

  def __init__(self, workdir):
    self.enabled = jax.process_index() == 0
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if self.enabled:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._tb = tf.summary.create_file_writer(str(pathlib.Path(workdir) / "tensorboard"))

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    with self.path.open("a") as f:
      f.write(json.dumps({"step": step, **values}) + "\n")
    with self._tb.as_default(step=step):
      for k, v in values.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._tf.summary.scalar(k, v)
    self._tb.flush()


def say(message: str) -> None:
  """A progress line on the console of process 0 (the others stay quiet)."""
  if jax.process_index() == 0:
    print(message, flush=True)


def _fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def train_and_evaluate(model_cfg, train_cfg, data_cfg, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint in `workdir`) and evaluates at the end."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  scheme = schemes.get_scheme(data_cfg.num_points)
  previous = None
  if (pathlib.Path(workdir) / common.RUN_CONFIG).exists():
    previous = common.load_run_config(workdir)
    if previous["model_config"] != model_cfg:
      raise app.UsageError(f"--workdir={workdir} holds a run with a different model "
                           f"({previous['model_config']}); use a new workdir or the same "
                           f"model flags")
    if previous["data"] != dataclasses.asdict(data_cfg):
      say(f"note: the data flags differ from the run in {workdir}; the resumed data "
          f"stream will not be the one of an uninterrupted run")

  if jax.process_count() > 1:
    # Process 0 prepares the dataset and its statistics first; the others then find them
    # ready in a shared --tfds_dir (or prepare their own copy on a host-local disk).
    if jax.process_index() == 0:
      input_pipeline.dataset_statistics(data_cfg)
    multihost_utils.sync_global_devices("musica: data prepared")
  if previous is not None:
    # The initial shape is part of the model: a resumed run keeps the one it started with.
    mean_shape = previous["mean_shape"]
  else:
    mean_shape = np.asarray(input_pipeline.dataset_statistics(data_cfg)["mean_shape"],
                            np.float32)
  if jax.process_index() == 0:
    common.save_run_config(workdir, model_cfg, data_cfg, train_cfg, mean_shape)

  mesh = parallel.make_mesh()
  parallel.check_batch_size(data_cfg.batch_size)
  rep = parallel.replicated(mesh)
  state = jax.jit(functools.partial(training.create_train_state, model_cfg, train_cfg),
                  out_shardings=rep)()
  ckpts = checkpoints.Checkpoints(workdir, keep=FLAGS.keep_checkpoints)
  if ckpts.latest_step() is not None:
    state = ckpts.restore(state)
    logging.info("resumed from step %d (%s)", int(state.step), ckpts.directory)
    say(f"resumed from checkpoint at step {int(state.step)}")
  start = int(state.step)
  init_shape = jax.device_put(jnp.asarray(mean_shape), rep)

  step_fn = jax.jit(
      functools.partial(training.train_step, model_cfg=model_cfg, train_cfg=train_cfg,
                        scheme=scheme),
      in_shardings=(rep, parallel.batch_sharding(mesh), rep), out_shardings=(rep, rep),
      donate_argnums=(0,))
  writer = MetricWriter(workdir)
  batches = input_pipeline.train_iterator(data_cfg, start_step=start,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count())

  def evaluate(step):
    per_face = eval_lib.run_split(state.ema_params, data_cfg, data_cfg.eval_split, model_cfg,
                                  scheme, mean_shape, mesh)
    summary = eval_lib.summarise(per_face)
    say(f"eval step {step} {data_cfg.eval_split}: faces {summary['faces']} "
        f"NME inter-ocular {summary['nme_interocular']:.2f}% inter-pupil "
        f"{summary['nme_interpupil']:.2f}% (mean shape "
        f"{summary['mean_shape_baseline']['nme_interocular']:.2f}%)")
    writer.write(step, {f"eval/{k}": v for k, v in summary.items() if isinstance(v, float)})
    return summary

  def check_finite(step):
    bad = int(state.nonfinite_steps)
    if bad:
      last = ckpts.latest_step()
      raise FloatingPointError(
          f"non-finite loss or gradient at or before step {step}: training stopped. "
          f"The update was not applied and nothing was saved; the last good checkpoint is "
          f"step {last} in {ckpts.directory}. Lower --learning_rate or check the data.")

  t0, s0 = time.perf_counter(), start
  samples_per_step = data_cfg.batch_size
  summary = None
  say(f"training {model_cfg.num_landmarks} landmarks / {model_cfg.num_patches} patches on "
      f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
      f"{jax.process_count()} process(es); steps {start} -> {train_cfg.steps}")
  for step in range(start + 1, train_cfg.steps + 1):
    batch = parallel.shard_batch(next(batches), mesh)
    state, m = step_fn(state, batch, init_shape)
    last = step == train_cfg.steps
    if step % FLAGS.log_every == 0 or last:
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      check_finite(step)
      now = time.perf_counter()
      interval_s = now - t0                    # since the last log line (eval included)
      rate = (step - s0) / max(interval_s, 1e-9)
      t0, s0 = now, step
      eta = (train_cfg.steps - step) / max(rate, 1e-9)
      say(f"step {step}/{train_cfg.steps} loss {m['loss']:.4f} NME {m['nme'] * 100:.2f}% "
          f"lr {m['learning_rate']:.2e} {rate:.2f} steps/s "
          f"{rate * samples_per_step:.1f} samples/s ETA {_fmt_time(eta)}")
      writer.write(step, {**{f"train/{k}": v for k, v in m.items()},
                          "train/steps_per_s": rate, "train/samples_per_s": rate * samples_per_step,
                          "train/interval_s": interval_s})
    evaluated = None
    if FLAGS.eval_every >= 0 and ((FLAGS.eval_every and step % FLAGS.eval_every == 0) or last):
      summary = evaluate(step)
      evaluated = summary["nme_interocular"]
    if step % FLAGS.checkpoint_every == 0 or last or evaluated is not None:
      check_finite(step)
      ckpts.save(step, state, eval_nme=evaluated)
  ckpts.wait()
  ckpts.close()
  if summary is None and FLAGS.eval_every >= 0:  # resumed at the final step
    summary = evaluate(int(state.step))
  return summary


def main(argv):
  common.start(argv)
  initialise_distributed()
  try:
    data_cfg = data_flags.config_from_flags()
  except ValueError as e:   # a data flag out of range or inconsistent: one line
    print(f"train: error: {e}", file=sys.stderr)
    sys.exit(1)
  model_cfg = common.model_config_from_flags(data_cfg.num_points)
  train_cfg = train_config_from_flags()
  train_and_evaluate(model_cfg, train_cfg, data_cfg, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, argv=common.resolve_flagfiles(sys.argv))
