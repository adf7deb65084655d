"""The train state and the compiled data-parallel train step (TF-free).

The step is `jax.jit` of a `jax.shard_map` over the (slice, replica, bn) mesh of parallel.py: each
device runs the per-shard program (the pmapped step of the reference, with the same collective
semantics), and the
state is replicated. State buffers are donated. The evaluation step is eval/step.py.
"""
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from advprop_jax import methods
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


def initial_state(model, tx, rng, image_size: int) -> TrainState:
  """A fresh TrainState (step 0; the EMA copies start as the initial weights and statistics)."""
  variables = init_variables(model, rng, image_size)
  params = variables['params']
  model_state = {k: v for k, v in variables.items() if k != 'params'}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                    opt_state=tx.init(params), ema_params=params, ema_model_state=model_state)


def create_train_state(model, tx, rng, image_size: int, mesh) -> TrainState:
  """Initialises the state directly into replicated device buffers."""
  init = functools.partial(initial_state, model, tx, image_size=image_size)
  return jax.jit(init, out_shardings=parallel.replicated_sharding(mesh))(rng)


def abstract_train_state(model, tx, image_size: int, mesh) -> TrainState:
  """The TrainState as ShapeDtypeStructs with their replicated sharding: what restore and ahead-of-time
  compilation need, computed from shapes alone."""
  shapes = jax.eval_shape(functools.partial(initial_state, model, tx, image_size=image_size),
                          jax.random.PRNGKey(0))
  sharding = parallel.replicated_sharding(mesh)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), shapes)


def make_train_step(model, tx: optax.GradientTransformation, config, mesh,
                    learning_rate_fn: Callable, ema_decay: float) -> Callable:
  """Compiled `(state, batch, rng) -> (state, metrics)`; batch = {'image', 'label'} sharded on the mesh.

  Per device: gradients of the method's loss on the local shard (BN statistics reduced over the BN
  group), averaged over all devices; running statistics averaged over all devices so the replicated state
  stays identical everywhere; one optimizer update; EMA of params and every distribution's statistics.
  config.grad_accumulation_steps = k > 1: see `accumulate`.
  """
  model = model.clone(bn_axis_name=parallel.bn_axis_name(mesh))
  grad_fn = methods.get(config.method).make_grad_fn(model, config)
  axes = parallel.DATA_AXES
  k = int(config.get('grad_accumulation_steps', 1))
  if k > 1:  # k == 1 keeps the program exactly as it was (no scan, same RNG derivation)
    grad_fn = accumulate(grad_fn, k, axes)

  def per_device(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    if k == 1:
      rng = jax.random.fold_in(rng, lax.axis_index(axes))
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


def accumulate(grad_fn, k: int, axes):
  """The per-device grad function over k micro-batches in sequence (one `lax.scan`).

  The shard [B, ...] is cut into k contiguous micro-batches of B/k. Each runs the whole method
  (attack, passes, Fast AdvProp's cross-group deal among the devices' micro-batches i) from the SAME
  params and running statistics; gradients, new running statistics and metrics are the means over
  the k. That is exactly the k = 1 step on k*D devices whose shards are the micro-batches (device
  d's micro-batch i is shard d*k + i there) with per-device BN: running statistics are averaged as
  across devices, not chained, and micro-batch i of device d draws the random numbers of that
  device (rng folded with d*k + i), so attacks, dropout and drop-connect match too. Batch
  statistics are per micro-batch over the BN group: like a k-times smaller BN group.
  Takes the step-folded rng (not yet folded with the device index).
  """
  def accumulated(params, model_state, batch, rng):
    micro = jax.tree.map(lambda a: a.reshape((k, a.shape[0] // k) + a.shape[1:]), batch)
    first = lax.axis_index(axes) * k

    def run(i, micro_batch):
      return grad_fn(params, model_state, micro_batch, jax.random.fold_in(rng, first + i))

    # Sums carried through the loop (not k stacked copies of the gradients), from zeros.
    shapes = jax.eval_shape(run, 0, jax.tree.map(lambda a: a[0], micro))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(total, xs):
      return jax.tree.map(jnp.add, total, run(*xs)), None

    total, _ = lax.scan(body, zeros, (jnp.arange(k), micro))
    return jax.tree.map(lambda t: t / k, total)
  return accumulated
