"""The evaluation loop: an eval step summed over a padded, masked dataset (every example counts once)."""
import jax
import jax.numpy as jnp

from advprop_jax import parallel
from advprop_jax.data import input_pipeline


def evaluate(eval_step, params, model_state, dataset, mesh, normalization: str) -> dict:
  """{'top1', 'top5', 'loss' (means over the real examples), 'count'} of `eval_step` over `dataset`
  (batches of pixels, normalised on the device by `normalization`)."""
  totals = None
  for batch in input_pipeline.global_batches(dataset, parallel.batch_sharding(mesh), normalization):
    sums = eval_step(params, model_state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.tree.map(float, totals)
  count = max(totals['count'], 1.0)
  return dict(top1=totals['top1'] / count, top5=totals['top5'] / count, loss=totals['loss'] / count,
              count=int(totals['count']))
