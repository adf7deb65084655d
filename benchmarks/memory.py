"""Per-core memory of a training step from shapes alone: no compute, any model size, on any host.

  python -m benchmarks.memory --model=efficientnet-b7 --image_size=600 --batch=8 --dtype=bfloat16 \
      --method=advprop [--remat]
  python -m benchmarks.memory --recipe    # B7 @ 600 px and B8 @ 672 px, recipe per-core batches, +- remat

Counted per core (the step is data parallel: every core holds the whole state and its batch shard):
  state      params, optimizer slots, EMA copies and BN statistics (the replicated TrainState), plus
             one gradient-sized buffer;
  residuals  the distinct arrays autodiff keeps from the forward pass(es) for the backward pass: the
             outputs of jax.vjp's partial evaluation of the method's loss (jax.make_jaxpr), less the
             inputs already counted. This is what `remat` trades for recomputation;
  batch      the input shard.
Their sum is a lower bound on the step's peak: the backward pass adds transient buffers whose size
the backend's scheduler decides (the device's own peak comes from benchmarks/throughput.py). The
attack's own forward/backward is not live at that point (its result, the adversarial batch, is a
residual). Methods: those whose gradient is one loss (a Method record with make_loss_fn).

The recipe rows assume a 512-core TPU v3 pod (16 GiB HBM per core): global batch 4096 (B7) and
2048 (B8) -> 8 and 4 images per core.
"""
import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from advprop_jax import config as config_lib
from advprop_jax import factories
from advprop_jax import methods
from advprop_jax import step as step_lib

GIB = 2 ** 30
RECIPE = (('efficientnet-b7', 600, 8), ('efficientnet-b8', 672, 4))


def _nbytes(aval) -> int:
  return int(math.prod(aval.shape)) * np.dtype(aval.dtype).itemsize


def _tree_bytes(tree) -> int:
  return sum(_nbytes(x) for x in jax.tree.leaves(tree))


def step_memory(model_name: str, image_size: int, batch: int, dtype: str, method: str,
                remat: bool, num_classes: int = 1000) -> dict:
  """Bytes per core of state, autodiff residuals and batch for one training step (shapes only)."""
  config = config_lib.base_config()
  config.update_from_flattened_dict({'model': model_name, 'method': method, 'dtype': dtype,
                                     'num_classes': num_classes, 'global_batch_size': batch,
                                     'data.image_size': image_size})
  config.model_overrides.update({'remat': remat})
  config_lib.validate(config, 1, 1)
  model = factories.build_model(config)
  tx, _ = factories.build_optimizer(config, 1000)
  variables = jax.eval_shape(lambda: step_lib.init_variables(model, jax.random.PRNGKey(0), image_size))
  params = variables['params']
  model_state = {k: v for k, v in variables.items() if k != 'params'}
  opt_state = jax.eval_shape(tx.init, params)
  state_bytes = (2 * _tree_bytes(params) + _tree_bytes(opt_state)  # params + EMA params
                 + 2 * _tree_bytes(model_state) + _tree_bytes(params))  # + EMA stats + gradients
  batch_avals = {'image': jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32),
                 'label': jax.ShapeDtypeStruct((batch,), jnp.int32)}
  make_loss_fn = methods.get(method).make_loss_fn
  if make_loss_fn is None:
    raise ValueError(f'--method={method}: its gradient is not the gradient of one loss; choose one of '
                     f'{[m for m, r in methods.METHODS.items() if r.make_loss_fn]}')
  loss_fn = make_loss_fn(model, config)

  def residuals(params, model_state, batch, rng):
    _, vjp_fn, _ = jax.vjp(lambda p: loss_fn(p, model_state, batch, rng), params, has_aux=True)
    return jax.tree.leaves(vjp_fn)

  closed = jax.make_jaxpr(residuals)(params, model_state, batch_avals,
                                     jax.ShapeDtypeStruct((2,), jnp.uint32))
  invars = closed.jaxpr.invars
  inputs = set(invars)
  # Residuals that depend on the batch are activations; the rest derive from parameters alone (an
  # L2 term's 2 * w, reshaped kernels), which a compiler usually fuses away rather than stores.
  first = len(jax.tree.leaves(params)) + len(jax.tree.leaves(model_state))
  on_batch = set(invars[first:first + len(jax.tree.leaves(batch_avals))])
  for eqn in closed.jaxpr.eqns:
    if any(v in on_batch for v in eqn.invars if not hasattr(v, 'val')):
      on_batch.update(eqn.outvars)
  # Skip literals and arrays that already exist (params, batch); a residual may be listed twice.
  distinct = {v for v in closed.jaxpr.outvars if not hasattr(v, 'val') and v not in inputs}
  activation_bytes = sum(_nbytes(v.aval) for v in distinct if v in on_batch)
  residual_bytes = sum(_nbytes(v.aval) for v in distinct)
  batch_bytes = _tree_bytes(batch_avals)
  return dict(model=model_name, image_size=image_size, batch_per_core=batch, dtype=dtype,
              method=method, remat=remat, num_params=sum(x.size for x in jax.tree.leaves(params)),
              state_bytes=state_bytes, residual_bytes=residual_bytes, num_residuals=len(distinct),
              activation_residual_bytes=activation_bytes,
              batch_bytes=batch_bytes, total_bytes=state_bytes + residual_bytes + batch_bytes)


def markdown(rows) -> str:
  lines = ['| model | px | batch/core | dtype | method | remat | state GiB | residuals GiB '
           '(activations) | total GiB |', '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['model']} | {r['image_size']} | {r['batch_per_core']} | {r['dtype']} | "
                 f"{r['method']} | {'yes' if r['remat'] else 'no'} | {r['state_bytes'] / GIB:.2f} | "
                 f"{r['residual_bytes'] / GIB:.2f} ({r['activation_residual_bytes'] / GIB:.2f}) | "
                 f"{r['total_bytes'] / GIB:.2f} |")
  return '\n'.join(lines)


def main(argv=None, log=print) -> list:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='efficientnet-b0')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--batch', type=int, default=16, help='images per core')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--method', default='advprop')
  p.add_argument('--num_classes', type=int, default=1000)
  p.add_argument('--remat', action='store_true')
  p.add_argument('--recipe', action='store_true',
                 help='B7 @ 600 / B8 @ 672, bfloat16 AdvProp at the recipe per-core batch, +- remat')
  args = p.parse_args(argv)
  if args.recipe:
    configs = [(m, s, b, 'bfloat16', 'advprop', r) for m, s, b in RECIPE for r in (False, True)]
  else:
    configs = [(args.model, args.image_size, args.batch, args.dtype, args.method, args.remat)]
  rows = [step_memory(*c, num_classes=args.num_classes) for c in configs]
  log(markdown(rows))
  log(json.dumps(rows))
  return rows


if __name__ == '__main__':
  main()
