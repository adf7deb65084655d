"""The device mesh of the data-parallel step and its BatchNorm groups.

The mesh has two axes: `replica` x `bn`. Examples are sharded over both; gradients are averaged over
both; BatchNorm batch statistics are averaged over `bn` only, so `bn_group_size` contiguous devices share
statistics (1: per-device BN, all devices: global BN).
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

REPLICA_AXIS = 'replica'
BN_AXIS = 'bn'
DATA_AXES = (REPLICA_AXIS, BN_AXIS)


def default_bn_group_size(num_devices: int) -> int:
  """TF EfficientNet's rule: per-core statistics up to 8 cores, else groups of max(8, n // 8)."""
  return 1 if num_devices <= 8 else max(8, num_devices // 8)


def resolve_bn_group_size(bn_group_size: int, num_devices: int) -> int:
  """0 = TF's default rule, -1 = all devices (global BN), k > 0 = groups of k devices."""
  if bn_group_size == 0:
    return default_bn_group_size(num_devices)
  if bn_group_size == -1:
    return num_devices
  if bn_group_size < -1 or num_devices % bn_group_size:
    raise ValueError(f'bn_group_size={bn_group_size} must divide the device count {num_devices} '
                     '(or be 0 for TF\'s default rule, -1 for global BN)')
  return bn_group_size


def create_mesh(bn_group_size: int = 0, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  k = resolve_bn_group_size(bn_group_size, len(devices))
  # Row-major reshape keeps BN groups contiguous in device order (TF's grouping).
  return Mesh(np.asarray(devices).reshape(len(devices) // k, k), DATA_AXES)


def bn_axis_name(mesh: Mesh):
  """The axis BatchNorm reduces over, or None when every device keeps its own statistics."""
  return BN_AXIS if mesh.shape[BN_AXIS] > 1 else None


def num_devices(mesh: Mesh) -> int:
  return mesh.devices.size


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXES))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
