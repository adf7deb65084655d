"""Pretrained weights in and out (issue #6): timm / TF import, timm / Flax / SavedModel export; ResNet <-> timm.

Fixtures in tests/fixtures were made by scripts/make_timm_fixture.py with timm (torch is not needed here).
"""
import functools
import gzip
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from advprop_jax import convert, export, predict
from advprop_jax.models import create_model
from export_fixtures import random_variables

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
with open(os.path.join(FIXTURES, 'tiny_timm.json')) as _f:
  TINY = json.load(_f)
OVERRIDES = dict(width=TINY['width'], depth=TINY['depth'])
# RECIPE §1: exact parameter counts (main BN only, 1000 classes).
PARAM_COUNTS = dict(b0=5288548, b1=7794184, b2=9109994, b3=12233232, b4=19341616, b5=30389784,
                    b6=43040704, b7=66347960, b8=87413142)


@functools.partial(jax.jit, static_argnames='distribution')
def APPLY(variables, x, distribution='clean'):  # pylint: disable=invalid-name
  """The tiny model's eval-mode logits (one compiled function shared by the tests)."""
  return create_model('efficientnet-b0', num_classes=TINY['num_classes'], **OVERRIDES).apply(
      variables, x, train=False, distribution=distribution)


@pytest.fixture(scope='module')
def timm_state():
  return convert.load_state_dict(os.path.join(FIXTURES, 'tiny_timm.safetensors'))


@pytest.fixture(scope='module')
def tiny():
  return create_model('efficientnet-b0', num_classes=TINY['num_classes'], **OVERRIDES)


@pytest.fixture(scope='module')
def tiny_variables(timm_state):
  return convert.timm_to_flax(timm_state, 'efficientnet-b0', **OVERRIDES)


def flat(tree):
  return traverse_util.flatten_dict(jax.device_get(dict(tree)))


def test_tiny_model_matches_timm_logits(tiny, tiny_variables):
  io = np.load(os.path.join(FIXTURES, 'tiny_timm_io.npz'))
  assert io['inputs'].shape[1] % 2 == 1  # odd size: TF 'SAME' padding matters
  logits = np.asarray(APPLY(tiny_variables, io['inputs']))
  np.testing.assert_allclose(logits, io['logits'], atol=1e-4, rtol=0)
  # Auxiliary BNs start as copies of the main ones, so the 'adv' pass gives the same function.
  assert set(tiny_variables) == {'params', 'batch_stats', 'batch_stats_adv'}
  adv = np.asarray(APPLY(tiny_variables, io['inputs'], distribution='adv'))
  np.testing.assert_allclose(adv, io['logits'], atol=1e-4, rtol=0)
  bn = tiny_variables['params']['blocks_1_0']['project_bn']
  np.testing.assert_array_equal(bn['scale_adv'], bn['scale'])
  assert not np.allclose(bn['scale'], 1.0)  # the fixture's BN affines/statistics are random
  np.testing.assert_array_equal(tiny_variables['batch_stats_adv']['head_bn']['var'],
                                tiny_variables['batch_stats']['head_bn']['var'])


@pytest.mark.parametrize('size', sorted(PARAM_COUNTS))
def test_full_size_mapping_matches_timm_names_and_shapes(size):
  with gzip.open(os.path.join(FIXTURES, 'timm_keys.json.gz'), 'rt') as f:
    reference = {k: tuple(s) for k, s in json.load(f)['keys'][f'efficientnet-{size}']}
  table = convert.timm_mapping(f'efficientnet-{size}', distributions=('clean',))  # eval_shape, no weights
  ours = {e.name: e.foreign_shape for e in table}
  assert len(ours) == len(table)
  weights = {k: s for k, s in reference.items() if not k.endswith('.num_batches_tracked')}
  assert sorted(set(weights) - set(ours))[:5] == [] and sorted(set(ours) - set(weights))[:5] == []
  assert ours == weights
  # ... each to exactly one Flax variable, none left over
  module = create_model(f'efficientnet-{size}', distributions=('clean',))
  paths = [e.path for e in table]
  assert len(set(paths)) == len(paths) and set(paths) == set(convert.abstract_variables(module))
  count = sum(int(np.prod(s)) for k, s in weights.items() if not k.endswith(('running_mean', 'running_var')))
  assert count == PARAM_COUNTS[size]


