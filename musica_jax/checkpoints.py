"""Checkpoints with orbax: atomic, asynchronous, the last N kept plus the best by eval NME.

Orbax writes each step into a temporary directory and renames it when complete, so a
run killed mid-save leaves the previous checkpoints intact; `latest_step()` only sees
finished ones. A run restarted on the same workdir restores the latest step.

Content checksums: at save time the SHA-256 of every array of the state (in tree order,
with its path, dtype and shape) goes to `<workdir>/checkpoint_checksums/<step>.json`.
`restore` recomputes it on what it read, so a checkpoint whose files were truncated,
emptied, lost their metadata or had bytes flipped is refused, and so is a step folder
emptied or stripped of its `default/` item folder. Without an explicit step it walks back
from the newest checkpoint to the newest one that restores and matches, and reports each
one it skipped (step and reason) through `on_skip`; whatever is wrong with a newer step,
an older intact one still restores (the manager is told up front that a checkpoint is one
unnamed item, so a broken step cannot change how it reads the others). Checkpoints written
before checksums existed restore unverified.

`WorkdirLock`: one training run per workdir (below).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from musica_jax import atomic_io
from musica_jax import parallel
from musica_jax import strict_json

BEST_METRIC = "eval_nme"
CHECKSUM_DIR = "checkpoint_checksums"
ITEM_DIR = "default"        # orbax's folder of the one unnamed item in <step>/


class DamagedCheckpointError(ValueError):
  """No checkpoint (or not the one asked for) restores with matching checksums."""


def state_digest(state) -> str:
  """SHA-256 of every array of a (replicated) state: path, dtype, shape and bytes."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if isinstance(leaf, jax.Array):
      leaf = leaf.addressable_data(0)       # replicated: any local copy is the whole
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}\n".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _short(error: BaseException) -> str:
  """The first line of an orbax / TensorStore error, without its trace."""
  text = " ".join(str(error).split("\n")[0].split()) or type(error).__name__
  return f"{type(error).__name__}: {text[:300]}"


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
    self.checksum_dir = os.path.join(os.path.abspath(workdir), CHECKSUM_DIR)
    self._options = options
    self._manager = self._new_manager()

  def _new_manager(self):
    # One unnamed item, said up front: left to guess, orbax decides "one item or many" from
    # the first step folder it restores and keeps that guess, so one emptied step folder
    # (no `default/` inside) made it refuse every older, intact step too (issue #27).
    return ocp.CheckpointManager(self.directory, options=self._options,
                                 item_handlers=ocp.StandardCheckpointHandler())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, eval_nme: float | None = None) -> None:
    metrics = None if eval_nme is None else {BEST_METRIC: float(eval_nme)}
    with self._disk_errors(f"checkpoint of step {step}"):
      if jax.process_index() == 0:
        self._write_checksum(step, state_digest(state))
      self._manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)

  @contextlib.contextmanager
  def _disk_errors(self, what: str):
    """A full disk (also when orbax reports it late, from its writer thread) as one
    OSError(ENOSPC) naming the directory, instead of a TensorStore trace."""
    try:
      yield
    except OSError:
      raise
    except Exception as e:  # noqa: BLE001
      text = str(e)
      if "No space left" in text or "os_error_code='28'" in text:
        raise OSError(errno.ENOSPC, f"{what}: no space left on device (a checkpoint "
                      f"write failed; the newest complete checkpoint: "
                      f"{self.latest_step() or 'none'})", self.directory) from None
      raise

  def _checksum_path(self, step: int) -> str:
    return os.path.join(self.checksum_dir, f"{int(step)}.json")

  def _write_checksum(self, step: int, digest: str) -> None:
    atomic_io.write_text(self._checksum_path(step),
                         strict_json.dumps({"step": int(step), "sha256": digest}))
    keep = set(self.all_steps()) | {int(step)}      # drop those of deleted checkpoints
    for name in os.listdir(self.checksum_dir):
      stem = name.split(".")[0]
      stale = stem.isdigit() and int(stem) not in keep and name.endswith(".json")
      if stale or name.startswith("."):    # also atomic_io's temp file of a killed writer
        os.remove(os.path.join(self.checksum_dir, name))

  def expected_digest(self, step: int) -> str | None:
    try:
      with open(self._checksum_path(step)) as f:
        return json.load(f)["sha256"]
    except FileNotFoundError:
      return None
    except (ValueError, KeyError, TypeError):
      return "unreadable checksum file"

  def restore(self, template, step: int | None = None, on_skip=None):
    """Restores into the structure/shardings of `template`, checking the content checksum.

    step: that checkpoint or DamagedCheckpointError; None: the newest checkpoint that
    restores and matches, each damaged newer one reported as on_skip(step, reason).
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                f"available: {sorted(steps)}")
      steps = [step]
    skipped = []
    for s in steps:
      try:
        return self._restore_checked(template, s)
      except Exception as e:  # noqa: BLE001 (orbax/TensorStore raise many kinds)
        reason = _short(e)
        if step is not None:
          raise DamagedCheckpointError(
              f"checkpoint step {s} in {self.directory} is damaged: {reason}") from None
        skipped.append(f"step {s}: {reason}")
        if on_skip is not None:
          on_skip(s, reason)
    raise DamagedCheckpointError(f"no checkpoint in {self.directory} restores intact: "
                                 + "; ".join(skipped))

  def set_aside(self, step: int) -> str:
    """Moves a damaged checkpoint out of the way (to <workdir>/damaged_checkpoints/), so
    the run can save that step again; returns where it went."""
    target_dir = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")
    os.makedirs(target_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = os.path.join(target_dir, f"{int(step)}-{stamp}")
    os.replace(os.path.join(self.directory, str(int(step))), target)
    self._manager.reload()
    return target

  def _restore_checked(self, template, step: int):
    item = os.path.join(self.directory, str(int(step)), ITEM_DIR)
    if not os.path.isdir(item):
      raise DamagedCheckpointError(
          f"its folder holds no {ITEM_DIR}/ (emptied or partly deleted)")
    state = self._restore_step(template, step)
    expected = self.expected_digest(step)
    if expected is not None and state_digest(state) != expected:
      raise DamagedCheckpointError(
          f"content does not match the checksum written at save time "
          f"({self._checksum_path(step)})")
    return state

  def _restore_step(self, template, step: int):
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

  def reload(self) -> None:
    """Re-reads the step list (after another process set a damaged step aside)."""
    self._manager.reload()

  def wait(self) -> None:
    with self._disk_errors("checkpoint"):
      self._manager.wait_until_finished()

  def close(self) -> None:
    with self._disk_errors("checkpoint"):
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
