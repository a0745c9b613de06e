"""Checkpoints with orbax: atomic, asynchronous, the last N kept plus the best by eval NME.

Orbax writes each step into a temporary directory and renames it when complete, so a
run killed mid-save leaves the previous checkpoints intact; `latest_step()` only sees
finished ones. A run restarted on the same workdir restores the latest step.

`WorkdirLock`: one training run per workdir (below).
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from musica_jax import parallel
from musica_jax import strict_json

BEST_METRIC = "eval_nme"


class Checkpoints:
  """The train state's checkpoints in `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    policy = cm.AnyPreservationPolicy([
        cm.LatestN(keep),
        cm.BestN(get_metric_fn=lambda m: -m[BEST_METRIC], n=1,
                 keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=async_save, create=True)
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, eval_nme: float | None = None) -> None:
    metrics = None if eval_nme is None else {BEST_METRIC: float(eval_nme)}
    self._manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)

  def restore(self, template, step: int | None = None):
    """Restores `step` (default latest) into the structure/shardings of `template`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"available: {self.all_steps()}")
    # Leaves without a sharding are restored replicated on this job's devices, whatever
    # topology saved them (e.g. evaluating on 1 device what 2 hosts trained).
    rep = parallel.replicated(parallel.make_mesh())

    def abstract_leaf(x):
      if not isinstance(x, jax.ShapeDtypeStruct):
        x = ocp.utils.to_shape_dtype_struct(x)
      if getattr(x, "sharding", None) is None:
        x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep)
      return x

    abstract = jax.tree.map(abstract_leaf, template)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


LOCK_FILE = ".musica_lock"


class WorkdirInUseError(RuntimeError):
  """Another live process holds the workdir's lock."""


class WorkdirLock:
  """An exclusive lock on a training workdir, held by process 0 of a run until it ends.

  `<workdir>/.musica_lock` is locked with flock(2): the kernel releases it when the holder
  exits in any way (SIGKILL included), so a lock can never outlive its process. The file
  records the holder (pid, host, start time, command line) for the message a second run
  gets; a clean release empties it. Finding it non-empty but unlocked means the previous
  holder died without releasing it (a stale lock): it is taken over and `acquire` says so.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self._fd = None

  @staticmethod
  def _describe(text: str) -> str:
    try:
      h = json.loads(text)
      return f"pid {h['pid']} on {h['host']} (started {h['started']})"
    except (ValueError, KeyError, TypeError):
      return "an unknown process"

  def acquire(self) -> str | None:
    """Takes the lock; raises WorkdirInUseError if a live process holds it. Returns a
    note when a stale lock of a dead process was taken over, else None."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 65536, 0).decode(errors="replace")
      os.close(fd)
      raise WorkdirInUseError(
          f"--workdir={os.path.dirname(self.path)} is in use by another training run: "
          f"{self._describe(holder)} holds {self.path}; wait for it to end or use another "
          f"--workdir") from None
    previous = os.pread(fd, 65536, 0).decode(errors="replace").strip()
    me = strict_json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                     "started": datetime.datetime.now().isoformat(timespec="seconds"),
                     "argv": sys.argv})
    os.ftruncate(fd, 0)
    os.pwrite(fd, me.encode(), 0)
    os.fsync(fd)
    self._fd = fd
    if previous:
      return (f"took over the stale lock of {self._describe(previous)}, which ended "
              f"without releasing it ({self.path})")
    return None

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
    finally:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