def test_round_trip_is_bit_identical(tiny, timm_state):
  rng = np.random.RandomState(3)  # random values for every variable (eval_shape: no init compute)
  shapes = jax.eval_shape(lambda: tiny.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), train=False))
  variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  state = convert.flax_to_timm(variables, tiny)
  assert state['bn1.num_batches_tracked'].dtype == np.int64 and state['bn1.num_batches_tracked'].shape == ()
  assert state['blocks.0.0.conv_dw.weight'].shape == (8, 1, 3, 3)  # OIHW depthwise
  assert state['classifier.weight'].shape == (10, 320)  # [out, in]
  back = flat(convert.timm_to_flax(state, tiny))
  for path, value in flat(variables).items():
    distribution, main = convert.mapping.split_distribution(path, tiny.distributions)
    np.testing.assert_array_equal(back[path], flat(variables)[main], err_msg='/'.join(path))
    if distribution == 'clean':
      assert back[path].dtype == value.dtype
  # timm -> flax -> timm on the fixture, too (num_batches_tracked is not a weight: written as 0)
  again = convert.flax_to_timm(convert.timm_to_flax(timm_state, 'efficientnet-b0', **OVERRIDES),
                               'efficientnet-b0', **OVERRIDES)
  assert set(again) == set(timm_state)
  for k, v in timm_state.items():
    if not k.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(again[k], v, err_msg=k)


def _raises_once(fn, *names):
  with pytest.raises(ValueError) as info:
    fn()
  for name in names:
    assert name in str(info.value), (name, str(info.value))
  return str(info.value)


def test_bad_inputs_raise_one_value_error_naming_tensors(timm_state, tiny_variables):
  convert_ = lambda sd, name='efficientnet-b0': convert.timm_to_flax(sd, name, **OVERRIDES)
  _raises_once(lambda: convert_(timm_state, 'efficientnet-b9'), 'efficientnet-b9')
  missing = {k: v for k, v in timm_state.items() if k not in ('conv_stem.weight', 'bn2.running_var')}
  _raises_once(lambda: convert_(missing), 'missing conv_stem.weight', 'missing bn2.running_var')
  extra = dict(timm_state, **{'blocks.9.0.conv_pw.weight': np.zeros((1, 1, 1, 1), np.float32)})
  _raises_once(lambda: convert_(extra), 'unexpected blocks.9.0.conv_pw.weight')
  bad = dict(timm_state, **{'blocks.1.0.bn2.weight': np.zeros((3,), np.float32)})
  _raises_once(lambda: convert_(bad), 'shape mismatch blocks.1.0.bn2.weight')
  message = _raises_once(lambda: convert.timm_to_flax(timm_state, 'efficientnet-b2'), 'mismatch')
  assert message.count('\n') <= convert.mapping.MAX_LISTED + 2  # lists the first ones only
  incomplete = flat(tiny_variables)
  del incomplete['params', 'head_bn', 'scale']
  incomplete['params', 'stem_conv', 'kernel'] = np.zeros((3, 3, 3, 9), np.float32)
  incomplete['params', 'stem_conv', 'bias'] = np.zeros((8,), np.float32)
  _raises_once(lambda: convert.flax_to_timm(traverse_util.unflatten_dict(incomplete), 'efficientnet-b0',
                                            **OVERRIDES),
               'missing Flax variable params/head_bn/scale (for bn2.weight)',
               'shape mismatch params/stem_conv/kernel', 'unexpected Flax variable params/stem_conv/bias')


