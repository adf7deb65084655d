"""ResNet v1.5: torchvision parameter counts and layout, per-distribution BN, stage composition.

Full-size models are only traced (jax.eval_shape); anything that computes uses a tiny variant.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from advprop_jax import models

# torchvision (50/101/152) and timm (200) parameter counts, 1000 classes, main BNs only.
# resnet200 was also recomputed from the closed-form bottleneck formula: 64,673,832.
TORCHVISION_COUNTS = {
    'resnet50': 25_557_032,
    'resnet101': 44_549_160,
    'resnet152': 60_192_808,
    'resnet200': 64_673_832,
}


def _abstract_init(model, size=224):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                                           train=False))


def _clean_count(params):
  flat = traverse_util.flatten_dict(params)
  return sum(int(np.prod(v.shape)) for k, v in flat.items() if not k[-1].endswith('_adv'))


@pytest.mark.parametrize('name', sorted(TORCHVISION_COUNTS))
def test_parameter_count_matches_torchvision(name):
  variables = _abstract_init(models.create_model(name))
  assert set(variables) == {'params', 'batch_stats', 'batch_stats_adv'}
  assert _clean_count(variables['params']) == TORCHVISION_COUNTS[name]
  # The adversarial BN mirrors every clean BN: same stats tree, a scale_adv/bias_adv per scale/bias.
  stats = jax.tree_util.tree_structure(variables['batch_stats'])
  assert jax.tree_util.tree_structure(variables['batch_stats_adv']) == stats
  flat = traverse_util.flatten_dict(variables['params'])
  assert sum(k[-1] == 'scale_adv' for k in flat) == sum(k[-1] == 'scale' for k in flat) > 0


def test_zero_init_residual_keeps_count():
  count = _clean_count(_abstract_init(models.create_model('resnet50', zero_init_residual=False))['params'])
  assert count == TORCHVISION_COUNTS['resnet50']


def test_full_size_stage_and_logit_shapes():
  model = models.create_model('resnet50')
  variables = _abstract_init(model)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  expected = {1: (2, 56, 56, 256), 2: (2, 28, 28, 512), 3: (2, 14, 14, 1024), 4: (2, 7, 7, 2048)}
  for stage, shape in expected.items():
    out = jax.eval_shape(lambda v, x, s=stage: model.apply(v, x, to_stage=s), variables, x)
    assert out.shape == shape, stage
  logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  assert (logits.shape, logits.dtype) == ((2, 1000), jnp.float32)
  # bfloat16 activations still give float32 logits.
  bf16 = models.create_model('resnet50', dtype=jnp.bfloat16, num_classes=7)
  logits = jax.eval_shape(lambda v, x: bf16.apply(v, x), _abstract_init(bf16), x)
  assert (logits.shape, logits.dtype) == ((2, 7), jnp.float32)


def test_torchvision_module_names_and_kernel_shapes():
  params = _abstract_init(models.create_model('resnet50'))['params']
  expected_top = {'conv1', 'bn1', 'fc'} | {f'layer{s}_{i}' for s, n in enumerate((3, 4, 6, 3), 1)
                                          for i in range(n)}
  assert set(params) == expected_top
  assert set(params['layer1_0']) == {'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3',
                                     'downsample_conv', 'downsample_bn'}
  # Projection shortcut only on the first block of each stage, as in torchvision.
  assert 'downsample_conv' not in params['layer1_1'] and 'downsample_conv' not in params['layer4_2']
  shapes = {'conv1': (7, 7, 3, 64), 'layer1_0/conv1': (1, 1, 64, 64),
            'layer2_0/conv1': (1, 1, 256, 128), 'layer2_0/conv2': (3, 3, 128, 128),
            'layer2_0/conv3': (1, 1, 128, 512), 'layer2_0/downsample_conv': (1, 1, 256, 512),
            'fc': (2048, 1000)}
  for path, shape in shapes.items():
    node = params
    for part in path.split('/'):
      node = node[part]
    assert node['kernel'].shape == shape, path
  assert set(params['bn1']) == {'scale', 'bias', 'scale_adv', 'bias_adv'}


# --- Tiny variant. Compilation dominates on CPU, so the tests share one init and a few jitted programs.

TINY = models.create_model('resnet50', num_classes=10, stage_sizes=(1, 1, 1, 1), base_width=16)


def _image(batch=2, size=32, seed=1):
  return jax.random.uniform(jax.random.PRNGKey(seed), (batch, size, size, 3), minval=-1, maxval=1)


def _init(model, x):
  # The 'rbg' PRNG: threefry compiles slowly on CPU (it took most of this file's time); same distributions.
  return jax.jit(model.init)(jax.random.key(0, impl='rbg'), x)


@pytest.fixture(scope='module')
def tiny_variables():
  return _init(TINY, _image())


@jax.jit
def _eval_clean(variables, x):
  logits, state = TINY.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
  return logits, state['intermediates']


@jax.jit
def _train_adv(variables, x):
  return TINY.apply(variables, x, train=True, distribution='adv', mutable=['batch_stats_adv'])


def _ones_bn3(variables):
  """zero_init_residual=False's values without another init: every bn3 scale (all distributions) to 1."""
  flat = traverse_util.flatten_dict(variables['params'])
  flat = {k: (jnp.ones_like(v) if k[-2] == 'bn3' and k[-1].startswith('scale') else v)
          for k, v in flat.items()}
  return dict(variables, params=traverse_util.unflatten_dict(flat))


