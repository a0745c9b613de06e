"""Data parallelism with `jax.sharding`: batch split over every device, weights replicated.

Multi-host: each process feeds its own slice of the global batch (its input pipeline
reads shard `jax.process_index()` of `jax.process_count()`); the global array is
assembled with `jax.make_array_from_process_local_data`. `initialize_distributed` starts
the multi-process runtime (before anything touches a device).
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


DISTRIBUTED_MODES = ("auto", "manual", "none")


def initialize_distributed(mode: str = "auto", coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> str:
  """Starts `jax.distributed` for a multi-process job; returns how (one line for the log).

  mode:
    "manual": the three arguments name the job (process 0's host:port, the process
      count, this process's index); all three are required.
    "auto": the arguments when given, else `jax.distributed.initialize()` detects the
      cluster itself (SLURM tasks, Cloud TPU VM pods, Open MPI, Kubernetes). No cluster
      detected, or a SLURM job of one task: a single process, nothing started (one task
      then sees every local device instead of the one of its SLURM_LOCALID). A process
      started with one visible GPU (CUDA_VISIBLE_DEVICES) uses that one.
    "none": a single process whatever the environment says.
  Must run before anything touches the XLA backend (device queries, arrays).
  Raises ValueError for an unknown mode or incomplete manual arguments.
  """
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(f"--distributed={mode}: expected one of {', '.join(DISTRIBUTED_MODES)}")
  if mode == "none":
    return "single process (--distributed=none)"
  given = (coordinator_address, num_processes, process_id)
  if mode == "manual" or coordinator_address:
    if any(x is None or x == "" for x in given):
      raise ValueError("--coordinator_address, --num_processes and --process_id are all "
                       "needed to start a multi-process job by hand")
    _cpu_collectives()
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return f"process {process_id} of {num_processes} (coordinator {coordinator_address})"
  if os.environ.get("SLURM_NTASKS") == "1":
    return "single process (a SLURM job of one task)"
  # A scheduler that binds one GPU per task (SLURM --gpus-per-task=1) leaves each task one
  # visible GPU: index 0, whatever the task's local rank (JAX would pick SLURM_LOCALID).
  visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
  local_ids = [0] if visible and "," not in visible else None
  try:
    jax.distributed.initialize(local_device_ids=local_ids)
  except ValueError as e:             # no cluster environment detected
    if "coordinator_address" not in str(e):
      raise
    return "single process (no cluster environment detected)"
  _cpu_collectives()                  # the backend starts later, on first use
  return (f"process {jax.process_index()} of {jax.process_count()} "
          f"(cluster detected by jax.distributed)")


def _cpu_collectives() -> None:
  # Cross-process collectives on CPU hosts (ignored by GPU/TPU backends). Setting it
  # does not touch the backend.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, what: str = "--batch_size") -> None:
  n = jax.device_count()
  if global_batch % n:
    raise ValueError(f"{what}={global_batch} must be divisible by the {n} devices "
                     f"({jax.process_count()} processes)")


def shard_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax arrays sharded over the data axis.

  Non-numeric entries (file ids) stay on the host and are dropped here.
  """
  sharding = batch_sharding(mesh)
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    if v.dtype.kind in "biuf":
      out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))
