"""Adversarial attacks built on `jax.grad`: L-infinity PGD in any space (pixels or features).

Sizes passed to `pgd` are in input units. Configs give them in pixels (0..255);
`data.normalization.pixels_to_input_units` is the one place where pixels become input units.
"""
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
from jax import lax


def default_num_steps(epsilon_pixels: float) -> int:
  """AdvProp paper: n = eps + 1 iterations of 1 pixel, except n = 1 for eps = 1."""
  eps = int(round(epsilon_pixels))
  return 1 if eps <= 1 else eps + 1


def random_start_delta(rng, x, epsilon, probability: float = 1.0):
  """Uniform noise in the eps-ball; each sample starts from it with `probability`, else from x."""
  noise_rng, choice_rng = jax.random.split(rng)
  delta = jax.random.uniform(noise_rng, x.shape, x.dtype, -1.0, 1.0) * jnp.asarray(epsilon, x.dtype)
  if probability < 1.0:
    keep = jax.random.bernoulli(choice_rng, probability, (x.shape[0],) + (1,) * (x.ndim - 1))
    delta = jnp.where(keep, delta, 0.0)
  return delta


def pgd(loss_fn: Callable[[jax.Array], jax.Array], x, *, epsilon, step_size, num_steps: int,
        rng: Optional[jax.Array] = None, random_start: Union[bool, float] = False,
        targeted: bool = False, clip_min=-1.0, clip_max=1.0):
  """Projected gradient descent in the L-infinity ball of radius `epsilon` around `x`.

  Each step moves by `step_size * sign(grad loss_fn)`: up the loss (untargeted) or down it (targeted:
  `loss_fn` is then the loss towards the target), projects back onto the ball and clips to
  [clip_min, clip_max] (either may be None for feature-space attacks). `random_start` is a bool or the
  probability with which each sample starts from a uniform point of the ball (PyTorch references).
  Returns the adversarial input with gradients stopped.
  """
  if num_steps < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}')
  x = lax.stop_gradient(x)
  epsilon = jnp.asarray(epsilon, x.dtype)
  step_size = jnp.asarray(step_size, x.dtype)
  direction = -1.0 if targeted else 1.0

  def project(x_adv):
    x_adv = jnp.clip(x_adv, x - epsilon, x + epsilon)
    if clip_min is not None or clip_max is not None:
      x_adv = jnp.clip(x_adv, clip_min, clip_max)
    return x_adv

  x_adv = x
  probability = float(random_start)
  if probability > 0:
    if rng is None:
      raise ValueError('pgd: random_start needs an rng')
    x_adv = project(x + random_start_delta(rng, x, epsilon, probability))

  grad_fn = jax.grad(lambda z: loss_fn(z).astype(jnp.float32))

  def step(_, x_adv):
    g = grad_fn(x_adv)
    return project(x_adv + direction * step_size * jnp.sign(g).astype(x.dtype))

  x_adv = lax.fori_loop(0, num_steps, step, x_adv) if num_steps > 1 else step(0, x_adv)
  return lax.stop_gradient(x_adv)
