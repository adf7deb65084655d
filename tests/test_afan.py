"""A-FAN: feature-space perturbation at one stage, its ball, the averaged loss, PONO mixing, 8 devices."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from advprop_jax import config as config_lib
from advprop_jax import methods
from advprop_jax.methods import afan
from advprop_jax.methods import passes as passes_lib
from advprop_jax.models.efficientnet import B0_STAGES
from advprop_jax import parallel
from advprop_jax import step as step_lib
from conftest import tiny_efficientnet

SIZE, BATCH, STEPS, STEP = 16, 8, 3, 0.05
BEFORE = ('stem_conv', 'stem_bn', 'blocks_0_0')  # up to stage 1, the perturbed feature
AFTER = ('blocks_1_0', 'head_conv', 'head_bn', 'classifier')


def make_config(**afan_fields):
  c = config_lib.base_config()
  c.method = 'afan'
  c.num_classes = 10
  c.l2_weight = 0.0  # so the loss is exactly the average of the two passes
  c.afan.update(dict(stage=1, num_steps=STEPS, step_size=STEP, epsilon=0.0), **afan_fields)
  return c


def make_batch(n, seed=0):
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  return {'image': jax.random.uniform(kx, (n, SIZE, SIZE, 3), minval=-1, maxval=1),
          'label': jax.random.randint(ky, (n,), 0, 10)}


def make_model():
  # Two block stages (one before, one after the feature) and a small head: compiling is the cost.
  return tiny_efficientnet(distributions=('clean',), stages=B0_STAGES[:2], head_features=16)


@pytest.fixture(scope='module')
def reference():
  """The method's gradient, a clean-only gradient and feature attacks, in one compiled program."""
  model = make_model()
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))
  params = variables.pop('params')
  state = dict(variables)
  batch = make_batch(BATCH)
  passes = passes_lib.Passes(model)
  grad_fn = methods.get('afan').make_grad_fn(model, make_config())

  def compute(params):
    grads, new_state, metrics = grad_fn(params, state, batch, jax.random.PRNGKey(1))

    def clean_loss(p):  # the full forward pass, not split at the stage
      logits, s = passes(p, state, batch['image'], distribution='clean', train=True)
      return jnp.mean(passes_lib.cross_entropy(logits, batch['label'], 10, 0.1)), s
    (loss, clean_state), g_clean = jax.value_and_grad(clean_loss, has_aux=True)(params)

    feature = model.apply({'params': params, **state}, batch['image'], train=True, to_stage=1)
    rest = lambda z: jnp.sum(passes_lib.cross_entropy(
        model.apply({'params': params, **state}, z, train=True, from_stage=1), batch['label'], 10))
    balls = {eps: afan.perturb_feature(rest, feature, make_config(epsilon=eps).afan) - feature
             for eps in (0.0, 0.02)}
    return dict(grads=grads, new_state=new_state, metrics=metrics, clean_loss=loss,
                clean_state=clean_state, g_clean=g_clean, deltas=balls)
  return params, jax.jit(compute)(params)


def test_only_the_chosen_feature_is_perturbed(reference):
  params, ref = reference
  grads = traverse_util.flatten_dict(ref['grads'])
  half_clean = traverse_util.flatten_dict(jax.tree.map(lambda g: 0.5 * g, ref['g_clean']))
  assert {path[0] for path in grads} == set(BEFORE + AFTER)
  # Layers up to the stage learn from the clean pass only (loss = clean / 2 + perturbed / 2).
  for path, g in grads.items():
    if path[0] in BEFORE:
      np.testing.assert_allclose(g, half_clean[path], rtol=1e-4, atol=1e-7, err_msg=str(path))
  # Layers after it also learn from the perturbed branch.
  after = [float(jnp.abs(g - half_clean[p]).max() / (jnp.abs(g).max() + 1e-12))
           for p, g in grads.items() if p[0] in AFTER]
  assert min(after) > 1e-3, after
  m = ref['metrics']
  np.testing.assert_allclose(m['clean_loss'], ref['clean_loss'], rtol=1e-5)
  np.testing.assert_allclose(m['loss'], 0.5 * (m['clean_loss'] + m['adv_loss']), rtol=1e-6)
  assert m['adv_loss'] > m['clean_loss']  # the perturbation goes up the loss
  # Running statistics: from the clean pass only (split in two halves = the full forward pass).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               ref['new_state'], ref['clean_state'])


def test_feature_attack_ball(reference):
  _, ref = reference
  bounded, free = (np.abs(np.asarray(ref['deltas'][eps])) for eps in (0.02, 0.0))
  assert bounded.max() <= 0.02 + 1e-6 and bounded.max() == pytest.approx(0.02, rel=1e-5)
  # epsilon 0 = no projection (released code): sign steps add up to STEPS * STEP.
  assert free.max() == pytest.approx(STEPS * STEP, rel=1e-5) and np.mean(free > 0.02 + 1e-6) > 0.1


def test_pono_mix():
  clean, perturbed = (jax.random.normal(jax.random.PRNGKey(i), (2, 4, 4, 8)) for i in (0, 1))
  perturbed = 3.0 * perturbed + 1.0
  np.testing.assert_allclose(afan.pono_mix(clean, perturbed, 0.0), clean, rtol=1e-4, atol=1e-4)
  full = afan.pono_mix(clean, perturbed, 1.0)
  for got, want in zip(afan.pono_moments(full), afan.pono_moments(perturbed)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # The content is the clean feature's: same positional normalisation.
  normalised = lambda f: (f - afan.pono_moments(f)[0]) / afan.pono_moments(f)[1]
  np.testing.assert_allclose(normalised(full), normalised(clean), rtol=1e-3, atol=1e-3)
  with pytest.raises(config_lib.ConfigError, match='afan.pono_mix'):
    methods.get('afan').validate(make_config(pono_mix=1.5), 8)
  with pytest.raises(config_lib.ConfigError, match='afan.stage'):
    methods.get('afan').validate(make_config(stage=0), 8)


def test_eight_device_step_runs():
  config = make_config(epsilon=0.1, pono_mix=0.5)
  model = make_model()
  mesh = parallel.create_mesh(2)  # BN groups of 2 devices: statistics reduced inside the model
  tx = optax.sgd(0.1)
  state = step_lib.create_train_state(model, tx, jax.random.PRNGKey(0), SIZE, mesh)
  step = step_lib.make_train_step(model, tx, config, mesh, lambda s: 0.1, 0.9999)
  batch = jax.device_put(make_batch(16), parallel.batch_sharding(mesh))
  before = jax.device_get(state.model_state)  # the step donates the state
  new_state, metrics = step(state, batch, jax.random.PRNGKey(1))
  metrics = jax.device_get(metrics)
  for k in ('loss', 'clean_loss', 'adv_loss', 'clean_accuracy', 'adv_accuracy', 'attack_success',
            'grad_norm'):
    assert np.isfinite(metrics[k]), k
  assert int(new_state.step) == 1 and metrics['grad_norm'] > 0
  assert set(before) == {'batch_stats'}
  assert not np.array_equal(jax.device_get(new_state.model_state)['batch_stats']['stem_bn']['mean'],
                            before['batch_stats']['stem_bn']['mean'])
