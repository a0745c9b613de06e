"""Data parallelism with `jax.sharding`: batch split over every device, weights replicated.

Multi-host: each process feeds its own slice of the global batch (its input pipeline
reads shard `jax.process_index()` of `jax.process_count()`); the global array is
assembled with `jax.make_array_from_process_local_data`.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


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
