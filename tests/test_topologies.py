"""TPU slice names -> devices, processes, HBM and FLOP/s per device (advprop_jax.topologies).

No libtpu needed. The expected rows were checked against libtpu 0.0.42.1's get_topology_desc (device
count, process_index values, device_kind) with topologies.slice_devices, which raises on any mismatch;
test_plan_tpu.py repeats that check where libtpu is installed.
"""
import os

import pytest

from advprop_jax import topologies

GIB = 2 ** 30
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (libtpu topology, JAX devices, processes, device kind, HBM per device, peak bf16 per device)
SLICES = {
    'v2-8': ('v2:2x2', 8, 1, 'TPU v2', 8 * GIB, 22.5e12),
    'v2-32': ('v2:4x4', 32, 4, 'TPU v2', 8 * GIB, 22.5e12),
    'v3-8': ('v3:2x2', 8, 1, 'TPU v3', 16 * GIB, 61.5e12),
    'v3-32': ('v3:4x4', 32, 4, 'TPU v3', 16 * GIB, 61.5e12),
    'v3-512': ('v3:16x16', 512, 64, 'TPU v3', 16 * GIB, 61.5e12),
    'v4-8': ('v4:2x2x1', 4, 1, 'TPU v4', 32 * GIB, 275e12),
    'v4-16': ('v4:2x2x2', 8, 2, 'TPU v4', 32 * GIB, 275e12),
    'v4-32': ('v4:2x2x4', 16, 4, 'TPU v4', 32 * GIB, 275e12),
    'v4-64': ('v4:2x4x4', 32, 8, 'TPU v4', 32 * GIB, 275e12),
    'v4-128': ('v4:4x4x4', 64, 16, 'TPU v4', 32 * GIB, 275e12),
    'v4-512': ('v4:4x8x8', 256, 64, 'TPU v4', 32 * GIB, 275e12),
    'v5p-8': ('v5p:2x2x1', 4, 1, 'TPU v5', 96 * GIB, 459e12),
    'v5p-32': ('v5p:2x2x4', 16, 4, 'TPU v5', 96 * GIB, 459e12),
    'v5litepod-1': ('v5e:1x1', 1, 1, 'TPU v5 lite', 16 * GIB, 197e12),
    'v5litepod-4': ('v5e:2x2', 4, 1, 'TPU v5 lite', 16 * GIB, 197e12),
    'v5litepod-8': ('v5e:2x4', 8, 1, 'TPU v5 lite', 16 * GIB, 197e12),
    'v5litepod-16': ('v5e:4x4', 16, 4, 'TPU v5 lite', 16 * GIB, 197e12),
    'v5litepod-32': ('v5e:4x8', 32, 8, 'TPU v5 lite', 16 * GIB, 197e12),
    'v5litepod-256': ('v5e:16x16', 256, 64, 'TPU v5 lite', 16 * GIB, 197e12),
    'v5e-16': ('v5e:4x4', 16, 4, 'TPU v5 lite', 16 * GIB, 197e12),
    'v6e-1': ('v6e:1x1', 1, 1, 'TPU v6 lite', 32 * GIB, 918e12),
    'v6e-8': ('v6e:2x4', 8, 1, 'TPU v6 lite', 32 * GIB, 918e12),
    'v6e-16': ('v6e:4x4', 16, 4, 'TPU v6 lite', 32 * GIB, 918e12),
    'v6e-256': ('v6e:16x16', 256, 64, 'TPU v6 lite', 32 * GIB, 918e12),
    'V4-32': ('v4:2x2x4', 16, 4, 'TPU v4', 32 * GIB, 275e12),  # case and spaces are forgiven
    'v4:2x2x4': ('v4:2x2x4', 16, 4, 'TPU v4', 32 * GIB, 275e12),
    'v4:2x2x3': ('v4:2x2x3', 12, 3, 'TPU v4', 32 * GIB, 275e12),  # a non-default shape, by topology
    'v5e:2x4': ('v5e:2x4', 8, 1, 'TPU v5 lite', 16 * GIB, 197e12),
}


@pytest.mark.parametrize('name', sorted(SLICES))
def test_parse_gives_devices_processes_and_chip_facts(name):
  topology, devices, processes, kind, hbm, peak = SLICES[name]
  tpu = topologies.parse(name)
  assert (tpu.topology, tpu.devices, tpu.processes, tpu.chip.device_kind) == (topology, devices,
                                                                              processes, kind)
  assert tpu.hbm_bytes_per_device == hbm
  assert 0.93 * hbm < tpu.usable_hbm_bytes_per_device < hbm  # the compiler keeps 2-7 % for itself
  assert tpu.peak_flops_per_device == pytest.approx(peak)
  assert tpu.devices_per_process * tpu.processes == tpu.devices


def test_libtpu_arguments_match_what_a_real_slice_exposes():
  # v4: one device per chip (megacore), as a v4 VM shows JAX; libtpu's default is one per core.
  assert topologies.parse('v4-8').topology_kwargs() == {'chip_config_name': 'megacore'}
  # v5e/v6e VMs of 1 or 8 chips hold the whole slice; libtpu assumes 2x2 chips per host.
  assert topologies.parse('v5litepod-8').topology_kwargs() == {'chips_per_host_bounds': (2, 4, 1)}
  assert topologies.parse('v6e-1').topology_kwargs() == {'chips_per_host_bounds': (1, 1, 1)}
  for name in ('v5litepod-4', 'v5litepod-16', 'v5p-8', 'v3-32'):
    assert topologies.parse(name).topology_kwargs() == {}


def test_names_count_cores_or_chips():
  assert topologies.parse('v4-32').chips == 16  # v2/v3/v4/v5p: TensorCores
  assert topologies.parse('v5p-8').chips == 4
  assert topologies.parse('v3-8').chips == 4
  assert topologies.parse('v5litepod-16').chips == 16  # v5e/v6e: chips
  assert topologies.parse('v6e-8').chips == 8


@pytest.mark.parametrize('name', ['v4-6', 'v4-4', 'v4-24', 'v5litepod-2', 'v5litepod-12', 'v7-8',
                                  'v5litepod:4x4', 'v4:2x2', 'v4-8192x', 'tpu-v4-8', '', 'v3-4096',
                                  'v5e-512', 'v4:1x1x1', 'v5p-7'])
def test_bad_names_raise_one_line_listing_accepted_forms(name):
  with pytest.raises(ValueError) as info:
    topologies.parse(name)
  message = str(info.value)
  assert '\n' not in message
  assert topologies.ACCEPTED_FORMS in message and repr(name) in message


def test_importing_the_table_does_not_import_jax():
  import subprocess
  import sys
  code = 'import sys, advprop_jax.topologies; print("jax" in sys.modules)'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == 'False'


RECIPES = [('efficientnet.py', m) for m in ('b0', 'b1', 'b2', 'b3', 'b4', 'b5', 'b6', 'b7', 'b8', 'l2')] + [
    ('resnet.py', '50'), ('resnet.py', '50,fast_advprop'), ('resnet.py', '152')]


@pytest.mark.parametrize('config_file, arg', RECIPES)
def test_every_recipe_names_a_slice_that_divides_its_batches(config_file, arg):
  from advprop_jax import config as config_lib
  config = config_lib.load_file(os.path.join(REPO, 'configs', config_file), arg)
  tpu = topologies.parse(config.tpu_slice)
  config_lib.validate(config, tpu.devices, tpu.processes)  # batches divide devices and hosts
  assert 8 <= config.global_batch_size // tpu.devices <= 256
