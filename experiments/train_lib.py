"""Training and evaluation of a MuSiCa cascade, flag-free: `train_and_evaluate(config, workdir)`.

The entry point experiments/train.py turns flags into a `Config`; tests and scripts call
`train_and_evaluate` directly. A run restarted on the same workdir resumes from its latest
intact checkpoint with the same data order (the input stream is a pure function of seed
and step). Process 0 holds the workdir's lock for the whole run; a non-finite step or a
diverging loss stops the run with one line and saves nothing more (WORKSPACE.md,
"Guarantees"). Errors meant for the user are `common.UserError` / `app.UsageError`,
naming the flag or file.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import shutil
import time

from absl import app
from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from data_pipelines import config as data_config
from data_pipelines import datasets
from data_pipelines import input_pipeline
from data_pipelines import readers
from experiments import common
from experiments import eval_lib
from musica_jax import atomic_io
from musica_jax import checkpoints
from musica_jax import config as config_lib
from musica_jax import factorise
from musica_jax import host_memory
from musica_jax import model_io
from musica_jax import parallel
from musica_jax import run_config
from musica_jax import schemes
from musica_jax import strict_json
from musica_jax import training


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a training run reads: model, optimisation, data and loop cadence."""
  model: config_lib.ModelConfig
  train: config_lib.TrainConfig
  data: data_config.DataConfig
  loop: config_lib.LoopConfig = dataclasses.field(default_factory=config_lib.LoopConfig)


