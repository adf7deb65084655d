"""Fast AdvProp: reused attack gradient, per-group normalisation, cross-group shuffle, 8-device step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from advprop_jax import attacks
from advprop_jax import config as config_lib
from advprop_jax import methods
from advprop_jax.methods import fast_advprop
from advprop_jax.methods import passes as passes_lib
from advprop_jax.models.efficientnet import B0_STAGES
from advprop_jax import optim
from advprop_jax import parallel
from advprop_jax import step as step_lib
from conftest import tiny_efficientnet

SIZE, SHARD = 16, 10  # 8 clean + 2 adversarial-source images per device at adv_fraction 0.2
NOISE_W, ADV_W, L2 = 0.25, 1.0, 1e-3  # unequal weights, so every group's divisor is distinct


def make_config():
  c = config_lib.base_config()
  c.method = 'fast_advprop'
  c.num_classes = 10
  c.attack.epsilon_pixels = 4.0
  c.attack.random_start = 0.0
  c.l2_weight = L2
  c.fast_advprop.noise_weight = NOISE_W
  c.fast_advprop.adv_weight = ADV_W
  return c


def make_batch(n, seed=0):
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  return {'image': jax.random.uniform(kx, (n, SIZE, SIZE, 3), minval=-1, maxval=1),
          'label': jax.random.randint(ky, (n,), 0, 10)}


def setup():
  # The smallest EfficientNet that still has every kind of layer: compiling is what the tests cost.
  model = tiny_efficientnet(distributions=('clean', 'adv'), stages=B0_STAGES[:1], head_features=16)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))
  params = variables.pop('params')
  return model, params, dict(variables)


EPS = 4 * 2 / 255  # 4 pixels in [-1, 1] units


@pytest.fixture(scope='module')
def reference():
  """Every pass of the method computed independently, in one compiled program (compiles are the cost).

  Each parameter gradient is its own jax.grad of a summed loss; the attack is attacks.pgd with one step
  of eps through the aux BN with batch statistics.
  """
  model, params, state = setup()
  passes = passes_lib.Passes(model)
  batch = make_batch(SHARD)
  x, y = batch['image'], batch['label']

  def summed(p, z, t, distribution, update_stats=False):
    logits, new_state = passes(p, state, z, distribution=distribution, train=True,
                               update_stats=update_stats)
    return jnp.sum(passes_lib.cross_entropy(logits, t, 10, 0.1)), new_state

  def compute(params):
    grad = jax.value_and_grad(summed, has_aux=True)
    (clean_sum, clean_state), g_clean = grad(params, x[:8], y[:8], 'clean', True)
    (noise_sum, _), g_noise = grad(params, x[8:], y[8:], 'adv')
    x_adv = attacks.pgd(lambda z: summed(params, z, y[8:], 'adv')[0], x[8:], epsilon=EPS,
                        step_size=EPS, num_steps=1)
    (adv_sum, adv_state), g_adv = grad(params, x_adv, y[8:], 'adv', True)
    # The method's attack step, traced separately (one program, because compiling is the cost).
    config = make_config()
    settings = dict(passes_lib.attack_settings(config.attack, 'minus_one_one'), num_steps=1)
    settings['step_size'] = settings['epsilon']
    attack = fast_advprop.attack_step(
        passes, params, state, x[8:], y[8:], jax.random.PRNGKey(0), settings=settings,
        loss_fn=lambda l, t: passes_lib.cross_entropy(l, t, 10, 0.1))
    return dict(attack=attack, clean_sum=clean_sum, clean_state=clean_state, g_clean=g_clean,
                noise_sum=noise_sum, g_noise=g_noise, x_adv=x_adv, adv_sum=adv_sum, adv_state=adv_state, g_adv=g_adv)
  return model, params, state, batch, jax.jit(compute)(params)


def test_noise_gradient_is_the_attack_backward(reference):
  _, _, _, batch, ref = reference
  x_adv, loss_sum, noise_grads, _ = ref['attack']

  # Against a second, independent backward pass w.r.t. params only, at the attack's input.
  np.testing.assert_allclose(loss_sum, ref['noise_sum'], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               noise_grads, ref['g_noise'])
  # The same backward pass gave the attack: FGSM of eps (aux BN, batch statistics).
  np.testing.assert_array_equal(x_adv, ref['x_adv'])
  np.testing.assert_allclose(jnp.abs(x_adv - batch['image'][8:]).max(), EPS, rtol=1e-6)
  # The attack runs through the aux BN: its scale gets gradient, the main BN's none.
  assert float(jnp.abs(noise_grads['stem_bn']['scale_adv']).sum()) > 0
  assert float(jnp.abs(noise_grads['stem_bn']['scale']).sum()) == 0


def test_each_group_divided_by_its_own_count(reference):
  model, params, state, batch, ref = reference
  config = make_config()
  grads, new_state, metrics = jax.jit(methods.get(config.method).make_grad_fn(model, config))(
      params, state, batch, jax.random.PRNGKey(5))
  # On one device the shuffle is a permutation within the sub-batch: sums and BN statistics ignore it.
  # Divisors by hand for 8 + 2 with noise 0.25, adv 1.0: shared 8 + 2*1.25, main BN 8, aux BN 2*1.25.
  flat = {k: traverse_util.flatten_dict(t) for k, t in
          (('g', grads), ('c', ref['g_clean']), ('n', ref['g_noise']), ('a', ref['g_adv']), ('p', params))}
  bn_modules = {path[:-1] for path in flat['p'] if path[-1] == 'scale'}
  checked = set()
  for path, g in flat['g'].items():
    c, n, a, p = (flat[k][path] for k in 'cnap')
    if path[:-1] in bn_modules:
      kind = 'aux' if path[-1].endswith('_adv') else 'main'
      expected = (NOISE_W * n + ADV_W * a) / 2.5 if kind == 'aux' else c / 8.0
    else:
      kind, expected = 'shared', (c + NOISE_W * n + ADV_W * a) / 10.5 + L2 * p
    checked.add(kind)
    np.testing.assert_allclose(g, expected, rtol=2e-4, atol=1e-6, err_msg=f'{path}')
  assert checked == {'aux', 'main', 'shared'}
  np.testing.assert_allclose(
      metrics['loss'], (ref['clean_sum'] + NOISE_W * ref['noise_sum'] + ADV_W * ref['adv_sum']) / 10.5
      + L2 * optim.l2_loss(params), rtol=1e-5)
  np.testing.assert_allclose(metrics['clean_loss'], ref['clean_sum'] / 8, rtol=1e-5)
  np.testing.assert_allclose(metrics['adv_loss'], ref['adv_sum'] / 2, rtol=1e-5)
  for collection, expected in (('batch_stats', ref['clean_state']), ('batch_stats_adv', ref['adv_state'])):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 new_state[collection], expected[collection])


def test_without_noise_reuse_the_passes_run_separately(reference):
  """noise_weight 0 (the paper's ablation without reuse): clean and attack cannot share one backward pass
  (the input gradient would be scaled by 0); the separate path must give the same attack and gradients."""
  model, params, state, batch, ref = reference
  config = make_config()
  config.fast_advprop.noise_weight = 0.0
  config.l2_weight = 0.0
  grads, _, metrics = jax.jit(methods.get(config.method).make_grad_fn(model, config))(
      params, state, batch, jax.random.PRNGKey(5))
  expected = jax.tree.map(lambda c, a: c + ADV_W * a, ref['g_clean'], ref['g_adv'])
  divisors = fast_advprop.group_divisors(params, 8, 2, 0.0, ADV_W)
  jax.tree.map(lambda g, e, d: np.testing.assert_allclose(g, e / d, rtol=2e-4, atol=1e-6),
               grads, expected, divisors)
  np.testing.assert_allclose(metrics['adv_loss'], ref['adv_sum'] / 2, rtol=1e-5)
  np.testing.assert_allclose(metrics['noise_loss'], ref['noise_sum'] / 2, rtol=1e-5)


def test_group_divisors_match_the_recipe():
  _, params, _ = setup()
  divisors = fast_advprop.group_divisors(params, 256, 64, 0.5, 0.5)
  assert divisors['stem_conv']['kernel'] == 320 and divisors['classifier']['bias'] == 320
  assert divisors['stem_bn']['scale'] == 256 and divisors['stem_bn']['bias_adv'] == 64
  assert fast_advprop.split_sizes(320, 0.2) == (256, 64) and fast_advprop.split_sizes(10, 0.2) == (8, 2)


def _shuffle_on_mesh(bn_group_size, n):
  """Runs the shuffle on 8 devices; ids = source index; returns per-device received ids."""
  mesh = parallel.create_mesh(bn_group_size)
  ids = jnp.arange(8 * n)
  fn = jax.shard_map(lambda i, t: fast_advprop.shuffle_across_groups(
      (i, t), jax.random.fold_in(jax.random.PRNGKey(0), jax.lax.axis_index(parallel.DATA_AXES))),
      mesh=mesh, in_specs=P(parallel.DATA_AXES), out_specs=P(parallel.DATA_AXES))
  out, tags = jax.jit(fn)(ids, ids * 10)
  np.testing.assert_array_equal(tags, out * 10)  # labels travel with their images
  assert sorted(np.asarray(out).tolist()) == list(range(8 * n))  # a permutation of the global batch
  return np.asarray(out).reshape(8, n), mesh.shape[parallel.BN_AXIS]


def test_shuffle_is_a_permutation_across_bn_groups():
  # (bn_group_size, adversarial examples per device): ppermute path (2 < 8 groups), all_to_all paths.
  for bn_group_size, n in ((1, 2), (1, 8), (4, 2), (4, 3)):
    received, k = _shuffle_on_mesh(bn_group_size, n)
    groups = 8 // k
    for g in range(groups):  # BN group g = devices g*k .. g*k+k-1
      sources = received[g * k:(g + 1) * k].ravel() // (n * k)  # source BN group of each example
      assert len(set(sources.tolist())) == min(n, groups), (bn_group_size, n, g, sources)
      assert np.sum(sources == g) <= -(-n // min(n, groups)) * k
  # One device, no mesh: a random permutation within the batch.
  ids = jnp.arange(16)
  out = fast_advprop.shuffle_across_groups(ids, jax.random.PRNGKey(3))
  assert sorted(out.tolist()) == list(range(16)) and not np.array_equal(out, ids)


def test_eight_device_step_runs():
  config = make_config()
  model = setup()[0]
  mesh = parallel.create_mesh(1)  # per-device BN: 8 BN groups, 2 adversarial examples each
  tx = optax.sgd(0.1)
  lr = lambda step: 0.1
  state = step_lib.create_train_state(model, tx, jax.random.PRNGKey(0), SIZE, mesh)
  step = step_lib.make_train_step(model, tx, config, mesh, lr, 0.9999)
  batch = jax.device_put(make_batch(8 * SHARD), parallel.batch_sharding(mesh))
  before = jax.device_get(state.model_state)  # the step donates the state
  new_state, metrics = step(state, batch, jax.random.PRNGKey(1))
  metrics = jax.device_get(metrics)
  for k in ('loss', 'clean_loss', 'adv_loss', 'noise_loss', 'clean_accuracy', 'adv_accuracy',
            'attack_success', 'grad_norm'):
    assert np.isfinite(metrics[k]), k
  assert int(new_state.step) == 1 and metrics['grad_norm'] > 0
  stats = jax.device_get(new_state.model_state)
  for c in ('batch_stats', 'batch_stats_adv'):
    assert not np.array_equal(stats[c]['stem_bn']['mean'], before[c]['stem_bn']['mean'])