class _FakeTensor:
  def __init__(self, array):
    self.array = array

  def detach(self):
    return self

  def cpu(self):
    return self

  def is_floating_point(self):
    return self.array.dtype.kind == 'f'

  def float(self):
    return _FakeTensor(self.array.astype(np.float32))

  def numpy(self):
    return self.array


def test_pth_is_loaded_only_with_weights_only(monkeypatch, tmp_path, timm_state):
  calls = []

  def fake_load(path, **kwargs):
    calls.append(kwargs)
    return {'state_dict_ema': {'module.' + k: _FakeTensor(v) for k, v in timm_state.items()}}

  monkeypatch.setitem(sys.modules, 'torch', types.SimpleNamespace(load=fake_load))
  path = tmp_path / 'w.pth'
  path.write_bytes(b'not a pickle')
  state = convert.load_state_dict(str(path))
  assert calls and all(c.get('weights_only') is True for c in calls)
  assert set(state) == set(timm_state)
  np.testing.assert_array_equal(state['conv_stem.weight'], timm_state['conv_stem.weight'])
  monkeypatch.setitem(sys.modules, 'torch', None)  # torch absent -> a clear ImportError, no unpickling
  with pytest.raises(ImportError, match='weights_only'):
    convert.load_state_dict(str(path))
  with pytest.raises(ValueError, match='Unknown weight file type'):
    convert.load_state_dict(str(tmp_path / 'w.pkl'))


def _timm_to_tf(name, value):
  """Independent layout rules: timm OIHW conv -> TF HWIO, depthwise -> [k,k,C,1], Linear -> [in, out]."""
  if value.ndim == 4:
    return np.transpose(value, (2, 3, 0, 1) if 'conv_dw' in name else (2, 3, 1, 0))
  return value.T if value.ndim == 2 else value


