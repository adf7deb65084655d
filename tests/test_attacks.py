"""PGD against analytic results on a linear softmax model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advprop_jax import attacks
from advprop_jax.data import normalization

D, C, B = 12, 4, 16


@pytest.fixture(scope='module')
def linear():
  kw, kx, ky = jax.random.split(jax.random.PRNGKey(0), 3)
  w = jax.random.normal(kw, (D, C))
  x = jax.random.uniform(kx, (B, D), minval=-0.9, maxval=0.9)
  y = jax.random.randint(ky, (B,), 0, C)

  def loss_per_example(z, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(z @ w), labels[:, None], 1)[:, 0]
  return w, x, y, loss_per_example


def test_one_step_untargeted_is_analytic_fgsm(linear):
  w, x, y, loss = linear
  eps = 8 / 255 * 2
  x_adv = attacks.pgd(lambda z: loss(z, y).sum(), x, epsilon=eps, step_size=eps, num_steps=1)
  p = jax.nn.softmax(x @ w)
  grad = (p - jax.nn.one_hot(y, C)) @ w.T  # d CE / dx of a linear softmax model
  np.testing.assert_allclose(x_adv, jnp.clip(x + eps * jnp.sign(grad), -1, 1), atol=1e-6)


def test_clipping_to_valid_range(linear):
  w, x, y, loss = linear
  x_edge = jnp.clip(x * 10, -1, 1)  # many coordinates on the boundary
  x_adv = attacks.pgd(lambda z: loss(z, y).sum(), x_edge, epsilon=0.5, step_size=0.5, num_steps=1)
  assert float(x_adv.min()) >= -1 and float(x_adv.max()) <= 1
  assert float(jnp.abs(x_adv - x_edge).max()) == pytest.approx(0.5, abs=1e-6)


def test_multi_step_stays_in_ball_and_increases_loss(linear):
  w, x, y, loss = linear
  eps = 4 * 2 / 255
  x_adv = attacks.pgd(lambda z: loss(z, y).sum(), x, epsilon=eps, step_size=1 * 2 / 255,
                      num_steps=5, rng=jax.random.PRNGKey(1), random_start=True)
  assert float(jnp.abs(x_adv - x).max()) <= eps + 1e-6
  assert float(x_adv.min()) >= -1 and float(x_adv.max()) <= 1
  assert bool(jnp.all(loss(x_adv, y) >= loss(x, y) - 1e-6))
  assert float(loss(x_adv, y).mean()) > float(loss(x, y).mean())


def test_targeted_lowers_target_loss(linear):
  w, x, y, loss = linear
  target = (y + 1) % C
  x_adv = attacks.pgd(lambda z: loss(z, target).sum(), x, epsilon=0.1, step_size=0.02,
                      num_steps=5, targeted=True)
  assert bool(jnp.all(loss(x_adv, target) < loss(x, target)))


def test_random_start_is_uniform_in_ball():
  x = jnp.zeros((4000, 8))
  delta = attacks.random_start_delta(jax.random.PRNGKey(0), x, 0.5)
  assert float(jnp.abs(delta).max()) <= 0.5
  hist, _ = np.histogram(np.asarray(delta).ravel(), bins=10, range=(-0.5, 0.5))
  assert hist.min() > 0.9 * hist.mean() and hist.max() < 1.1 * hist.mean()  # flat
  per_sample = attacks.random_start_delta(jax.random.PRNGKey(0), x, 0.5, probability=0.3)
  started = np.asarray(jnp.any(per_sample != 0, axis=1))
  assert 0.25 < started.mean() < 0.35  # each sample starts at random with the probability


def test_gradient_is_stopped_and_bad_steps(linear):
  w, x, y, loss = linear
  g = jax.grad(lambda s: attacks.pgd(lambda z: loss(z * s, y).sum(), x, epsilon=0.1, step_size=0.1,
                                     num_steps=1).sum())(1.0)
  assert float(g) == 0.0
  with pytest.raises(ValueError, match='num_steps'):
    attacks.pgd(lambda z: loss(z, y).sum(), x, epsilon=0.1, step_size=0.1, num_steps=0)


def test_pixel_units_and_paper_step_rule():
  assert normalization.pixels_to_input_units(1.0) == pytest.approx(2 / 255)
  assert normalization.input_range('minus_one_one') == (-1.0, 1.0)
  low, high = normalization.input_range('imagenet')
  np.testing.assert_allclose(high - low, normalization.pixels_to_input_units(255.0, 'imagenet'),
                             rtol=1e-6)
  assert [attacks.default_num_steps(e) for e in (1, 2, 3, 4)] == [1, 3, 4, 5]
  with pytest.raises(ValueError, match='normalization'):
    normalization.pixels_to_input_units(1.0, 'zero_one')
