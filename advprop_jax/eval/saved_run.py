"""Evaluating a saved run (a training workdir): its config, its newest checkpoint's weights, the
evaluators, the outputs."""
import json
import os
import shutil
import tempfile

from etils import epath
import jax
import ml_collections

from advprop_jax import checkpoints
from advprop_jax import cli
from advprop_jax import factories
from advprop_jax import parallel
from advprop_jax.eval import evaluators
from advprop_jax.eval import report
from advprop_jax.models import batchnorm


def load_config(workdir, config=None):
  """`config`, else the run's workdir/config.json."""
  if config is not None:
    return config
  path = epath.Path(workdir) / 'config.json'  # (gs:// too)
  if not path.exists():
    raise FileNotFoundError(f'{path} not found: pass --config (the training config of this run)')
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except json.JSONDecodeError as e:  # e.g. truncated: name the file, not just the parser's words
    raise ValueError(f'{path}: not valid JSON ({e}); pass --config (the training config of this '
                     'run)') from None


def evaluate_workdir(workdir, config=None, *, names=None, output=None, ema=True, stylized_dir=None,
                     step=None, bn=batchnorm.CLEAN):
  """Runs the evaluators on the newest checkpoint of `workdir` (or `step`: a number or 'best'),
  through the main BN or that of distribution `bn` (e.g. AdvProp's 'adv'); returns (meta,
  results)."""
  if output:
    cli.check_writable('--output', output)  # before the evaluation, not after it
  config = load_config(workdir, config)
  plan = evaluators.evaluator_plan(config, names)
  weights, fp, step = checkpoints.load_inference_variables(workdir, ema=ema, step=step,
                                                          with_step=True)
  weights = batchnorm.with_main_bn_of(weights, bn)
  model = factories.build_model(config)
  mesh = parallel.create_mesh(config.bn_group_size)
  weights = jax.device_put(weights, parallel.replicated_sharding(mesh))
  ctx = evaluators.Context(config, model, mesh, stylized_dir)
  results = evaluators.run_evaluators(ctx, weights, plan)
  meta = dict(workdir=os.path.abspath(workdir), model=config.model, method=config.get('method'),
              dataset=config.data.dataset, ema=ema, checkpoint_fingerprint=fp, step=step, bn=bn)
  write_report(output or os.path.join(workdir, 'eval'), meta, results)
  return meta, results


def write_report(output, meta, results):
  """report.write_outputs into a temporary directory, then moved into `output` file by file: a
  failed write (e.g. a full disk) is one cli.WriteError and leaves no half-written file, nor the
  directories it made (an existing `output` keeps its earlier files)."""
  if jax.process_index() != 0:
    return
  output = top = os.path.abspath(output)
  while not os.path.exists(os.path.dirname(top)):
    top = os.path.dirname(top)
  created, tmp = not os.path.exists(output), None
  with cli.writing('the evaluation report', output):
    try:
      os.makedirs(output, exist_ok=True)
      tmp = tempfile.mkdtemp(prefix='.tmp-', dir=output)
      report.write_outputs(tmp, meta, results)
      for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(output, name))
    except BaseException:
      if created:
        shutil.rmtree(top, ignore_errors=True)
      raise
    finally:
      if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