def test_tf_checkpoint_import_prefers_ema_shadows(tmp_path, timm_state, tiny):
  import tensorflow as tf
  tf_table = {e.path: e for e in convert.tf_mapping('efficientnet-b0', num_classes=10, **OVERRIDES)}
  timm_table = convert.timm_mapping('efficientnet-b0', num_classes=10, **OVERRIDES)
  names = {e.name: e.foreign_shape for e in tf_table.values()}
  # Spelled out from RECIPE §6: a first-stage block (no expand) and an expanded one, global numbering.
  c = 8
  assert {k: v for k, v in names.items() if k.startswith('blocks_0/')} == {
      'blocks_0/depthwise_conv2d/depthwise_kernel': (3, 3, c, 1),
      **{f'blocks_0/tpu_batch_normalization/{s}': (c,) for s in ('gamma', 'beta', 'moving_mean',
                                                                  'moving_variance')},
      'blocks_0/se/conv2d/kernel': (1, 1, c, 2), 'blocks_0/se/conv2d/bias': (2,),
      'blocks_0/se/conv2d_1/kernel': (1, 1, 2, c), 'blocks_0/se/conv2d_1/bias': (c,),
      'blocks_0/conv2d/kernel': (1, 1, c, 8),
      **{f'blocks_0/tpu_batch_normalization_1/{s}': (8,) for s in ('gamma', 'beta', 'moving_mean',
                                                                    'moving_variance')}}
  assert names['blocks_1/conv2d/kernel'] == (1, 1, 8, 48)  # expand
  assert names['blocks_1/conv2d_1/kernel'] == (1, 1, 48, 8)  # project
  assert names['blocks_1/tpu_batch_normalization_2/gamma'] == (8,)
  assert names['head/dense/kernel'] == (320, 10) and names['stem/conv2d/kernel'] == (3, 3, 3, 8)
  n_blocks = len({p[1] for p in tf_table if p[1].startswith('blocks_')})
  assert f'blocks_{n_blocks - 1}/se/conv2d_1/bias' in names and f'blocks_{n_blocks}/conv2d/kernel' not in names

  scope, rng = 'efficientnet-b0', np.random.RandomState(4)
  tensors = {'global_step': np.array(7, np.int64)}
  for e in timm_table:  # EMA shadow = the fixture's weights; raw variable and RMSProp slot = noise
    tf_name = f'{scope}/{tf_table[e.path].name}'
    ema = _timm_to_tf(e.name, timm_state[e.name])
    tensors[tf_name + '/ExponentialMovingAverage'] = ema
    tensors[tf_name] = ema + rng.normal(size=ema.shape).astype(np.float32)
    tensors[tf_name + '/RMSProp'] = np.ones_like(ema)
  prefix = str(tmp_path / 'model.ckpt')
  keys = sorted(tensors)
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=keys, shape_and_slices=[''] * len(keys),
                    tensors=[tf.constant(tensors[k]) for k in keys])

  variables = convert.tf_checkpoint_to_flax(prefix, 'efficientnet-b0', **OVERRIDES)
  io = np.load(os.path.join(FIXTURES, 'tiny_timm_io.npz'))
  logits = np.asarray(APPLY(variables, io['inputs']))
  np.testing.assert_allclose(logits, io['logits'], atol=1e-4, rtol=0)
  raw = convert.tf_checkpoint_to_flax(prefix, 'efficientnet-b0', prefer_ema=False, **OVERRIDES)
  np.testing.assert_array_equal(raw['params']['stem_conv']['kernel'],
                                tensors[f'{scope}/stem/conv2d/kernel'])
  assert not np.array_equal(raw['params']['stem_conv']['kernel'], variables['params']['stem_conv']['kernel'])

  tensors[f'{scope}/blocks_0/conv2d_7/kernel'] = np.zeros((1,), np.float32)  # unknown weight
  del tensors[f'{scope}/head/conv2d/kernel'], tensors[f'{scope}/head/conv2d/kernel/ExponentialMovingAverage']
  prefix2 = str(tmp_path / 'bad.ckpt')
  keys = sorted(tensors)
  tf.raw_ops.SaveV2(prefix=prefix2, tensor_names=keys, shape_and_slices=[''] * len(keys),
                    tensors=[tf.constant(tensors[k]) for k in keys])
  _raises_once(lambda: convert.tf_checkpoint_to_flax(prefix2, 'efficientnet-b0', **OVERRIDES),
               'missing head/conv2d/kernel', f'unexpected {scope}/blocks_0/conv2d_7/kernel')


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, tiny_variables):
  """A training workdir as the trainer writes it (Checkpointer + full config.json)."""
  from advprop_jax import checkpoints
  from advprop_jax import config as config_lib
  from advprop_jax import step as step_lib
  directory = tmp_path_factory.mktemp('workdir')
  rng = np.random.RandomState(5)
  # The auxiliary BN differs from the main one: exporting the wrong distribution must show.
  ema_params = jax.tree.map(np.copy, tiny_variables['params'])
  for module in traverse_util.flatten_dict(ema_params, sep='/'):
    if module.endswith('_adv'):
      *parents, leaf = module.split('/')
      node = ema_params
      for p in parents:
        node = node[p]
      node[leaf] = node[leaf] + rng.normal(size=node[leaf].shape).astype(np.float32)
  stats = {'batch_stats': tiny_variables['batch_stats'],
           'batch_stats_adv': jax.tree.map(lambda a: a * 3.0, tiny_variables['batch_stats_adv'])}
  state = step_lib.TrainState(step=np.int32(10), params=ema_params, model_state=stats, opt_state=(),
                           ema_params=ema_params, ema_model_state=stats)
  checkpointer = checkpoints.Checkpointer(str(directory), every_steps=1, keep=2,
                                          config_fingerprint={}, async_save=False)
  checkpointer.save(10, state, {})
  checkpointer.close()
  config = config_lib.base_config()
  config.model_overrides = OVERRIDES
  config.num_classes = 10
  config.data.image_size = 35
  config.data.crop_fraction = 0.875
  (directory / 'config.json').write_text(config.to_json_best_effort())
  return str(directory)


