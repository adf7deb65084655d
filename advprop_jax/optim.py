"""Optimisation recipe: learning-rate schedules, TF1 RMSProp / SGD, the L2 term, and the weight EMA."""
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

SCHEDULES = ('exponential', 'piecewise', 'cosine', 'constant')
OPTIMIZERS = ('rmsprop', 'sgd')


def steps_per_epoch(num_examples: int, batch_size: int) -> float:
  """Optimizer steps per epoch, kept as a float like the TF reference (1281167 / 4096 = 312.785...).

  Truncating it first (312) would shorten the LR decay period and the run by 0.25 %.
  """
  if num_examples <= 0 or batch_size <= 0:
    raise ValueError(f'num_examples={num_examples} and batch_size={batch_size} must be > 0')
  return num_examples / batch_size


def _to_steps(epochs: float, steps_per_epoch_: float) -> int:
  # THE epochs -> steps conversion (run length, warm-up, boundaries, cosine length): truncation of
  # epochs x the float steps per epoch, as the reference computes its warm-up.
  return int(epochs * steps_per_epoch_)


def epochs_to_steps(epochs: float, num_examples: int, batch_size: int) -> int:
  """Steps in `epochs` epochs: int(epochs * num_examples / batch_size) (350 epochs of ImageNet:
  109,474 steps at batch 4096, 218,949 at 2048, the reference's train_steps)."""
  return _to_steps(epochs, steps_per_epoch(num_examples, batch_size))


def learning_rate_schedule(*, base_lr: float, steps_per_epoch: float, num_epochs: float,
                           warmup_epochs: float = 5.0, schedule: str = 'exponential',
                           decay_epochs: float = 2.4, decay_rate: float = 0.97,
                           boundaries_epochs: Sequence[float] = (), boundary_scale: float = 0.1
                           ) -> Callable[[jax.Array], jax.Array]:
  """Linear warmup from 0 over int(warmup_epochs * steps_per_epoch) steps, then the schedule.

  `steps_per_epoch` is the float num_examples / batch (see `steps_per_epoch()`); every epoch count
  becomes steps through `_to_steps`, the conversion `epochs_to_steps` uses.
  'exponential' is the TF EfficientNet rule (tf.train.exponential_decay, staircase) in float32:
  `base_lr * decay_rate ** floor(step / (decay_epochs * steps_per_epoch))` with the float decay
  period (750.68 steps at batch 4096), counted from step 0 (not from the end of warmup).
  'piecewise' multiplies by `boundary_scale` at each of `boundaries_epochs` (ResNet step decay).
  'cosine' decays to 0 over the whole run, int(num_epochs * steps_per_epoch) steps.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f'lr schedule={schedule!r}; allowed: {SCHEDULES}')
  warmup_steps = _to_steps(warmup_epochs, steps_per_epoch)
  total_steps = _to_steps(num_epochs, steps_per_epoch)
  if schedule == 'exponential':
    decay_steps = jnp.float32(decay_epochs * steps_per_epoch)

    def main(step):  # the reference's float32 arithmetic: lr * rate ** floor(step / period)
      return jnp.float32(base_lr) * jnp.power(jnp.float32(decay_rate),
                                              jnp.floor(step / decay_steps))
  elif schedule == 'piecewise':
    main = optax.piecewise_constant_schedule(
        base_lr, {_to_steps(e, steps_per_epoch): boundary_scale for e in boundaries_epochs})
  elif schedule == 'cosine':
    main = optax.cosine_decay_schedule(base_lr, decay_steps=max(total_steps, 1))
  else:
    main = optax.constant_schedule(base_lr)

  def lr(step):
    step = jnp.asarray(step, jnp.float32)
    if warmup_steps == 0:
      return main(step)
    return jnp.where(step < warmup_steps, base_lr * step / warmup_steps, main(step))
  return lr


def create_optimizer(name: str, learning_rate, *, momentum: float = 0.9, rmsprop_decay: float = 0.9,
                     rmsprop_epsilon: float = 1e-3, nesterov: bool = False,
                     weight_decay: float = 0.0) -> optax.GradientTransformation:
  """'rmsprop' has TF1 semantics: accumulator starts at 1, eps inside the sqrt, LR inside momentum.

  `weight_decay` here is decoupled (for SGD recipes that use it); the TF recipe's L2 term is in the loss
  instead (see `l2_loss`).
  """
  if name == 'rmsprop':
    tx = optax.rmsprop(learning_rate, decay=rmsprop_decay, eps=rmsprop_epsilon, initial_scale=1.0,
                       eps_in_sqrt=True, momentum=momentum, nesterov=nesterov)
  elif name == 'sgd':
    tx = optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)
  else:
    raise ValueError(f'optimizer={name!r}; allowed: {OPTIMIZERS}')
  if weight_decay:
    tx = optax.chain(optax.add_decayed_weights(weight_decay, mask=not_batchnorm_mask), tx)
  return tx


def not_batchnorm_mask(params):
  """True for every param that is not a BatchNorm scale/bias (of any distribution)."""
  flat = traverse_util.flatten_dict(params)
  norm_modules = {path[:-1] for path in flat if path[-1] == 'scale'}
  return traverse_util.unflatten_dict({path: path[:-1] not in norm_modules for path in flat})


def l2_loss(params) -> jax.Array:
  """sum(v**2) / 2 over every non-BatchNorm variable (convs, SE biases, dense) — the TF recipe's term."""
  mask = not_batchnorm_mask(params)
  leaves = [jnp.sum(jnp.square(p.astype(jnp.float32)))
            for p, keep in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if keep]
  return 0.5 * sum(leaves)


def ema_decay(step, max_decay: float) -> jax.Array:
  """TF ExponentialMovingAverage with num_updates: min(max_decay, (1 + t) / (10 + t)).

  `step` is the global step after the optimizer update (TF applies the EMA after incrementing it).
  """
  t = jnp.asarray(step, jnp.float32)
  return jnp.minimum(max_decay, (1.0 + t) / (10.0 + t))


def ema_update(ema, new, decay):
  # Hand-written: optax.ema has no num_updates rule and keeps its own state; here the EMA covers params
  # and BN statistics of every distribution and lives in the train state.
  return jax.tree.map(lambda e, n: e + (1.0 - decay) * (n - e), ema, new)
