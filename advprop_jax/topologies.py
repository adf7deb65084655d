"""Cloud TPU slices by the names users type (`v4-32`, `v5litepod-16`, ...): chip facts and JAX devices.

`parse('v4-32')` says what a real slice gives a JAX program (devices, processes, HBM and peak FLOP/s per
device) and how to ask libtpu for the same devices on a machine without a TPU:
`slice_devices(parse('v4-32'))` -> `jax.experimental.topologies.get_topology_desc(...)` devices, which
`jax.jit(...).trace(...).lower().compile()` accepts for ahead-of-time compilation.

Names: v2/v3/v4/v5p accelerator types count TensorCores (v4-32 = 16 chips of 2 cores), v5e
(`v5litepod-N`) and v6e count chips. What JAX exposes as a device: v2/v3 one per TensorCore; v4 and v5p
one per chip (megacore: both cores run one program); v5e/v6e have one core per chip. libtpu's default
for v4 is one device per core, so v4 is asked for chip_config_name='megacore', as a real v4 VM shows it.

Hosts: v2-v5p slices have 4 chips per host. v5e/v6e slices of 1, 4 or 8 chips are one VM holding all of
them; bigger ones are 4-chip VMs (Cloud TPU docs, v5e "VM types"). libtpu assumes 2x2 chips per host
unless told (`chips_per_host_bounds`), so 1- and 8-chip v5e/v6e slices pass their own shape.

Only the standard slice shapes (power-of-two chip counts, the most cube-like shape) are parsed from an
accelerator type; any other shape can be given as a topology, e.g. `v4:2x2x3`.

Multislice: `NxSLICE` (`2xv5litepod-256`, `4xv4-32`, `2xv5e:2x2`) is N such slices joined over the
data-centre network (Cloud TPU multislice: v4, v5e, v5p, v6e). Its devices and processes are those
of all N slices, numbered slice by slice; libtpu builds them with `num_slices=N`, each device
carrying its `slice_index`.

This module imports nothing heavy: jax is imported inside slice_devices only.
"""
import dataclasses
import importlib.util
import math
import os
import re
from typing import Tuple

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str  # libtpu's topology prefix: 'v4' in 'v4:2x2x4'
  accelerator_prefix: str  # Cloud's accelerator-type prefix: 'v5litepod' in 'v5litepod-16'
  device_kind: str  # what jax's Device.device_kind reports
  hbm_bytes_per_chip: int  # nominal
  usable_hbm_bytes_per_device: int  # what the TPU compiler lets one device's program use
  peak_bf16_flops_per_chip: float
  cores_per_chip: int
  megacore: bool  # JAX exposes one device per chip (both TensorCores) rather than one per core
  name_counts: str  # 'cores' or 'chips': what the N of '<prefix>-N' counts
  chips_per_host: int  # on multi-host slices
  single_host_chips: Tuple[int, ...]  # slice sizes (chips) that are one VM holding every chip
  mesh_dims: int  # 2D torus (v2, v3, v5e, v6e) or 3D (v4, v5p)
  max_chips: int
  source: str

  @property
  def devices_per_chip(self) -> int:
    return 1 if self.megacore else self.cores_per_chip

  @property
  def hbm_bytes_per_device(self) -> int:
    return self.hbm_bytes_per_chip // self.devices_per_chip

  @property
  def peak_flops_per_device(self) -> float:
    return self.peak_bf16_flops_per_chip / self.devices_per_chip


# hbm_bytes_per_chip is the documented capacity. usable_hbm_bytes_per_device is what libtpu 0.0.42's
# compiler says a device's program may use, from its out-of-memory message ("exceeds available HBM
# (30.75G)", binary units, 2 decimals) for a program too big for any chip (the probe is in the report).
# v5p: the docs say 95 GB, the compiler offers 95.74 GiB, so the chip has 96 GiB.
# device_kind strings: what libtpu 0.0.42's compile-only devices report.
CHIPS = {c.generation: c for c in (
    Chip('v2', 'v2', 'TPU v2', 16 * GIB, 748 * GIB // 100, 45e12, 2, False, 'cores', 4, (4,), 2, 256,
         'Cloud TPU docs, system architecture: 16 GiB HBM and 45 TFLOP/s per chip (2 cores)'),
    Chip('v3', 'v3', 'TPU v3', 32 * GIB, 1548 * GIB // 100, 123e12, 2, False, 'cores', 4, (4,), 2, 1024,
         'Cloud TPU docs, system architecture: 32 GiB HBM and 123 TFLOP/s per chip (2 cores)'),
    Chip('v4', 'v4', 'TPU v4', 32 * GIB, 3075 * GIB // 100, 275e12, 2, True, 'cores', 4, (4,), 3, 4096,
         'Cloud TPU docs "TPU v4": 275 TFLOP/s bf16, 32 GiB HBM2 per chip, 2 TensorCores (megacore)'),
    Chip('v5p', 'v5p', 'TPU v5', 96 * GIB, 9574 * GIB // 100, 459e12, 2, True, 'cores', 4, (4,), 3, 8960,
         'Cloud TPU docs "TPU v5p": 459 TFLOP/s bf16, "95 GB" HBM2e per chip, 4 chips per VM'),
    Chip('v5e', 'v5litepod', 'TPU v5 lite', 16 * GIB, 1575 * GIB // 100, 197e12, 1, False, 'chips', 4,
         (1, 4, 8), 2, 256, 'Cloud TPU docs "TPU v5e": 197 TFLOP/s bf16, 16 GB HBM2 per chip, 1 core'),
    Chip('v6e', 'v6e', 'TPU v6 lite', 32 * GIB, 3125 * GIB // 100, 918e12, 1, False, 'chips', 4,
         (1, 4, 8), 2, 256, 'Cloud TPU docs "TPU v6e": 918 TFLOP/s bf16, 32 GB HBM per chip, 1 core'),
)}
_BY_PREFIX = {c.accelerator_prefix: c for c in CHIPS.values()}
_BY_PREFIX['v5e'] = CHIPS['v5e']  # 'v5e-16' is a common spelling of v5litepod-16