def test_export_flax_timm_savedmodel(workdir, tmp_path, tiny, tiny_variables, timm_state):
  config, variables = export.load_inference_variables(workdir)
  assert set(variables) == {'params', 'batch_stats', 'batch_stats_adv'}
  main = convert.main_distribution(tiny_variables, tiny.distributions)
  io = np.load(os.path.join(FIXTURES, 'tiny_timm_io.npz'))

  export.export(workdir, 'flax', str(tmp_path / 'flax'))
  config2, module, exported = export.load_exported_flax(str(tmp_path / 'flax'))
  assert config2['model'] == 'efficientnet-b0' and config2['input_range'] == [-1.0, 1.0]
  assert tuple(module.distributions) == ('clean',)
  assert jax.tree.structure(exported) == jax.tree.structure(main)
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(main)):
    np.testing.assert_array_equal(a, b)

  config3, _, predictor_variables = predict.load_predictor(str(tmp_path / 'flax'))
  assert config3 == config2 and jax.tree.structure(predictor_variables) == jax.tree.structure(main)

  assert export.call([f'--workdir={workdir}', '--format=timm', f'--output={tmp_path / "w.safetensors"}']) == 0
  written = convert.load_state_dict(str(tmp_path / 'w.safetensors'))
  assert set(written) == set(timm_state)
  np.testing.assert_array_equal(written['blocks.1.0.bn3.running_var'], timm_state['blocks.1.0.bn3.running_var'])

  export.export_savedmodel(config, variables, str(tmp_path / 'sm'), platforms=('cpu',),
                           depthwise_impl='grouped')  # the fastest to lower and compile
  import tensorflow as tf
  loaded = tf.saved_model.load(str(tmp_path / 'sm'))
  probs = loaded.signatures['serving_default'](images=tf.constant(io['inputs']))['probabilities'].numpy()
  np.testing.assert_allclose(probs, jax.nn.softmax(io['logits']), atol=1e-5)
  pixels = np.random.RandomState(6).randint(0, 256, (1, 35, 35, 3)).astype(np.uint8)
  probs8 = loaded.signatures['serving_uint8'](images=tf.constant(pixels))['probabilities'].numpy()
  reference = jax.nn.softmax(APPLY(tiny_variables, (pixels / 127.5 - 1.0).astype(np.float32)))
  np.testing.assert_allclose(probs8, reference, atol=1e-5)

  with pytest.raises(ValueError, match='format'):
    export.export(workdir, 'onnx', str(tmp_path / 'x'))


# --------------------------------------------------------------------------------------------------------
# ResNet <-> timm (= torchvision names)
# --------------------------------------------------------------------------------------------------------
def test_resnet50_mapping_has_torchvision_names_and_parameter_count():
  table = convert.timm_mapping('resnet50', distributions=('clean',))
  ours = {e.name: e.foreign_shape for e in table}
  assert len(ours) == 267  # 53 convs, 53 BNs x 4, fc weight + bias (320 with num_batches_tracked)
  assert {k: v for k, v in ours.items() if k.startswith('layer2.0.')} == {
      'layer2.0.conv1.weight': (128, 256, 1, 1), 'layer2.0.conv2.weight': (128, 128, 3, 3),
      'layer2.0.conv3.weight': (512, 128, 1, 1), 'layer2.0.downsample.0.weight': (512, 256, 1, 1),
      **{f'layer2.0.{bn}.{leaf}': (c,) for bn, c in (('bn1', 128), ('bn2', 128), ('bn3', 512),
                                                     ('downsample.1', 512))
         for leaf in ('weight', 'bias', 'running_mean', 'running_var')}}
  assert ours['conv1.weight'] == (64, 3, 7, 7) and ours['fc.weight'] == (1000, 2048)
  assert 'layer4.2.bn3.bias' in ours
  assert 'layer1.1.downsample.0.weight' not in ours and 'layer4.3.conv1.weight' not in ours
  count = sum(int(np.prod(s)) for k, s in ours.items() if not k.endswith(('running_mean', 'running_var')))
  assert count == 25_557_032
  with pytest.raises(ValueError, match='timm'):
    convert.tf_mapping('resnet50')


