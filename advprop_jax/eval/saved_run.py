"""Evaluating a saved run (a training workdir): its config, its newest checkpoint's weights, the
evaluators, the outputs."""
import json
import os

import jax
import ml_collections

from advprop_jax import checkpoints
from advprop_jax import factories
from advprop_jax import parallel
from advprop_jax.eval import evaluators
from advprop_jax.eval import report


def load_config(workdir, config=None):
  """`config`, else the run's workdir/config.json."""
  if config is not None:
    return config
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: pass --config (the training config of this run)')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def evaluate_workdir(workdir, config=None, *, names=None, output=None, ema=True, stylized_dir=None):
  """Runs the evaluators on the newest checkpoint of `workdir`; returns (meta, results)."""
  config = load_config(workdir, config)
  plan = evaluators.evaluator_plan(config, names)
  weights, fp = checkpoints.load_inference_variables(workdir, ema=ema)
  model = factories.build_model(config)
  mesh = parallel.create_mesh(config.bn_group_size)
  weights = jax.device_put(weights, parallel.replicated_sharding(mesh))
  ctx = evaluators.Context(config, model, mesh, stylized_dir)
  results = evaluators.run_evaluators(ctx, weights, plan)
  meta = dict(workdir=os.path.abspath(workdir), model=config.model, method=config.get('method'),
              dataset=config.data.dataset, ema=ema, checkpoint_fingerprint=fp)
  report.write_outputs(output or os.path.join(workdir, 'eval'), meta, results)
  return meta, results