class MetricWriter:
  """Progress to metrics.jsonl (always) and TensorBoard event files (process 0).

  One record per (step, kind) ("train" or "eval": the prefix of its keys). A run resumed
  from the checkpoint of step S first drops the records of steps after S (logged by the
  killed run after its last checkpoint; those steps run again) and any line a kill cut
  short, and says how many; a record written again for a (step, kind) already in the
  file (the final evaluation of a run resumed at its last step) replaces the old one. So
  no step repeats, whatever the kills."""

  def __init__(self, workdir, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    self._seen = set()
    if self.enabled:
      self._keep_up_to(int(resume_step))
      import tensorflow as tf  # noqa: PLC0415
      self._tf = tf
      self._tb = tf.summary.create_file_writer(str(pathlib.Path(workdir) / "tensorboard"))

  @staticmethod
  def _kind(record: dict) -> str:
    return ",".join(sorted({k.split("/")[0] for k in record if k != "step"}))

  def _records(self) -> tuple[list[dict], int]:
    """(the records of the file, the number of lines that are not a record)."""
    if not self.path.is_file():
      return [], 0
    records, bad = [], 0
    for line in self.path.read_text().splitlines():
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
        int(rec["step"])
      except (ValueError, KeyError, TypeError):
        bad += 1                    # a line a kill cut short
        continue
      records.append(rec)
    return records, bad

  def _rewrite(self, records: list[dict]) -> None:
    atomic_io.write_text(self.path, "".join(strict_json.dumps(r) + "\n" for r in records))

  def _keep_up_to(self, step: int) -> None:
    records, bad = self._records()
    kept = [r for r in records if int(r["step"]) <= step]
    dropped = len(records) - len(kept)
    if dropped or bad:
      self._rewrite(kept)
      say(f"note: {self.path}: dropped {dropped} record(s) of steps after {step} (logged "
          f"after the last checkpoint; those steps run again)"
          + (f" and {bad} incomplete line(s)" if bad else ""))
    self._seen = {(int(r["step"]), self._kind(r)) for r in kept}

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    record = {"step": step, **values}
    key = (int(step), self._kind(record))
    if key in self._seen:           # the same step and kind again: replace it
      records, _ = self._records()
      self._rewrite([r for r in records
                     if (int(r["step"]), self._kind(r)) != key] + [record])
    else:
      with self.path.open("a") as f:
        f.write(strict_json.dumps(record) + "\n")
      self._seen.add(key)
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


def train_and_evaluate(config: Config, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint in `workdir`) and evaluates at the end;
  returns the last evaluation summary (None with eval_every=-1).

  Process 0 holds the workdir's lock (`checkpoints.WorkdirLock`) for the whole run: a
  second run on the same workdir stops at once with one line. A run that fails before
  its first step removes the workdir if it created it."""
  host_memory.keep_large_buffers()     # XLA's big buffers: no fresh mmap per step
  workdir = os.path.abspath(workdir)
  created = not os.path.exists(workdir)
  ready = []              # set once the training loop starts
  lock = checkpoints.WorkdirLock(workdir) if jax.process_index() == 0 else None
  try:
    os.makedirs(workdir, exist_ok=True)
    if lock is not None:
      note = lock.acquire()
      if note:
        say(f"note: {note}")
    if not created:
      check_steps_vs_checkpoints(workdir, config.train.steps)
    return _train_and_evaluate(config, workdir, lambda: ready.append(True))
  except checkpoints.WorkdirInUseError as e:
    lock = None           # not ours: leave its file alone
    raise common.UserError(str(e)) from None
  except readers.DataError as e:
    raise common.UserError(f"{e} (use --skip_bad to count and skip bad items)") from None
  except checkpoints.DamagedCheckpointError as e:
    raise common.UserError(str(e)) from None
  finally:
    if lock is not None:
      lock.release()
      if created and not ready:
        shutil.rmtree(workdir, ignore_errors=True)


def newest_checkpoint(workdir: str) -> int | None:
  """The step of the newest checkpoint folder in `workdir` (None: none; a run there
  starts afresh)."""
  directory = pathlib.Path(workdir) / "checkpoints"
  return max((int(p.name) for p in directory.glob("*") if p.name.isdigit()), default=None)


def check_steps_vs_checkpoints(workdir: str, steps: int) -> None:
  """--steps below the newest checkpoint would train nothing: a usage error."""
  directory = pathlib.Path(workdir) / "checkpoints"
  newest = newest_checkpoint(workdir)
  if newest is not None and newest > steps:
    raise app.UsageError(f"--steps={steps} is below the newest checkpoint (step {newest}) "
                         f"in {directory}: nothing to train; give --steps > {newest} to "
                         f"continue, or a new --workdir")


def load_init(source: str, model_cfg: config_lib.ModelConfig):
  """The initial parameters of a new run from the model `source` (TrainConfig.init_from:
  a model directory, 'default' or a workdir, `model_io.load`), converted to `model_cfg`
  (`factorise.convert_params`: only recurrent_rank may differ, the patch set may
  grow or shrink and the levels change). Returns (float32 numpy parameters, the source's mean
  shape, the record for run_config.json's "init_from" section). A bad source or a
  config that differs is a UserError naming --init_from."""
  try:
    loaded = model_io.load(source)
    params, info = factorise.convert_params(loaded.params, loaded.model_config, model_cfg)
  except (OSError, ValueError) as e:      # missing, damaged, unreadable, different model
    raise common.UserError(f"--init_from={source}: {e}") from None
  record = {"source": source, "path": str(pathlib.Path(loaded.path).resolve()),
            "param_dtype": loaded.dtype, **info}
  if loaded.from_workdir:
    record["checkpoint_step"] = loaded.metadata.get("checkpoint_step")
  return params, loaded.mean_shape, record


def _describe_init(record: dict) -> str:
  how = record["recurrent"]
  if how in ("factorised", "refactorised"):
    errors = ", ".join(f"{e:.3f}" for e in record["relative_error"])
    how = (f"recurrent kernels {how} at rank {record['recurrent_rank']} (truncated SVD, "
           f"relative Frobenius error per stage {errors})")
  elif how == "densified":
    how = "recurrent factors multiplied into dense kernels"
  else:
    how = "all parameters copied"
  if record.get("new_patches"):
    how += (f"; {len(record['new_patches'])} new patches (landmarks "
            f"{record['new_patches']}) start with zero recurrent weights")
  if record.get("dropped_patches"):
    how += (f"; {len(record['dropped_patches'])} patches dropped (landmarks "
            f"{record['dropped_patches']}): fine-tune after")
  if record.get("levels"):
    how += (f"; pyramid levels {tuple(record['levels']['source'])} -> "
            f"{tuple(record['levels']['new'])}")
  return f"initialised from {record['source']} ({record['path']}): {how}"


def data_flags_differ(recorded, data_cfg: data_config.DataConfig) -> bool:
  """Whether a workdir's recorded data section (run_config "data") differs from data_cfg.
  A field the record predates counts as its default, which is the behaviour from before
  the field existed (e.g. --lowres_prob=0), so resuming an older run with the same flags
  is no change."""
  if not isinstance(recorded, dict):
    return True
  return {**dataclasses.asdict(data_config.DataConfig()), **recorded} != dataclasses.asdict(
      data_cfg)


def _train_and_evaluate(config: Config, workdir: str, on_start) -> dict:
  model_cfg, train_cfg, data_cfg = config.model, config.train, config.data
  scheme = schemes.get_scheme(data_cfg.num_points)
  previous = None
  if run_config.path(workdir).exists():
    try:
      previous = run_config.load(workdir)
    except ValueError as e:       # not JSON, a cut or edited file: one line naming it
      raise common.UserError(f"--workdir={workdir}: {e}; restore the file, or train in a "
                             f"new --workdir") from None
    if previous["model_config"] != model_cfg:
      raise app.UsageError(f"--workdir={workdir} holds a run with a different model "
                           f"({previous['model_config']}); use a new workdir or the same "
                           f"model flags")
    if data_flags_differ(previous.get("data"), data_cfg):
      say(f"note: the data flags differ from the run in {workdir}; the resumed data "
          f"stream will not be the one of an uninterrupted run")
  # --init_from applies to a run that starts afresh; a resumed run keeps the record of
  # the weights it started from (and says so when the flag names another model).
  init, extra = None, {}
  if newest_checkpoint(workdir) is not None:
    started_from = (previous or {}).get("train", {}).get("init_from", "")
    if train_cfg.init_from and train_cfg.init_from != started_from:
      say(f"note: --init_from={train_cfg.init_from} ignored: resuming from the checkpoints "
          f"in {workdir}" + (f" (the run started from {started_from})" if started_from else ""))
    train_cfg = dataclasses.replace(train_cfg, init_from=started_from)
    if previous is not None and "init_from" in previous:
      extra["init_from"] = previous["init_from"]
  elif train_cfg.init_from:
    init_params, init_mean, extra["init_from"] = load_init(train_cfg.init_from, model_cfg)
    if jax.process_count() > 1:   # every process starts from process 0's bits (SVD, BLAS)
      init_params = multihost_utils.broadcast_one_to_all(init_params)
    init = init_params

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
  if init is not None:
    shift = float(np.abs(np.asarray(init_mean) - mean_shape).max())
    extra["init_from"]["mean_shape_max_shift_px"] = round(shift, 3)
    say(f"{_describe_init(extra['init_from'])}; the initial shape is this run's training "
        f"mean shape (at most {shift:.2f} px from the source's)")
  if jax.process_index() == 0:
    report_skips(data_cfg)
    run_config.save(workdir, model_cfg, data_cfg, train_cfg, mean_shape, loop=config.loop,
                    **extra)

  mesh = parallel.make_mesh()
  parallel.check_batch_size(data_cfg.batch_size)
  rep = parallel.replicated(mesh)
  state = jax.jit(functools.partial(training.create_train_state, model_cfg, train_cfg),
                  out_shardings=rep)()
  if init is not None:
    # Two transfers: params and EMA must be separate buffers (the state is donated).
    state = state.replace(params=parallel.replicate(init, mesh),
                          ema_params=parallel.replicate(init, mesh))
  ckpts = checkpoints.Checkpoints(workdir, keep=config.loop.keep_checkpoints)
  try:
    return _resume_and_train(config, workdir, on_start, ckpts, scheme, mean_shape, mesh, rep,
                             state)
  except BaseException:
    try:              # drain orbax's writer threads before the error line
      ckpts.close()
    except Exception:  # noqa: BLE001 - the first error is the one to report
      pass
    raise


def _resume_and_train(config: Config, workdir, on_start, ckpts, scheme, mean_shape, mesh, rep,
                      state) -> dict:
  model_cfg, train_cfg, data_cfg, loop = config.model, config.train, config.data, config.loop
  if ckpts.latest_step() is not None:
    damaged = []
    state = ckpts.restore(state, on_skip=lambda s, why: damaged.append((s, why)))
    for s, why in damaged:   # set aside so this run can save those steps again
      where = ckpts.set_aside(s) if jax.process_index() == 0 else "damaged_checkpoints/"
      say(f"warning: checkpoint step {s} is damaged ({why}); moved to {where}")
    if damaged and jax.process_count() > 1:
      multihost_utils.sync_global_devices("musica: damaged checkpoints set aside")
      ckpts.reload()
    logging.info("resumed from step %d (%s)", int(state.step), ckpts.directory)
    say(f"resumed from checkpoint at step {int(state.step)}")
  start = int(state.step)
  init_shape = jax.device_put(jnp.asarray(mean_shape), rep)

  step_fn = jax.jit(
      functools.partial(training.train_step, model_cfg=model_cfg, train_cfg=train_cfg,
                        scheme=scheme),
      in_shardings=(rep, parallel.batch_sharding(mesh), rep), out_shardings=(rep, rep),
      donate_argnums=(0,))
  writer = MetricWriter(workdir, resume_step=start)
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

  guard = training.DivergenceGuard(loop.divergence_factor)
  pending = []            # (step, loss on device) not yet seen by the guard

  def check_finite(step):
    """Stops (one line, nothing saved) on a non-finite step or a diverged loss."""
    bad = int(state.nonfinite_steps)
    if bad:
      last = ckpts.latest_step()
      raise common.UserError(
          f"non-finite loss or gradient at or before step {step}: training stopped. "
          f"The update was not applied and nothing was saved; the last good checkpoint is "
          f"step {last} in {ckpts.directory}. Lower --learning_rate or check the data.")
    losses = jax.device_get([loss for _, loss in pending])
    for (s, _), loss in zip(pending, losses):
      guard.update(s, float(loss))
    pending.clear()
    if guard.diverged_at is not None:
      ckpts.wait()
      raise common.UserError(
          f"training stopped: {guard.message()}. Nothing was saved after step "
          f"{guard.diverged_at - 1}; the newest checkpoint is step {ckpts.latest_step()} "
          f"in {ckpts.directory}. Lower --learning_rate.")

  t0, s0 = time.perf_counter(), start
  samples_per_step = data_cfg.batch_size
  summary = None
  say(f"training {model_cfg.num_landmarks} landmarks / {model_cfg.num_patches} patches on "
      f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
      f"{jax.process_count()} process(es); steps {start} -> {train_cfg.steps}")
  on_start()
  for step in range(start + 1, train_cfg.steps + 1):
    batch = parallel.shard_batch(next(batches), mesh)
    state, m = step_fn(state, batch, init_shape)
    pending.append((step, m["loss"]))
    last = step == train_cfg.steps
    if step % loop.log_every == 0 or last:
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
    if loop.eval_every >= 0 and ((loop.eval_every and step % loop.eval_every == 0) or last):
      summary = evaluate(step)
      evaluated = summary["nme_interocular"]
    if step % loop.checkpoint_every == 0 or last or evaluated is not None:
      check_finite(step)
      ckpts.save(step, state, eval_nme=evaluated)
  ckpts.wait()
  ckpts.close()
  if summary is None and loop.eval_every >= 0:  # resumed at the final step
    summary = evaluate(int(state.step))
  return summary


def report_skips(data_cfg) -> None:
  """One line when the data preparation skipped bad items (--skip_bad)."""
  skipped = datasets.report(data_cfg).get("skipped", [])
  if skipped:
    counts = readers.SkipLog(skipped).counts()
    say(f"data: skipped {len(skipped)} bad item(s) of {data_cfg.data_dir} "
        f"({', '.join(f'{k}: {v}' for k, v in counts.items())}); listed in "
        f"{datasets.builder_config(data_cfg).report_path}")
