"""The device mesh: one data axis over every device of every process, and data placement.

The same code runs on one CPU, on several GPUs and on a TPU pod slice; only the number of
devices changes. There is one mesh, `data_mesh()`, a 1-D `jax.make_mesh` over all devices with
the axis `"data"`. Parameters and train states are replicated over it; batches of episodes
(training, validation, evaluation) and of images (pretraining, feature extraction) are split
along their leading (episode or image) axis.

Axis types: the mesh uses `AxisType.Auto`, not the Explicit default of current JAX. Under
Explicit axes every gather with sharded indices (episodes gathered from cached features,
batches from a split held on device) needs an `out_sharding`, and every function of the core
would have to name shardings; under Auto the compiler propagates the sharding of the batch
from one `with_sharding_constraint` (or one sharded input) to the whole step, and the core
stays free of device code. This module is the only one that names a mesh.

Several processes (multi-host): `initialize_distributed` starts `jax.distributed` (explicitly
from a coordinator address, or by JAX's own cluster detection on TPU slices, SLURM and Open
MPI). Each process builds its share of a batch (`shard_rows`): the rows that its own devices
hold, drawn by their global index, so the result never depends on the process count. Only
process 0 writes files (`is_writer`); `barrier` makes the others wait for a file it wrote.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

DATA = "data"

# Environment variables by which a multi-process cluster job announces itself. With one of
# these saying there are several processes, `jax.distributed.initialize()` detects the rest.
_CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def cluster_detected() -> bool:
  """Whether this process is one of several in a cluster job that JAX can detect on its own.

  True under SLURM or Open MPI with more than one task, and on a multi-worker TPU VM slice
  (`TPU_WORKER_HOSTNAMES` lists several hosts).
  """
  for name in _CLUSTER_SIZE_VARIABLES:
    value = os.environ.get(name, "")
    if value.isdigit() and int(value) > 1:
      return True
  return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> bool:
  """Starts JAX's multi-process runtime where the run has several processes.

  Call it before anything touches a device. With `coordinator_address` (and `num_processes`,
  `process_id`) it starts explicitly, as a local multi-process run or an unsupported cluster
  does; without, it starts with JAX's cluster detection if `cluster_detected()`, and otherwise
  does nothing (one process).

  Returns:
    Whether `jax.distributed` was started.
  """
  explicit = coordinator_address is not None
  if not explicit and (num_processes is not None or process_id is not None):
    raise ValueError("--num_processes and --process_id need --coordinator_address=HOST:PORT")
  if explicit and (num_processes is None or process_id is None):
    raise ValueError("--coordinator_address needs --num_processes and --process_id too")
  if not explicit and not cluster_detected():
    return False
  if explicit and num_processes == 1:
    return False
  # CPU devices of several processes talk through gloo (the only CPU collectives backend
  # that needs nothing installed); it is ignored on GPU and TPU.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()
  logging.info("jax.distributed started: process %d of %d", jax.process_index(),
               jax.process_count())
  return True


def is_writer() -> bool:
  """Whether this process writes files and logs (process 0 of a multi-process run)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


@functools.lru_cache(maxsize=None)
def data_mesh() -> jax.sharding.Mesh:
  """The 1-D mesh over every device of every process, axis "data", Auto axis type."""
  return jax.make_mesh((jax.device_count(),), (DATA,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def num_shards() -> int:
  """How many ways a batch is split: the global device count."""
  return data_mesh().size


def replicated() -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(data_mesh(), PartitionSpec())


def sharded(axis: int = 0) -> NamedSharding:
  """Split along `axis` over the data axis, replicated along the others."""
  return NamedSharding(data_mesh(), PartitionSpec(*([None] * axis), DATA))


def constrain(x, axis: int = 0):
  """Inside a jitted function: lay `x` (or each leaf) out split along `axis` over the mesh.

  The compiler propagates the layout to what is computed from `x`, so one constraint on a
  batch shards the whole step. With one device it does nothing.
  """
  if num_shards() == 1:
    return x
  return jax.tree_util.tree_map(
      lambda leaf: jax.lax.with_sharding_constraint(leaf, sharded(axis)), x)


def replicate(tree):
  """Host values (the same on every process) as arrays replicated over the mesh.

  Train states go through this once, so that every process holds a global array that Orbax
  saves and restores collectively and that jitted steps keep replicated.
  """

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      impl = jax.random.key_impl(x)
      data = put(jax.random.key_data(x))
      return jax.jit(functools.partial(jax.random.wrap_key_data, impl=impl),
                     out_shardings=replicated())(data)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.jit(lambda a: a, out_shardings=replicated())(x)
    return jax.make_array_from_process_local_data(replicated(), np.asarray(x))

  return jax.tree_util.tree_map(put, tree)


def padded_size(count: int) -> int:
  """`count` rounded up to a multiple of the global device count."""
  shards = num_shards()
  return -(-count // shards) * shards


def check_divisible(count: int, what: str) -> None:
  """Raises ValueError unless `count` splits evenly over the devices."""
  if count % num_shards():
    raise ValueError(f"{what} = {count} does not split evenly over {num_shards()} devices; "
                     f"make it a multiple of {num_shards()}")


def shard_rows(count: int, rows: Callable[[int, int], object], axis: int = 0):
  """A pytree of global arrays split along `axis`, built from the rows each process holds.

  Args:
    count: the global size of the split axis (a multiple of the device count).
    rows: (start, stop) -> a pytree of host arrays whose `axis` covers rows [start, stop),
      e.g. episodes start..stop-1 of a sampler. It is called once per distinct block of rows
      that this process's devices hold, never for rows of another process, so each process
      draws only its share, by global index.
    axis: the split axis (0 for a batch of episodes or images).

  Returns:
    The pytree of `rows(0, count)`'s structure, every leaf a jax.Array of global shape with
    `sharded(axis)`.
  """
  check_divisible(count, "the batch")
  sharding = sharded(axis)
  index_map = sharding.addressable_devices_indices_map(_shape_with(count, axis))
  blocks, structure = {}, None
  for device, index in index_map.items():
    start, stop, _ = index[axis].indices(count)
    if (start, stop) not in blocks:
      blocks[(start, stop)] = rows(start, stop)
  leaves_by_block = {}
  for block, tree in blocks.items():
    leaves, structure = jax.tree_util.tree_flatten(tree)
    leaves_by_block[block] = [np.asarray(leaf) for leaf in leaves]
  any_leaves = next(iter(leaves_by_block.values()))
  out = []
  for i, leaf in enumerate(any_leaves):
    shape = leaf.shape[:axis] + (count,) + leaf.shape[axis + 1:]
    pieces = []
    for device, index in index_map.items():
      start, stop, _ = index[axis].indices(count)
      pieces.append(jax.device_put(leaves_by_block[(start, stop)][i], device))
    out.append(jax.make_array_from_single_device_arrays(shape, sharding, pieces))
  return jax.tree_util.tree_unflatten(structure, out)


def to_host(x) -> np.ndarray:
  """A global array (replicated or split) as one host array, the same on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _shape_with(count: int, axis: int) -> tuple[int, ...]:
  return (1,) * axis + (count,)


def describe() -> str:
  """One line on the devices and processes, for the log."""
  devices = jax.devices()
  return (f"{len(devices)} {devices[0].platform} device(s) ({devices[0].device_kind}) in "
          f"{jax.process_count()} process(es); data mesh of {num_shards()}")

