"""Devices and data placement: the mesh, shardings, host-local -> global arrays, multi-host start.

The mesh has two named axes, `data` (the batch is split along it) and `model`, over which a
large teacher's parameters (`config.teacher.shard`) and the train state (`config.student.shard`)
can be split, FSDP-style (`fsdp`); otherwise they are replicated. Because the batch is one global
array, batch-norm statistics are means over the *global* batch: synchronised BN,
unless `config.bn_group_size` groups them (layers.batch_norm_groups), which with groups inside
the per-device batch needs no communication.
"""
import os
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from afd_jax.errors import UserError

DATA, MODEL = 'data', 'model'


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize` when the launch environment asks for several processes.

  Recognised: an explicit coordinator (AFD_COORDINATOR_ADDRESS, AFD_NUM_PROCESSES,
  AFD_PROCESS_ID, optional AFD_COORDINATOR_BIND_ADDRESS), SLURM with several tasks, and TPU pod
  slices (`TPU_WORKER_HOSTNAMES` with more than one worker). Safe to call twice.
  """
  if jax.distributed.is_initialized():
    return
  env = os.environ
  if env.get('AFD_COORDINATOR_ADDRESS'):
    if env.get('AFD_CPU_COLLECTIVES'):
      jax.config.update('jax_cpu_collectives_implementation', env['AFD_CPU_COLLECTIVES'])
    kwargs = {}
    if env.get('AFD_LOCAL_DEVICE_IDS'):
      kwargs['local_device_ids'] = [int(i) for i in env['AFD_LOCAL_DEVICE_IDS'].split(',')]
    jax.distributed.initialize(
        coordinator_address=env['AFD_COORDINATOR_ADDRESS'],
        num_processes=int(env['AFD_NUM_PROCESSES']),
        process_id=int(env['AFD_PROCESS_ID']),
        coordinator_bind_address=env.get('AFD_COORDINATOR_BIND_ADDRESS'), **kwargs)
  elif int(env.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in env:
    jax.distributed.initialize()  # JAX reads SLURM's environment.
  elif len(env.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1:
    jax.distributed.initialize()  # JAX reads the TPU metadata.
  else:
    return
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def make_mesh(mesh_shape: Sequence[int]) -> Mesh:
  """A (data, model) mesh over all devices; one -1 entry takes the remaining devices."""
  shape = list(mesh_shape)
  n = jax.device_count()
  if len(shape) != 2 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise UserError(f'mesh_shape must be (data, model) with at most one -1, got {tuple(mesh_shape)}.')
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if n % known:
      raise UserError(f'mesh_shape {tuple(mesh_shape)} does not divide the {n} devices.')
    shape[shape.index(-1)] = n // known
  if int(np.prod(shape)) != n:
    raise UserError(f'mesh_shape {tuple(mesh_shape)} needs {int(np.prod(shape))} devices, '
                    f'there are {n}.')
  devices = np.asarray(jax.devices()).reshape(shape)
  return Mesh(devices, (DATA, MODEL))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp(tree: Any, mesh: Mesh, what: str = 'the teacher') -> Any:
  """NamedShardings for `tree`'s arrays (or their shapes), FSDP-style over the `model` axis:
  each split along its largest dimension that the axis size divides (the first of equal ones),
  the rest replicated. Inside a jitted step XLA gathers each weight where a layer needs it.
  Raises UserError if the axis is larger than 1 and divides no dimension of any array."""
  n = mesh.shape[MODEL]

  def spec(x):
    dims = sorted(range(len(x.shape)), key=lambda d: -x.shape[d])
    split = next((d for d in dims if n > 1 and x.shape[d] % n == 0), None)
    if split is None:
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, P(*[MODEL if d == split else None for d in range(len(x.shape))]))

  shardings = jax.tree.map(spec, tree)
  if n > 1 and all(s.spec == P() for s in jax.tree.leaves(shardings)):
    raise UserError(f'the mesh\'s model axis ({n} devices) divides no dimension of any weight of '
                    f'{what}, so nothing would be sharded: choose a mesh_shape whose model size '
                    'divides its widths.')
  return shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`."""
  return NamedSharding(mesh, P(DATA))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = 'batch_size') -> None:
  data = mesh.shape[DATA]
  if batch_size % data or batch_size % jax.process_count():
    raise UserError(f'{what}={batch_size} must divide evenly by the {data} data-parallel '
                    f'devices and the {jax.process_count()} processes.')


def global_batch(local: Any, mesh: Mesh) -> Any:
  """Host-local numpy batch (this process's share) -> global `jax.Array`s sharded on `data`."""
  sharding = batch_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, shape)

  return jax.tree.map(put, local)