ACCEPTED_FORMS = ('v2-8, v3-32, v4-32, v5p-8 (N TensorCores), v5litepod-16 / v5e-16, v6e-8 (N chips), '
                  'or a topology <v2|v3|v4|v5p|v5e|v6e>:<AxB or AxBxC> such as v4:2x2x4; N slices '
                  '(multislice, v4/v5e/v5p/v6e): <N>x<slice> such as 2xv5litepod-256, 4xv4-32')
MULTISLICE_GENERATIONS = ('v4', 'v5e', 'v5p', 'v6e')  # Cloud TPU multislice supports these
MAX_SLICES = 1024  # a bound on N that no real job reaches: 100000xv4-8 is a typo, not a plan


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # as given
  chip: Chip
  shape: Tuple[int, ...]  # chips along each torus axis
  devices: int  # JAX devices of the whole slice (of all slices)
  processes: int  # hosts = JAX processes (of all slices)
  slices: int = 1  # multislice: N slices of this shape

  @property
  def chips(self) -> int:
    return math.prod(self.shape) * self.slices

  @property
  def processes_per_slice(self) -> int:
    return self.processes // self.slices

  @property
  def topology(self) -> str:
    """The topology name get_topology_desc takes: 'v4:2x2x4'."""
    return f'{self.chip.generation}:{"x".join(map(str, self.shape))}'

  @property
  def devices_per_process(self) -> int:
    return self.devices // self.processes

  @property
  def hbm_bytes_per_device(self) -> int:
    return self.chip.hbm_bytes_per_device

  @property
  def usable_hbm_bytes_per_device(self) -> int:
    return self.chip.usable_hbm_bytes_per_device

  @property
  def peak_flops_per_device(self) -> float:
    return self.chip.peak_flops_per_device

  def topology_kwargs(self) -> dict:
    """Keyword arguments of get_topology_desc that make libtpu's devices match the real slice."""
    kwargs = {}
    if self.chip.generation == 'v4':
      kwargs['chip_config_name'] = 'megacore'  # libtpu's v4 default is a device per core
    if self.processes_per_slice == 1 and math.prod(self.shape) != self.chip.chips_per_host:
      # A v5e/v6e VM of 1 or 8 chips: one host holds the slice (libtpu assumes 2x2 chips per host).
      kwargs['chips_per_host_bounds'] = tuple(self.shape) + (1,) * (3 - len(self.shape))
    return kwargs

  def describe(self) -> dict:
    return dict(topology=self.name, libtpu_topology=self.topology, device_kind=self.chip.device_kind,
                chips=self.chips, devices=self.devices, processes=self.processes,
                slices=self.slices,
                hbm_bytes_per_device=self.hbm_bytes_per_device,
                usable_hbm_bytes_per_device=self.usable_hbm_bytes_per_device,
                peak_flops_per_device=self.peak_flops_per_device)


def _cube_like(chips: int, dims: int) -> Tuple[int, ...]:
  """The default (most cube-like) shape of a power-of-two slice: 4 -> 2x2x1, 16 -> 2x2x4, 32 -> 4x8."""
  shape = [1] * dims
  for _ in range(chips.bit_length() - 1):
    shape[shape.index(min(shape))] *= 2
  # Cloud writes shapes ascending (2x2x4, 4x8), except that a 4-chip 3D slice is 2x2x1.
  return tuple(shape) if chips < 8 and dims == 3 else tuple(sorted(shape))


def _bad(name: str, why: str) -> ValueError:
  return ValueError(f'unknown TPU slice {name!r} ({why}); accepted: {ACCEPTED_FORMS}')


def _make(name: str, chip: Chip, shape: Tuple[int, ...]) -> Slice:
  chips = math.prod(shape)
  if chips > chip.max_chips:
    raise _bad(name, f'{chip.generation} slices have at most {chip.max_chips} chips')
  if chips in chip.single_host_chips:
    processes = 1
  elif chips % chip.chips_per_host:
    raise _bad(name, f'{chips} chips do not fill hosts of {chip.chips_per_host} chips')
  else:
    processes = chips // chip.chips_per_host
  return Slice(name, chip, shape, chips * chip.devices_per_chip, processes)


