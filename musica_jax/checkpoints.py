"""Checkpoints with orbax: atomic, asynchronous, the last N kept plus the best by eval NME.

Orbax writes each step into a temporary directory and renames it when complete, so a
run killed mid-save leaves the previous checkpoints intact; `latest_step()` only sees
finished ones. A run restarted on the same workdir restores the latest step.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from musica_jax import parallel

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
