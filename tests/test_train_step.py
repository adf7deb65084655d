"""The AdvProp train step: BN isolation, multi-device equivalence, metrics, methods."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advprop_jax import config as config_lib
from advprop_jax import methods
from advprop_jax.methods import passes as passes_lib
from advprop_jax import optim
from advprop_jax import parallel
from advprop_jax import step as step_lib
from conftest import tiny_efficientnet

SIZE, BATCH = 32, 16


def make_config(**fields):
  c = config_lib.base_config()
  c.num_classes = 10
  c.attack.epsilon_pixels = 4.0
  c.attack.step_size_pixels = 2.0
  c.attack.num_steps = 2
  c.fine_grained_epsilons_pixels = (2.0, 4.0)
  c.update_from_flattened_dict({k.replace('__', '.'): v for k, v in fields.items()})
  return c


def make_batch(seed=0):
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  return {'image': jax.random.uniform(kx, (BATCH, SIZE, SIZE, 3), minval=-1, maxval=1),
          'label': jax.random.randint(ky, (BATCH,), 0, 10)}


def init(model):
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))
  return variables.pop('params'), variables


def _equal(a, b):
  return jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))


def test_bn_isolation_inside_advprop_step():
  """Clean stats change only through the clean pass, aux stats only through the adversarial pass,
  and the attack (here with the aux BN's batch statistics) changes none."""
  config = make_config(method='advprop', attack__bn_mode='train')
  model = tiny_efficientnet()
  params, state = init(model)
  batch, rng = make_batch(), jax.random.PRNGKey(7)
  grad_fn = jax.jit(methods.get(config.method).make_grad_fn(model, config))
  _, new_state, metrics = grad_fn(params, state, batch, rng)

  passes = passes_lib.Passes(model)
  clean_rng, adv_rng = jax.random.split(rng)
  attack_rng, pass_rng = jax.random.split(adv_rng)
  _, expected_clean = passes(params, state, batch['image'], distribution='clean', train=True)
  x_adv, _ = passes_lib.adversarial_examples(
      passes, params, state, batch, attack_rng, distribution='adv', bn_mode='train', num_classes=10,
      settings=passes_lib.attack_settings(config.attack, 'minus_one_one'))
  assert float(jnp.abs(x_adv - batch['image']).max()) > 0
  _, expected_adv = passes(params, state, x_adv, distribution='adv', train=True)
  for collection, expected in (('batch_stats', expected_clean), ('batch_stats_adv', expected_adv)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 new_state[collection], expected[collection])
  assert 0.0 <= float(metrics['attack_success']) <= 1.0
  assert {'clean_loss', 'adv_loss', 'clean_accuracy', 'adv_accuracy', 'loss'} <= set(metrics)


def test_methods_touch_the_right_collections():
  batch, rng = make_batch(), jax.random.PRNGKey(3)
  for method, collections in (('adv_train', {'batch_stats'}),
                              ('fine_grained_advprop',
                               {'batch_stats', 'batch_stats_adv1', 'batch_stats_adv2'})):
    config = make_config(method=method)
    model = tiny_efficientnet(distributions=methods.get(config.method).distributions(config))
    params, state = init(model)
    assert set(state) == collections
    grads, new_state, metrics = jax.jit(methods.get(config.method).make_grad_fn(model, config))(
        params, state, batch, rng)
    for c in collections:
      assert not _equal(new_state[c], state[c]), (method, c)
    assert np.isfinite(float(metrics['loss'])) and 'clean_loss' in metrics
    if method == 'fine_grained_advprop':
      assert {'adv_loss_adv1', 'adv_loss_adv2'} <= set(metrics)
      # Only the aux BN params of each distribution get gradients from its own pass.
      assert float(jnp.abs(grads['stem_bn']['scale_adv2']).sum()) > 0


@pytest.fixture(scope='module')
def step_setup():
  # Deterministic attack (no random start or target) and no dropout, so devices draw nothing.
  config = make_config(method='advprop', attack__targeted=False)
  model = tiny_efficientnet()
  lr = optim.learning_rate_schedule(base_lr=0.05, steps_per_epoch=10, num_epochs=1,
                                    warmup_epochs=0, schedule='constant')
  tx = optim.create_optimizer('rmsprop', lr)

  cache = {}

  def run(devices, bn_group_size, steps=2):
    key = (len(devices), bn_group_size)
    if key not in cache:
      cache[key] = _run(devices, bn_group_size, steps)
    return cache[key]

  def _run(devices, bn_group_size, steps):
    mesh = parallel.create_mesh(bn_group_size, devices=devices)
    state = step_lib.create_train_state(model, tx, jax.random.PRNGKey(0), SIZE, mesh)
    step = step_lib.make_train_step(model, tx, config, mesh, lr, 0.9999)
    for i in range(steps):
      batch = jax.device_put(make_batch(i), parallel.batch_sharding(mesh))
      state, metrics = step(state, batch, jax.random.PRNGKey(1))
    return jax.device_get(state), jax.device_get(metrics)
  return run


def test_eight_device_global_bn_matches_one_device(step_setup):
  assert jax.device_count() == 8
  one, m1 = step_setup(jax.devices()[:1], 1)
  eight, m8 = step_setup(jax.devices(), -1)
  # Same global batch, same math; only float summation order differs.
  tol = dict(rtol=2e-4, atol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), eight.params, one.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), eight.model_state,
               one.model_state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), eight.ema_params,
               one.ema_params)
  for k in ('loss', 'clean_loss', 'adv_loss', 'grad_norm'):
    np.testing.assert_allclose(m8[k], m1[k], rtol=2e-4)
  assert int(eight.step) == 2
  assert float(m8['learning_rate']) == pytest.approx(0.05)


def test_per_device_bn_differs_from_global(step_setup):
  one, _ = step_setup(jax.devices()[:1], 1)
  local, _ = step_setup(jax.devices(), 1)  # 2 examples per device, per-device statistics
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                       local.params, one.params))
  assert max(diffs) > 1e-3


def test_bad_step_inputs_raise_before_compilation():
  config = make_config()
  for field, value, match in (('attack__epsilon_pixels', -1.0, 'attack.epsilon_pixels'),
                              ('attack__epsilon_pixels', 0.0, 'attack.epsilon_pixels'),
                              ('attack__num_steps', -2, 'attack.num_steps'),
                              ('method', 'advprob', 'method.*advprop'),
                              ('global_batch_size', 12, 'global_batch_size.*8'),
                              ('bn_group_size', 3, 'bn_group_size.*8')):
    bad = make_config(**{field: value})
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.validate(bad, num_devices=8)
  config_lib.validate(config, num_devices=8)
  fast = make_config(method='fast_advprop', global_batch_size=24)  # loader batch 30
  with pytest.raises(config_lib.ConfigError, match='loader batch of 30'):
    config_lib.validate(fast, num_devices=8)
  config_lib.validate(make_config(method='fast_advprop', global_batch_size=32), num_devices=8)
  with pytest.raises(ValueError, match='bn_group_size'):
    parallel.create_mesh(3)
  assert parallel.default_bn_group_size(8) == 1 and parallel.default_bn_group_size(256) == 32
  assert parallel.default_bn_group_size(32) == 8