def test_stride_is_on_the_3x3_conv_v1_5(tiny_variables):
  _, inter = _eval_clean(tiny_variables, _image())
  assert inter['bn1']['__call__'][0].shape[1:3] == (16, 16)  # stem conv: /2 with padding 3
  assert inter['layer1_0']['__call__'][0].shape[1:3] == (8, 8)  # max-pool: /2 with padding 1
  block = inter['layer2_0']
  assert block['conv1']['__call__'][0].shape[1:3] == (8, 8)  # v1 would stride here
  assert block['conv2']['__call__'][0].shape[1:3] == (4, 4)
  assert block['downsample_conv']['__call__'][0].shape[1:3] == (4, 4)
  assert 'downsample_conv' in inter['layer1_0']  # 16 -> 64 channels at stride 1 still projects


def _conv(x, kernel, stride, pad):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def test_padding_is_symmetric_like_torchvision(tiny_variables):
  # TF 'SAME' gives the same shapes at stride 2 on even sizes but pads bottom/right only, which would
  # shift ported torchvision weights by a pixel: compare values against explicitly padded references.
  x = _image()
  params = tiny_variables['params']
  _, inter = _eval_clean(tiny_variables, x)

  def out(*path):  # captured output of the submodule at `path`
    node = inter
    for part in path:
      node = node[part]
    return node['__call__'][0]
  tol = dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out('conv1'), _conv(x, params['conv1']['kernel'], 2, 3), **tol)
  # Max-pool 3x3/2 with one -inf pixel on every side, seen through layer1_0's 1x1 conv1.
  pooled = jax.lax.reduce_window(jax.nn.relu(out('bn1')), -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                                 (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))
  np.testing.assert_allclose(out('layer1_0', 'conv1'),
                             _conv(pooled, params['layer1_0']['conv1']['kernel'], 1, 0), **tol)
  np.testing.assert_allclose(out('layer2_0', 'conv2'),
                             _conv(jax.nn.relu(out('layer2_0', 'bn1')),
                                   params['layer2_0']['conv2']['kernel'], 2, 1), **tol)


def test_adv_train_pass_leaves_clean_statistics_bit_identical(tiny_variables):
  x = _image()
  # Non-default clean statistics, so that a write of the adversarial batch's statistics would show.
  variables = dict(tiny_variables, batch_stats=jax.tree_util.tree_map(
      lambda a: a + 0.25, tiny_variables['batch_stats']))
  clean_before, _ = _eval_clean(variables, x)
  logits, updates = _train_adv(variables, x * 3 + 1)
  assert set(updates) == {'batch_stats_adv'}
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b),
                                   variables['batch_stats_adv'], updates['batch_stats_adv'])
  assert all(jax.tree_util.tree_leaves(changed))  # every adversarial BN saw the batch
  merged = dict(variables, **updates)
  same = jax.tree_util.tree_map(np.array_equal, variables['batch_stats'], merged['batch_stats'])
  assert all(jax.tree_util.tree_leaves(same))
  np.testing.assert_array_equal(_eval_clean(merged, x)[0], clean_before)


def test_collections_written_per_distribution(tiny_variables):
  # Shapes only (no compile): which collections each pass returns.
  def updated(**kwargs):
    _, updates = jax.eval_shape(lambda v: TINY.apply(v, _image(), train=True, **kwargs), tiny_variables)
    return set(updates)
  assert updated(mutable=['batch_stats']) == {'batch_stats'}
  assert updated(distribution='adv', mutable=['batch_stats_adv']) == {'batch_stats_adv'}
  with pytest.raises(ValueError, match='distribution'):
    jax.eval_shape(lambda v: TINY.apply(v, _image(), distribution='adv2'), tiny_variables)