def _np_conv(x, w, stride, pad):
  """torch Conv2d (no bias): NCHW input, OIHW weight, symmetric zero padding."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  kh, kw = w.shape[2:]
  oh, ow = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
  out = 0.0
  for a in range(kh):
    for b in range(kw):
      out = out + np.einsum('nchw,oc->nohw', x[:, :, a:a + stride * oh:stride, b:b + stride * ow:stride],
                            w[:, :, a, b])
  return out


def _np_resnet(sd, x, stage_sizes):
  """An independent torchvision ResNet v1.5 forward (eval mode) on a timm/torchvision state dict."""
  relu = lambda y: np.maximum(y, 0.0)

  def bn(y, name):
    shape = (1, -1, 1, 1)
    scale = sd[name + '.weight'] / np.sqrt(sd[name + '.running_var'] + 1e-5)
    centred = y - sd[name + '.running_mean'].reshape(shape)
    return centred * scale.reshape(shape) + sd[name + '.bias'].reshape(shape)

  y = relu(bn(_np_conv(x, sd['conv1.weight'], 2, 3), 'bn1'))
  y = np.pad(y, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)  # MaxPool2d(3, 2, padding=1)
  oh, ow = (y.shape[2] - 3) // 2 + 1, (y.shape[3] - 3) // 2 + 1
  y = np.max([y[:, :, a:a + 2 * oh:2, b:b + 2 * ow:2] for a in range(3) for b in range(3)], axis=0)
  for s, blocks in enumerate(stage_sizes, 1):
    for i in range(blocks):
      p, stride = f'layer{s}.{i}.', 2 if i == 0 and s > 1 else 1
      out = relu(bn(_np_conv(y, sd[p + 'conv1.weight'], 1, 0), p + 'bn1'))
      out = relu(bn(_np_conv(out, sd[p + 'conv2.weight'], stride, 1), p + 'bn2'))
      out = bn(_np_conv(out, sd[p + 'conv3.weight'], 1, 0), p + 'bn3')
      if p + 'downsample.0.weight' in sd:
        y = bn(_np_conv(y, sd[p + 'downsample.0.weight'], stride, 0), p + 'downsample.1')
      y = relu(out + y)
  return y.mean(axis=(2, 3)) @ sd['fc.weight'].T + sd['fc.bias']


def test_resnet_timm_export_computes_the_same_function_and_round_trips():
  overrides = dict(stage_sizes=(1, 2), base_width=4)
  module = create_model('resnet50', num_classes=5, **overrides)  # clean + adv BNs
  variables = random_variables(module, seed=9)
  state = convert.flax_to_timm(variables, 'resnet50', **overrides)
  assert state['layer1.0.downsample.0.weight'].shape == (16, 4, 1, 1)  # OIHW
  assert state['fc.weight'].shape == (5, 32) and state['bn1.num_batches_tracked'].dtype == np.int64
  x = np.random.RandomState(10).normal(size=(2, 17, 17, 3)).astype(np.float32)  # odd size: padding matters
  logits = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)
  expected = _np_resnet({k: np.asarray(v, np.float64) for k, v in state.items()},
                        x.transpose(0, 3, 1, 2).astype(np.float64), overrides['stage_sizes'])
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=1e-4)
  back = flat(convert.timm_to_flax(state, 'resnet50', **overrides))  # num_classes from fc.weight
  for path, value in flat(variables).items():
    _, main = convert.mapping.split_distribution(path, module.distributions)
    np.testing.assert_array_equal(back[path], flat(variables)[main], err_msg='/'.join(path))