def parse(name: str) -> Slice:
  """A slice from an accelerator type ('v4-32') or a topology ('v4:2x2x4'), or N of them
  ('2xv5litepod-256'); ValueError otherwise."""
  text = name.strip().lower()
  match = re.fullmatch(r'(\d+)x(v.*)', text)
  if match:
    count = int(match.group(1))
    if not 1 <= count <= MAX_SLICES:
      raise _bad(name, f'the number of slices must be 1 to {MAX_SLICES}')
    one = _parse_one(name, match.group(2))
    if one.chip.generation not in MULTISLICE_GENERATIONS:
      raise _bad(name, f'multislice needs {"/".join(MULTISLICE_GENERATIONS)} slices')
    return dataclasses.replace(one, devices=one.devices * count, processes=one.processes * count,
                               slices=count)
  if re.fullmatch(r'[\d.]+\s*x.*', text):  # '2.5xv4-8', '2x', '2 x v4-8'
    raise _bad(name, 'N slices are <N>x<slice> with a whole N and a slice name')
  return _parse_one(name, text)


def _parse_one(name: str, text: str) -> Slice:
  """One slice from its lower-cased name `text` (errors name the whole `name`)."""
  match = re.fullmatch(r'(v\d+[a-z]*)-(\d+)', text)
  if match:
    prefix, count = match.group(1), int(match.group(2))
    chip = _BY_PREFIX.get(prefix)
    if chip is None:
      raise _bad(name, f'no TPU type {prefix!r}')
    per_chip = chip.cores_per_chip if chip.name_counts == 'cores' else 1
    if count % per_chip or count < per_chip:
      raise _bad(name, f'{prefix}-N counts TensorCores, {per_chip} per chip')
    chips = count // per_chip
    if chips & (chips - 1):
      raise _bad(name, f'{chips} chips is not a power of two: give the topology, e.g. '
                       f'{chip.generation}:{"x".join(["2"] * chip.mesh_dims)}')
    if chip.mesh_dims == 2 and chips < 4 and chips not in chip.single_host_chips:
      raise _bad(name, f'the smallest {chip.accelerator_prefix} slice is 4 chips')
    if chip.mesh_dims == 3 and chips < 4:
      raise _bad(name, f'the smallest {chip.accelerator_prefix} slice is 4 chips '
                       f'({chip.accelerator_prefix}-{4 * per_chip})')
    return _make(name, chip, _cube_like(chips, chip.mesh_dims))
  match = re.fullmatch(r'(v\d+[a-z]*):(\d+(?:x\d+)+)', text)
  if match:
    chip = CHIPS.get(match.group(1))
    if chip is None:
      raise _bad(name, f'no TPU generation {match.group(1)!r} (v5litepod is v5e here)')
    shape = tuple(int(d) for d in match.group(2).split('x'))
    if len(shape) != chip.mesh_dims or min(shape) < 1:
      raise _bad(name, f'{chip.generation} topologies have {chip.mesh_dims} dimensions')
    return _make(name, chip, shape)
  raise _bad(name, 'not <type>-<N> or <generation>:<shape>')


def libtpu_available() -> bool:
  """Whether the TPU compiler (requirements-tpu.txt) is installed."""
  return importlib.util.find_spec('libtpu') is not None


def compile_only_environment() -> None:
  """Settings for a process that only compiles for TPU slices (`plan`): it runs nothing on any device but
  the host CPU, even on a TPU VM whose chips a training job holds, and several such processes may load
  libtpu at once (libtpu otherwise locks /tmp/libtpu_lockfile per process, which only matters for
  processes that drive a TPU). Call before JAX starts its backends."""
  import jax  # pylint: disable=import-outside-toplevel
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  jax.config.update('jax_platforms', 'cpu')


def slice_devices(tpu_slice: Slice) -> list:
  """The slice's devices, from libtpu, on any machine (compile-only: they cannot run programs).

  Needs libtpu (requirements-tpu.txt); works with JAX_PLATFORMS=cpu. Checks that libtpu agrees with
  the table: device and process counts and the device kind.
  """
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  kwargs = tpu_slice.topology_kwargs()
  if tpu_slice.slices > 1:
    kwargs['num_slices'] = tpu_slice.slices
  devices = list(topologies.get_topology_desc(topology_name=tpu_slice.topology, platform='tpu',
                                              **kwargs).devices)
  processes = {d.process_index for d in devices}
  kinds = {d.device_kind for d in devices}
  slices = {getattr(d, 'slice_index', 0) for d in devices}
  if (len(devices), len(processes), kinds, len(slices)) != (
      tpu_slice.devices, tpu_slice.processes, {tpu_slice.chip.device_kind}, tpu_slice.slices):
    raise RuntimeError(f'libtpu describes {tpu_slice.name} as {len(devices)} devices of {kinds} '
                       f'on {len(processes)} processes in {len(slices)} slice(s); '
                       f'advprop_jax.topologies expects {tpu_slice.devices} of '
                       f'{tpu_slice.chip.device_kind!r} on {tpu_slice.processes} in '
                       f'{tpu_slice.slices}')
  return devices
