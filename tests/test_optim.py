"""The TF recipe pieces: RMSProp update equations, LR schedule, EMA rule, L2 mask, label smoothing."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from advprop_jax import methods
from advprop_jax.methods import passes as passes_lib
from advprop_jax import optim


def test_rmsprop_matches_tf1_equations():
  lr, decay, momentum, eps = 0.1, 0.9, 0.9, 1e-3
  tx = optim.create_optimizer('rmsprop', lr, momentum=momentum, rmsprop_decay=decay,
                              rmsprop_epsilon=eps)
  rng = np.random.default_rng(0)
  w = rng.normal(size=5).astype(np.float32)
  params, state = jnp.asarray(w), tx.init(jnp.asarray(w))
  ms, mom = np.ones(5, np.float32), np.zeros(5, np.float32)  # TF1: ms starts at 1
  for _ in range(5):
    g = rng.normal(size=5).astype(np.float32)
    ms = decay * ms + (1 - decay) * g * g
    mom = momentum * mom + lr * g / np.sqrt(ms + eps)  # LR inside momentum, eps inside sqrt
    w = w - mom
    updates, state = tx.update(jnp.asarray(g), state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params, w, rtol=1e-5, atol=1e-6)


def test_exponential_schedule_values():
  spe = 100
  lr = optim.learning_rate_schedule(base_lr=0.256, steps_per_epoch=spe, num_epochs=350,
                                    warmup_epochs=5, decay_epochs=2.4, decay_rate=0.97)
  assert float(lr(0)) == 0.0
  assert float(lr(250)) == pytest.approx(0.256 * 250 / 500)  # linear warmup from 0
  # After warmup: staircase counted from step 0 (floor(step / 240)), not from the warmup's end.
  assert float(lr(500)) == pytest.approx(0.256 * 0.97 ** 2, rel=1e-6)
  assert float(lr(719)) == pytest.approx(0.256 * 0.97 ** 2, rel=1e-6)
  assert float(lr(720)) == pytest.approx(0.256 * 0.97 ** 3, rel=1e-6)
  assert float(lr(35000)) == pytest.approx(0.256 * 0.97 ** 145, rel=1e-5)


# Reference numbers computed independently of our code. Run length and warm-up from the TF formulas
# (main.py, utils.build_learning_rate): steps_per_epoch = 1281167 / batch as a float, warm-up
# int(5 * spe) steps, decay period 2.4 * spe (750.68 steps at 4096, 1501.37 at 2048), run
# int(350 * 1281167 / batch) steps. LR values: that formula evaluated by TF itself
# (tf.compat.v1.train.exponential_decay, staircase, and the warm-up tf.cond, float32) under TF 2.21.
IMAGENET_TRAIN = 1281167


def test_reference_run_length_and_steps_per_epoch():
  assert optim.steps_per_epoch(IMAGENET_TRAIN, 4096) == 312.784912109375
  assert optim.epochs_to_steps(350, IMAGENET_TRAIN, 4096) == 109474
  assert optim.epochs_to_steps(350, IMAGENET_TRAIN, 2048) == 218949
  assert optim.epochs_to_steps(5, IMAGENET_TRAIN, 4096) == 1563  # warm-up truncates (not 1564)
  assert optim.epochs_to_steps(5, IMAGENET_TRAIN, 2048) == 3127
  with pytest.raises(ValueError, match='batch_size'):
    optim.steps_per_epoch(IMAGENET_TRAIN, 0)


@pytest.mark.parametrize('batch,base_lr,expected', [
    (4096, 0.256, {0: 0.0, 1000: 0.1637875884771347, 1562: 0.25583621859550476,
                   1563: 0.2408704161643982, 2252: 0.2408704161643982, 2253: 0.2336443066596985,
                   100000: 0.00445535546168685, 109473: 0.003091315506026149}),
    (2048, 0.128, {3126: 0.12795907258987427, 3127: 0.1204352080821991, 4504: 0.1204352080821991,
                   4505: 0.11682215332984924, 218948: 0.0015456577530130744}),
])
def test_reference_lr_values(batch, base_lr, expected):
  lr = optim.learning_rate_schedule(
      base_lr=base_lr, steps_per_epoch=optim.steps_per_epoch(IMAGENET_TRAIN, batch), num_epochs=350,
      warmup_epochs=5, decay_epochs=2.4, decay_rate=0.97)
  for step, value in expected.items():
    assert float(lr(step)) == pytest.approx(value, rel=1.2e-7, abs=1e-12), step


def test_piecewise_schedule():
  lr = optim.learning_rate_schedule(base_lr=0.4, steps_per_epoch=10, num_epochs=105,
                                    warmup_epochs=0, schedule='piecewise',
                                    boundaries_epochs=(30, 60))
  assert [float(lr(s)) for s in (0, 299, 300, 600)] == pytest.approx([0.4, 0.4, 0.04, 0.004])
  with pytest.raises(ValueError, match='schedule'):
    optim.learning_rate_schedule(base_lr=1, steps_per_epoch=1, num_epochs=1, schedule='linear')


def test_boundaries_and_cosine_length_use_the_one_conversion():
  spe = optim.steps_per_epoch(1437, 64)  # 22.453125: the demo's digits at batch 64
  boundary = optim.epochs_to_steps(30, 1437, 64)  # 673
  assert boundary == 673
  lr = optim.learning_rate_schedule(base_lr=1.0, steps_per_epoch=spe, num_epochs=105,
                                    warmup_epochs=0, schedule='piecewise', boundaries_epochs=(30,))
  assert (float(lr(boundary - 1)), float(lr(boundary))) == pytest.approx((1.0, 0.1))
  lr = optim.learning_rate_schedule(base_lr=1.0, steps_per_epoch=spe, num_epochs=30,
                                    warmup_epochs=2, schedule='cosine')
  assert float(lr(boundary)) == pytest.approx(0.0, abs=1e-12)  # decays over exactly the run
  assert float(lr(boundary - 1)) > 0.0
  assert float(lr(optim.epochs_to_steps(2, 1437, 64) - 1)) < float(lr(44))  # warm-up 44 steps


def test_ema_decay_rule_and_update():
  assert float(optim.ema_decay(1, 0.9999)) == pytest.approx(2 / 11)
  assert float(optim.ema_decay(100, 0.9999)) == pytest.approx(101 / 110)
  assert float(optim.ema_decay(10 ** 7, 0.9999)) == pytest.approx(0.9999)
  out = optim.ema_update({'a': jnp.array(1.0)}, {'a': jnp.array(3.0)}, 0.75)
  assert float(out['a']) == pytest.approx(0.75 * 1 + 0.25 * 3)


def test_l2_excludes_batchnorm_of_every_distribution():
  params = {'conv': {'kernel': jnp.full((2, 2), 2.0)},
            'se': {'kernel': jnp.ones(3), 'bias': jnp.ones(2)},
            'bn': {'scale': jnp.ones(4) * 5, 'bias': jnp.ones(4) * 5, 'scale_adv': jnp.ones(4) * 5,
                   'bias_adv': jnp.ones(4) * 5}}
  assert float(optim.l2_loss(params)) == pytest.approx(0.5 * (4 * 4 + 3 + 2))
  mask = optim.not_batchnorm_mask(params)
  assert mask['se']['bias'] and not mask['bn']['bias_adv']


def test_label_smoothing_value():
  logits = jnp.array([[0.0, 0.0, 0.0, 0.0]])
  # Uniform logits: CE = log(4) whatever the smoothing; check the target itself instead.
  assert float(passes_lib.cross_entropy(logits, jnp.array([1]), 4, 0.1)[0]) == pytest.approx(np.log(4))
  logits = jnp.array([[10.0, 0.0, 0.0, 0.0]])
  logp = np.asarray(jax.nn.log_softmax(logits))[0]
  expected = -(0.9 + 0.1 / 4) * logp[0] - 0.1 / 4 * logp[1:].sum()
  assert float(passes_lib.cross_entropy(logits, jnp.array([0]), 4, 0.1)[0]) == pytest.approx(expected, rel=1e-6)
