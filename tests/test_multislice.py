"""Multislice (#28 item 2): `NxSLICE` names, the (slice, replica, bn) mesh whose BN groups never
span a
slice, the plan of N slices (its cross-slice collectives), and bad names before any compile.

The 2-process run that stands in for 2 slices is in test_multihost.py (slow); the compile of a tiny
model for 2 slices needs libtpu and is slow too (about a minute of CPU).
"""
import importlib.util
import json

import jax
import numpy as np
import pytest

from advprop_jax import cli
from advprop_jax import config as config_lib
from advprop_jax import parallel
from advprop_jax import plan_core
from advprop_jax import topologies

HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU,
                                  reason='libtpu is not installed (requirements-tpu.txt)')


@pytest.mark.parametrize('name, slices, devices, processes, chips, topology', [
    ('2xv5litepod-256', 2, 512, 128, 512, 'v5e:16x16'),
    ('4xv4-32', 4, 64, 16, 64, 'v4:2x2x4'),
    ('2xv5e:2x2', 2, 8, 2, 8, 'v5e:2x2'),
    ('2xv5litepod-8', 2, 16, 2, 16, 'v5e:2x4'),  # single-host slices: one process each
    ('1xv4-8', 1, 4, 1, 4, 'v4:2x2x1'),
])
def test_multislice_names(name, slices, devices, processes, chips, topology):
  tpu = topologies.parse(name)
  assert (tpu.slices, tpu.devices, tpu.processes, tpu.chips, tpu.topology) == (
      slices, devices, processes, chips, topology)
  assert tpu.describe()['slices'] == slices
  one = topologies.parse(name.split('x', 1)[1])
  assert tpu.topology_kwargs() == one.topology_kwargs()  # per slice: libtpu gets num_slices on top


@pytest.mark.parametrize('name', ['0xv4-8', '2x', '2xv3-32', '2.5xv4-8', '2 x v4-8', '2xv4-33',
                                  '2xv4-8x', '2000xv4-8'])
def test_malformed_multislice_names_raise_one_line(name):
  with pytest.raises(ValueError) as info:
    topologies.parse(name)
  assert '\n' not in str(info.value) and repr(name) in str(info.value)
  assert topologies.ACCEPTED_FORMS in str(info.value)


def test_bn_groups_are_resolved_inside_a_slice():
  assert parallel.resolve_bn_group_size(-1, 16, 2) == 8  # 'global' = the whole slice
  assert parallel.resolve_bn_group_size(0, 512, 2) == 64  # TF's rule on all devices: 512 // 8
  assert parallel.resolve_bn_group_size(0, 64, 4) == 8
  assert parallel.resolve_bn_group_size(0, 16, 4) == 4  # the rule's 8 capped at a slice
  with pytest.raises(ValueError, match='device count of a slice, 4'):
    parallel.resolve_bn_group_size(8, 8, 2)


def test_config_refuses_bn_groups_that_span_slices():
  config = config_lib.base_config()
  config.update_from_flattened_dict({'bn_group_size': 8, 'global_batch_size': 64})
  config_lib.validate(config, 16, 2, 1)
  with pytest.raises(config_lib.ConfigError, match='bn_group_size=8 .* slice, 4 .4 slices'):
    config_lib.validate(config, 16, 4, 4)


def test_one_process_of_cpu_devices_is_one_slice():
  mesh = parallel.create_mesh(2, process_is_slice=True)  # the test process: one slice of 8
  assert dict(mesh.shape) == {'slice': 1, 'replica': 4, 'bn': 2}
  assert list(mesh.devices.flat) == jax.devices()  # the single-slice order
  assert parallel.count_slices() == 1


@needs_libtpu
def test_the_mesh_of_two_tpu_slices_keeps_bn_groups_inside_each():
  devices = topologies.slice_devices(topologies.parse('2xv5e:2x2'))
  for bn, shape in ((2, (2, 2, 2)), (-1, (2, 1, 4)), (0, (2, 4, 1))):
    mesh = parallel.create_mesh(bn, devices=devices)
    assert mesh.devices.shape == shape
    for s in range(2):
      assert {d.slice_index for d in mesh.devices[s].flat} == {s}
  with pytest.raises(ValueError, match='slice'):
    parallel.create_mesh(8, devices=devices)


def test_cross_slice_transfers_are_listed_as_dcn_collectives():
  hlo = ('  %all-reduce.1 = f32[1,8,128]{2,1,0} all-reduce(%x), channel_id=1, '
         'replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%add\n'
         '  %send = (f32[1,8,128]{2,1,0}, u32[], token[]) send(%all-reduce.1, %after-all), '
         'channel_id=2, is_host_transfer=true, '
         'frontend_attributes={_xla_host_transfer_handler_name='
         '"xla_megascale_runtime",_xla_megascale_transfer_type="ALL_REDUCE"}\n'
         '  %send-done = token[] send-done(%send), channel_id=2, is_host_transfer=true\n')
  assert plan_core.collectives(hlo, 4, 2) == {'all-reduce/4': {'count': 1, 'bytes': 4096},
                                              'dcn-all-reduce/2': {'count': 1, 'bytes': 4096 + 4}}


