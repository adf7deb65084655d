"""The device mesh of the data-parallel step, its slices and its BatchNorm groups.

The mesh has three axes: `slice` x `replica` x `bn`. Examples are sharded over all of them;
gradients are averaged over all of them; BatchNorm batch statistics are averaged over `bn` only, so
`bn_group_size` contiguous devices of one slice share statistics (1: per-device BN, -1: all devices
of a slice). `slice` is 1 on one TPU slice; N slices joined over the data-centre network (Cloud TPU
multislice) give it size N, and since a BN group lies inside the `bn` axis it never spans a slice:
only the gradient mean (and the replicated state's) crosses the slower network.

Which slice a device belongs to: `device.slice_index` on TPU (what jax's
mesh_utils.create_hybrid_device_mesh groups by), or its process with `process_is_slice=True` (N
local
processes standing in for N slices, so the multislice path runs on CPU; process_is_granule there).
Within a slice the devices keep the order of a single slice (row-major reshape: TF's contiguous BN
groups), so N slices of D devices compute exactly what one slice of N*D devices does with the same
BN groups.
"""
import collections

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

SLICE_AXIS = 'slice'
REPLICA_AXIS = 'replica'
BN_AXIS = 'bn'
DATA_AXES = (SLICE_AXIS, REPLICA_AXIS, BN_AXIS)
GROUP_AXES = (SLICE_AXIS, REPLICA_AXIS)  # one index per BN group, across slices


def default_bn_group_size(num_devices: int) -> int:
  """TF EfficientNet's rule: per-core statistics up to 8 cores, else groups of max(8, n // 8)."""
  return 1 if num_devices <= 8 else max(8, num_devices // 8)


def resolve_bn_group_size(bn_group_size: int, num_devices: int, num_slices: int = 1) -> int:
  """0 = TF's rule on all devices (at most a slice), -1 = all devices of a slice (global BN on one
  slice), k > 0 = groups of k devices; a group never spans a slice."""
  per_slice = num_devices // num_slices
  if bn_group_size == 0:
    return min(default_bn_group_size(num_devices), per_slice)
  if bn_group_size == -1:
    return per_slice
  if bn_group_size < -1 or per_slice % bn_group_size:
    where = f'device count {num_devices}' if num_slices == 1 else \
        f'device count of a slice, {per_slice} ({num_slices} slices)'
    raise ValueError(f'bn_group_size={bn_group_size} must divide the {where} (or be 0 for TF\'s '
                     'default rule, -1 for global BN)')
  return bn_group_size


def slice_of(device, process_is_slice: bool = False) -> int:
  """The slice a device belongs to: its process when processes stand in for slices, else the TPU
  slice_index (0 on one slice and on devices that have none)."""
  if process_is_slice:
    return device.process_index
  return getattr(device, 'slice_index', 0) or 0


def slices(devices, process_is_slice: bool = False) -> list:
  """`devices` grouped by slice (slices in index order, devices in their given order)."""
  groups = collections.defaultdict(list)
  for d in devices:
    groups[slice_of(d, process_is_slice)].append(d)
  sizes = {len(g) for g in groups.values()}
  if len(sizes) != 1:
    raise ValueError(f'slices of unequal device counts {sorted(sizes)}: every slice of a job '
                     'must be '
                     'of the same type')
  return [groups[s] for s in sorted(groups)]


def count_slices(devices=None, process_is_slice: bool = False) -> int:
  return len(slices(jax.devices() if devices is None else devices, process_is_slice))


def create_mesh(bn_group_size: int = 0, devices=None, process_is_slice: bool = False) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  grouped = slices(devices, process_is_slice)
  k = resolve_bn_group_size(bn_group_size, len(devices), len(grouped))
  # Row-major reshape keeps BN groups contiguous in device order (TF's grouping), inside a slice.
  per_slice = len(grouped[0])
  return Mesh(np.asarray(grouped).reshape(len(grouped), per_slice // k, k), DATA_AXES)


def bn_axis_name(mesh: Mesh):
  """The axis BatchNorm reduces over, or None when every device keeps its own statistics."""
  return BN_AXIS if mesh.shape[BN_AXIS] > 1 else None


def num_devices(mesh: Mesh) -> int:
  return mesh.devices.size


def num_slices(mesh: Mesh) -> int:
  return mesh.shape[SLICE_AXIS]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXES))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