def test_from_stage_to_stage_compose_to_full_forward(tiny_variables):
  variables = _ones_bn3(tiny_variables)  # non-zero residual branches, so every block matters

  shapes_seen = {}  # recorded while tracing: shapes are static

  @jax.jit
  def run(v, x):
    out = {}
    for train in (False, True):
      apply = lambda inp, **kw: TINY.apply(v, inp, train=train, distribution='adv', **kw)
      out[train, 'full'] = apply(x)
      for stage in range(5):
        feature = apply(x, to_stage=stage)
        shapes_seen[train, stage] = feature.shape
        out[train, str(stage)] = apply(feature, from_stage=stage)
      # Middle segments compose too: 1 -> 3 -> logits.
      out[train, 'middle'] = apply(apply(apply(x, to_stage=1), from_stage=1, to_stage=3), from_stage=3)
    return out
  out = run(variables, _image())
  shapes = {0: (2, 32, 32, 3), 1: (2, 8, 8, 64), 2: (2, 4, 4, 128), 3: (2, 2, 2, 256), 4: (2, 1, 1, 512)}
  for train in (False, True):
    full = out[train, 'full']
    assert full.shape == (2, 10) and np.all(np.isfinite(full))
    for stage in range(5):
      assert shapes_seen[train, stage] == shapes[stage]
      np.testing.assert_allclose(out[train, str(stage)], full, rtol=1e-5, atol=1e-5,
                                 err_msg=f'{train=} {stage=}')
    np.testing.assert_allclose(out[train, 'middle'], full, rtol=1e-5, atol=1e-5)
  assert not np.allclose(out[False, 'full'], out[True, 'full'])  # train mode really uses batch stats
  with pytest.raises(ValueError, match='to_stage'):
    TINY.apply(variables, _image(), from_stage=2, to_stage=1)


def test_initialisation_follows_torchvision(tiny_variables):
  params = tiny_variables['params']
  for block in ('layer1_0', 'layer4_0'):
    assert not np.any(params[block]['bn3']['scale']) and not np.any(params[block]['bn3']['scale_adv'])
    np.testing.assert_array_equal(params[block]['bn2']['scale'], 1.0)
  # Conv: untruncated normal with std sqrt(2 / fan_out), fan_out = 3*3*128.
  kernel = np.asarray(params['layer4_0']['conv2']['kernel'])
  assert abs(kernel.std() / np.sqrt(2 / (9 * 128)) - 1) < 0.05
  assert np.abs(kernel).max() > 2.5 * np.sqrt(2 / (9 * 128))  # a truncated normal stops at 2 std
  # fc: uniform(+-1/sqrt(fan_in)) for weight and bias, fan_in = 4 * 128.
  bound = 1 / np.sqrt(512)
  for leaf in (params['fc']['kernel'], params['fc']['bias']):
    assert bound >= np.abs(leaf).max() > 0.5 * bound


def test_remat_gives_same_values_and_gradients(tiny_variables):
  # One stage keeps the two backward compilations cheap; remat wraps every block the same way. Its
  # variables are TINY's stem and first stage (same shapes) and a slice of its fc: no init to compile.
  small = dict(num_classes=10, stage_sizes=(1,), base_width=16)
  plain = models.create_model('resnet50', **small)
  remat = models.create_model('resnet50', remat=True, **small)
  keep = ('conv1', 'bn1', 'layer1_0')
  variables = {c: {k: t[k] for k in keep if k in t} for c, t in _ones_bn3(tiny_variables).items()}
  fc = tiny_variables['params']['fc']
  variables['params']['fc'] = dict(kernel=fc['kernel'][:64], bias=fc['bias'])
  x = _image(size=16)

  @jax.jit
  def grads(params):
    def loss(model, p):
      logits, _ = model.apply(dict(variables, params=p), x, train=True, distribution='adv',
                              mutable=['batch_stats_adv'])
      return jnp.sum(logits ** 2)
    return jax.grad(lambda p: loss(plain, p))(params), jax.grad(lambda p: loss(remat, p))(params)
  g_plain, g_remat = grads(variables['params'])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         g_plain, g_remat)
  assert np.any(np.asarray(g_plain['layer1_0']['conv1']['kernel']))


def test_registry():
  for name in TORCHVISION_COUNTS:
    assert name in models.model_names()
    assert models.default_image_size(name) == 224
    assert models.default_crop_fraction(name) == 0.875
  with pytest.raises(ValueError, match='bogus'):
    models.create_model('resnet50', bogus=1)
  model = models.create_model('resnet101', num_classes=5, bn_momentum=0.8)
  assert (tuple(model.stage_sizes), model.bn_momentum, model.bn_epsilon, model.num_classes) == (
      (3, 4, 23, 3), 0.8, 1e-5, 5)
  assert models.create_model('resnet50').bn_momentum == 0.9