TINY_FLAGS = ['--config=configs/demo.py', '--config.dtype=bfloat16',
              '--config.model_overrides.stages=((1,3,1,1,16),)',
              '--config.model_overrides.head_features=32',
              '--config.data.image_size=16', '--config.global_batch_size=32']


def run_plan_cli(capsys, *argv):
  from advprop_jax import plan
  status = cli.call(plan.define_flags, plan.main, 'advprop_jax.plan', list(argv))
  out, err = capsys.readouterr()
  return status, out, err


@pytest.mark.parametrize('topology', ['0xv4-8', '2xv3-32', '2x', '3xv5litepod-4x'])
def test_plan_refuses_a_malformed_multislice_name_in_one_line(capsys, tmp_path, topology):
  status, _, err = run_plan_cli(capsys, *TINY_FLAGS, f'--topology={topology}',
                                f'--output={tmp_path}')
  lines = [line for line in err.splitlines() if line.strip()]
  assert status == 2 and len(lines) == 1 and '--topology' in lines[0] and repr(topology) in lines[0]
  assert not list(tmp_path.iterdir())


@pytest.mark.slow
@needs_libtpu
def test_a_tiny_model_plans_on_two_slices_with_the_gradient_mean_across_them(capsys, tmp_path):
  status, out, _ = run_plan_cli(capsys, *TINY_FLAGS, '--topology=2xv5litepod-4',
                                f'--output={tmp_path}',
                                '--config.bn_group_size=-1', '--train_examples=1797')
  assert status == 0, out[-3000:]
  result = json.loads(out.strip().splitlines()[-1])
  assert (result['slices'], result['devices'], result['processes'], result['chips']) == (2, 8, 2, 8)
  assert result['bn_group_size'] == 4 and result['per_core_batch'] == 4 and result['fits']
  # The program is per slice: in-slice collectives span at most its 4 devices (BN statistics over
  # the whole slice, and the first half of the gradient mean); the mean across the 2 slices goes
  # over the data-centre network, at least every parameter's gradient.
  dcn = result['collectives'].pop('dcn-all-reduce/2')
  assert dcn['count'] >= 1 and dcn['bytes'] >= result['param_bytes']
  assert result['collectives'] and all(int(k.split('/')[1]) <= 4 for k in result['collectives'])
  assert result['projection']['floor_chip_hours'] > 0
  assert (tmp_path / 'efficientnet-b0-advprop-2xv5litepod-4.md').read_text().startswith(
      '| efficientnet-b0 | advprop | 2xv5litepod-4 | 8/2 |')
  np.testing.assert_allclose(result['flops_per_image'], result['flops_per_step'] / 32)


@pytest.mark.slow  # two CPU compiles: about a minute of one core
def test_a_step_on_two_slices_is_the_step_on_one_slice_with_the_same_bn_groups(tiny_model_factory):
  """2 slices of 4 devices with BN groups of 2 compute what 1 slice of 8 does with groups of 2: the
  slice axis only adds where the gradient mean goes (bitwise equal on CPU)."""
  from jax.sharding import Mesh
  from advprop_jax import optim
  from advprop_jax import step as step_lib
  config = config_lib.base_config()
  config.update_from_flattened_dict({'num_classes': 10, 'data.image_size': 8,
                                     'global_batch_size': 16,
                                     'attack.epsilon_pixels': 2.0})
  model = tiny_model_factory(stages=((1, 3, 1, 1, 16),), head_features=16)
  lr = optim.learning_rate_schedule(base_lr=0.05, steps_per_epoch=10, num_epochs=1, warmup_epochs=0,
                                    schedule='constant')
  tx = optim.create_optimizer('rmsprop', lr)
  rs = np.random.RandomState(0)
  batch = {'image': rs.uniform(-1, 1, (16, 8, 8, 3)).astype(np.float32),
           'label': rs.randint(0, 10, 16).astype(np.int32)}
  states = []
  for shape in ((1, 4, 2), (2, 2, 2)):
    mesh = Mesh(np.asarray(jax.devices()).reshape(shape), parallel.DATA_AXES)
    state = step_lib.create_train_state(model, tx, jax.random.PRNGKey(0), 8, mesh)
    step = step_lib.make_train_step(model, tx, config, mesh, lr, 0.9999)
    state, _ = step(state, jax.device_put(batch, parallel.batch_sharding(mesh)),
                    jax.random.PRNGKey(1))
    states.append(jax.device_get(state))
  jax.tree.map(np.testing.assert_array_equal, states[0], states[1])
