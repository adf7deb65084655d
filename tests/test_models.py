"""EfficientNet B0-B8/L2: architecture facts, per-distribution BatchNorm, depthwise formulations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advprop_jax.models import batchnorm
from advprop_jax.models import conv
from advprop_jax.models import create_model, default_image_size, model_names
from conftest import tiny_efficientnet

# RECIPE §1: exact parameter counts of the clean distribution, 1000 classes.
PARAM_COUNTS = {'b0': 5_288_548, 'b1': 7_794_184, 'b2': 9_109_994, 'b3': 12_233_232,
                'b4': 19_341_616, 'b5': 30_389_784, 'b6': 43_040_704, 'b7': 66_347_960,
                'b8': 87_413_142}


def _clean_param_count(params):
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return sum(int(np.prod(x.shape)) for path, x in flat
             if not str(path[-1].key).startswith(('scale_', 'bias_')))


def _abstract_variables(model, size, batch=1):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((batch, size, size, 3)),
                                           train=False))


@pytest.mark.parametrize('variant', sorted(PARAM_COUNTS))
def test_parameter_count_and_native_output_shape(variant):
  name = f'efficientnet-{variant}'
  model = create_model(name)
  size = default_image_size(name)
  variables = _abstract_variables(model, size)
  assert set(variables) == {'params', 'batch_stats', 'batch_stats_adv'}
  assert _clean_param_count(variables['params']) == PARAM_COUNTS[variant]
  logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, size, size, 3))), variables)
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32


def test_l2_builds_and_registry_names():
  assert {f'efficientnet-b{i}' for i in range(9)} | {'efficientnet-l2'} <= set(model_names())
  variables = _abstract_variables(create_model('efficientnet-l2'), 64)
  assert _clean_param_count(variables['params']) > 400_000_000  # ~480M


def test_unknown_name_and_bad_overrides():
  with pytest.raises(ValueError, match='efficientnet-b0.*efficientnet-b8'):
    create_model('efficientnet-b9')
  with pytest.raises(ValueError, match='widht'):
    create_model('efficientnet-b0', widht=0.5)
  with pytest.raises(ValueError, match='dropout_rate'):
    create_model('efficientnet-b0', dropout_rate=1.5)
  with pytest.raises(ValueError, match='distribution'):
    create_model('efficientnet-b0', distributions=('adv',))


@pytest.fixture(scope='module')
def three_distributions():
  model = tiny_efficientnet(distributions=('clean', 'adv1', 'adv2'))
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(1), x, train=False)
  return model, variables, x


@pytest.mark.parametrize('distribution', ['clean', 'adv1', 'adv2'])
def test_pass_updates_only_its_own_collection(three_distributions, distribution):
  model, variables, x = three_distributions
  assert set(variables) == {'params', 'batch_stats', 'batch_stats_adv1', 'batch_stats_adv2'}
  collection = batchnorm.stats_collection(distribution)
  _, updates = model.apply(variables, x, train=True, distribution=distribution,
                           mutable=[collection])
  assert set(updates) == {collection}
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                                         updates[collection], variables[collection]))
  assert all(changed)  # every BN of this distribution saw the batch
  # Flax enforces isolation: writing another distribution's collection is impossible.
  other = [c for c in variables if c.startswith('batch_stats') and c != collection]
  _, other_updates = model.apply(variables, x, train=True, distribution=distribution,
                                 mutable=other)
  for c in other:
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                                     other_updates[c], variables[c]))


def test_distributions_use_their_own_scale_and_bias(three_distributions):
  model, variables, x = three_distributions
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p + 1.0 if str(path[-1].key) == 'bias_adv1' else p, variables['params'])
  v2 = dict(variables, params=params)
  for d, should_change in (('clean', False), ('adv2', False), ('adv1', True)):
    a = model.apply(variables, x, distribution=d)
    b = model.apply(v2, x, distribution=d)
    assert bool(jnp.any(a != b)) == should_change, d


def test_main_bn_of_an_auxiliary_distribution_equals_its_own_pass(three_distributions):
  model, variables, x = three_distributions
  # Distinct statistics and affine per distribution, so a wrong swap cannot pass unnoticed.
  variables = jax.tree_util.tree_map_with_path(
      lambda path, v: v + 0.1 * len(jax.tree_util.keystr(path)) % 0.7, variables)
  for d in ('adv1', 'adv2'):
    expected = model.apply(variables, x, train=False, distribution=d)
    swapped = batchnorm.with_main_bn_of(variables, d)
    np.testing.assert_allclose(model.apply(swapped, x, train=False), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(model.apply(variables, x, train=False), expected, atol=1e-3)
  assert batchnorm.with_main_bn_of(variables, 'clean') is variables
  with pytest.raises(ValueError, match="no BatchNorm of distribution 'adv'"):
    batchnorm.with_main_bn_of(variables, 'adv')


def test_eval_uses_running_statistics(three_distributions):
  model, variables, x = three_distributions
  # Eval output does not depend on the rest of the batch; train output does.
  full = model.apply(variables, x, train=False)
  half = model.apply(variables, x[:4], train=False)
  np.testing.assert_allclose(full[:4], half, rtol=1e-5, atol=1e-5)
  train_full = model.apply(variables, x, train=True)
  train_half = model.apply(variables, x[:4], train=True)
  assert not np.allclose(train_full[:4], train_half, atol=1e-3)
  # And the running statistics are what normalises: shifting them shifts the eval logits.
  shifted = jax.tree.map(lambda s: s + 0.5, variables['batch_stats'])
  assert not np.allclose(full, model.apply(dict(variables, batch_stats=shifted), x), atol=1e-3)


def test_mixed_batch_equals_separate_passes(three_distributions):
  """A mixed pass ((clean, 5), (adv2, 3)) = the two single-distribution passes, row for row."""
  model, variables, x = three_distributions
  mixed, updates = model.apply(variables, x, train=True, distribution=(('clean', 5), ('adv2', 3)),
                               mutable=['batch_stats', 'batch_stats_adv2'])
  clean, clean_updates = model.apply(variables, x[:5], train=True, distribution='clean',
                                     mutable=['batch_stats'])
  adv, adv_updates = model.apply(variables, x[5:], train=True, distribution='adv2',
                                 mutable=['batch_stats_adv2'])
  np.testing.assert_allclose(mixed, jnp.concatenate([clean, adv]), rtol=1e-5, atol=1e-5)
  for c, expected in (('batch_stats', clean_updates), ('batch_stats_adv2', adv_updates)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), updates[c],
                 expected[c])
  with pytest.raises(ValueError, match='covers 7 rows'):
    model.apply(variables, x, train=True, distribution=(('clean', 4), ('adv1', 3)))
  with pytest.raises(ValueError, match="'adv3'"):
    model.apply(variables, x, train=True, distribution=(('clean', 4), ('adv3', 4)))
  with pytest.raises(ValueError, match='twice'):
    model.apply(variables, x, train=True, distribution=(('adv1', 4), ('adv1', 4)))


def test_unknown_distribution(three_distributions):
  model, variables, x = three_distributions
  with pytest.raises(ValueError, match="'adv3'.*clean"):
    model.apply(variables, x, distribution='adv3')


def test_bfloat16_forward_keeps_float32_statistics():
  model = tiny_efficientnet(dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(1), x)
  logits, updates = model.apply(variables, x, train=True, distribution='adv',
                                mutable=['batch_stats_adv'])
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables['params']))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(updates['batch_stats_adv']))
  reference = tiny_efficientnet().apply(variables, x, train=True, distribution='adv')
  np.testing.assert_allclose(logits, reference, rtol=0.1, atol=0.1)


def test_stage_features_compose_to_logits():
  model = tiny_efficientnet()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(1), x)
  feature = model.apply(variables, x, to_stage=1)
  assert feature.shape == (2, 16, 16, 8)
  np.testing.assert_allclose(model.apply(variables, feature, from_stage=1), model.apply(variables, x),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kernel,stride,size', [(3, 1, 9), (3, 2, 9), (5, 1, 8), (5, 2, 8),
                                                (3, 2, 8), (5, 2, 7)])
def test_depthwise_formulations_agree(kernel, stride, size):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 6))
  w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, 1, 6))
  ct = jax.random.normal(jax.random.PRNGKey(2), conv.depthwise_conv_grouped(x, w, stride).shape)

  def loss(fn):
    return lambda x, w: jnp.sum(fn(x, w, stride) * ct)
  shifted, grouped = loss(conv.depthwise_conv_shifted), loss(conv.depthwise_conv_grouped)
  np.testing.assert_allclose(conv.depthwise_conv_shifted(x, w, stride),
                             conv.depthwise_conv_grouped(x, w, stride), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.grad(shifted, (0, 1))(x, w), jax.grad(grouped, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_depthwise_layer_params_identical_across_implementations():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
  a = conv.DepthwiseConv(3, 2, implementation='shifted')
  b = conv.DepthwiseConv(3, 2, implementation='grouped')
  va = a.init(jax.random.PRNGKey(1), x)
  assert jax.tree.map(jnp.shape, va) == jax.tree.map(jnp.shape, b.init(jax.random.PRNGKey(1), x))
  np.testing.assert_allclose(a.apply(va, x), b.apply(va, x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='depthwise_impl'):
    conv.DepthwiseConv(3, implementation='fast').init(jax.random.PRNGKey(1), x)


def test_tf_initialisers():
  from advprop_jax.models.efficientnet import conv_kernel_init
  key = jax.random.PRNGKey(0)
  stem = np.asarray(conv_kernel_init()(key, (3, 3, 3, 64)))  # std sqrt(2 / fan_out), fan_out = 9 * 64
  assert abs(stem.std() - np.sqrt(2 / (9 * 64))) < 0.1 * np.sqrt(2 / (9 * 64))
  dw = conv.DepthwiseConv(5).init(key, jnp.zeros((1, 8, 8, 256)))['params']['kernel']
  assert abs(np.asarray(dw).std() - np.sqrt(2 / 25)) < 0.1 * np.sqrt(2 / 25)  # fan_out = k*k
  variables = tiny_efficientnet(num_classes=1000).init(key, jnp.zeros((1, 32, 32, 3)))
  dense = np.asarray(variables['params']['classifier']['kernel'])
  assert 0.95 / np.sqrt(1000) < np.abs(dense).max() <= 1 / np.sqrt(1000)  # U(+-1/sqrt(classes))
  assert not np.any(variables['params']['classifier']['bias'])
  assert set(variables['batch_stats']['stem_bn']) == {'mean', 'var'}
