"""The train state and the compiled data-parallel train / eval steps.

Steps are `jax.jit` of a `jax.shard_map` over the (replica, bn) mesh of parallel.py: each device runs
the per-shard program (the pmapped step of the reference, with the same collective semantics), and the
state is replicated. State buffers are donated.
"""
import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from advprop_jax import attacks
from advprop_jax import objectives
from advprop_jax import optim
from advprop_jax import parallel


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  model_state: Any  # {'batch_stats': ..., 'batch_stats_adv': ...}: BN running statistics
  opt_state: Any
  ema_params: Any
  ema_model_state: Any


def init_variables(model, rng, image_size: int):
  return model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)


def create_train_state(model, tx, rng, image_size: int, mesh) -> TrainState:
  """Initialises the state directly into replicated device buffers."""
  def init(rng):
    variables = init_variables(model, rng, image_size)
    params = variables['params']
    model_state = {k: v for k, v in variables.items() if k != 'params'}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=tx.init(params), ema_params=params, ema_model_state=model_state)
  return jax.jit(init, out_shardings=parallel.replicated_sharding(mesh))(rng)


def make_train_step(model, tx: optax.GradientTransformation, config, mesh,
                    learning_rate_fn: Callable, ema_decay: float) -> Callable:
  """Compiled `(state, batch, rng) -> (state, metrics)`; batch = {'image', 'label'} sharded on the mesh.

  Per device: gradients of the method's loss on the local shard (BN statistics reduced over the BN
  group), averaged over all devices; running statistics averaged over all devices so the replicated state
  stays identical everywhere; one optimizer update; EMA of params and every distribution's statistics.
  """
  model = model.clone(bn_axis_name=parallel.bn_axis_name(mesh))
  grad_fn = objectives.make_grad_fn(model, config)
  axes = parallel.DATA_AXES

  def per_device(state: TrainState, batch, rng):
    rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), lax.axis_index(axes))
    grads, model_state, metrics = grad_fn(state.params, state.model_state, batch, rng)
    grads, model_state, metrics = lax.pmean((grads, model_state, metrics), axes)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    decay = optim.ema_decay(step, ema_decay)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                   learning_rate=learning_rate_fn(state.step))
    new_state = state.replace(
        step=step, params=params, model_state=model_state, opt_state=opt_state,
        ema_params=optim.ema_update(state.ema_params, params, decay),
        ema_model_state=optim.ema_update(state.ema_model_state, model_state, decay))
    return new_state, metrics

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(axes), P()), out_specs=(P(), P()),
                          check_vma=False)
  return jax.jit(sharded, donate_argnums=(0,))


def make_eval_step(model, mesh, *, num_classes: int, attack_settings: Optional[dict] = None) -> Callable:
  """Compiled `(params, model_state, batch) -> sums` over the mesh, clean BN, eval mode.

  batch has 'mask' (0 for padding); returned sums: 'count', 'top1', 'top5', 'loss'. With
  `attack_settings` (from objectives.attack_settings), top-1/top-5 are measured on white-box PGD examples
  against the same model (untargeted, running statistics).
  """
  axes = parallel.DATA_AXES
  passes = objectives.Passes(model)

  def logits_fn(params, model_state, x):
    return passes(params, model_state, x, distribution='clean', train=False)[0]

  def per_device(params, model_state, batch):
    x, labels, mask = batch['image'], batch['label'], batch['mask'].astype(jnp.float32)
    if attack_settings is not None:
      settings = dict(attack_settings, targeted=False, random_start=0.0)
      loss_fn = lambda z: jnp.sum(
          objectives.cross_entropy(logits_fn(params, model_state, z), labels, num_classes) * mask)
      x = attacks.pgd(loss_fn, x, **settings)
    logits = logits_fn(params, model_state, x)
    top5 = lax.top_k(logits, min(5, num_classes))[1]
    sums = dict(count=jnp.sum(mask),
                top1=jnp.sum((top5[:, 0] == labels) * mask),
                top5=jnp.sum(jnp.any(top5 == labels[:, None], -1) * mask),
                loss=jnp.sum(objectives.cross_entropy(logits, labels, num_classes) * mask))
    return lax.psum(sums, axes)

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(axes)), out_specs=P(),
                          check_vma=False)
  return jax.jit(sharded)
