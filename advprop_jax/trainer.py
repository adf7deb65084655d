"""The training loop: data, state, resume, steps, metrics, periodic evaluation and checkpoints."""
import json
import logging
import time

import jax
import numpy as np
from clu import metric_writers
from clu import periodic_actions
from etils import epath

from advprop_jax import checkpoints
from advprop_jax import config as config_lib
from advprop_jax import factories
from advprop_jax import parallel
from advprop_jax import step as step_lib
from advprop_jax.data import input_pipeline
from advprop_jax.eval import evaluators


class NonFiniteLossError(RuntimeError):
  pass


def variables(params, model_state) -> dict:
  """Flax variables of one set of weights: {'params', 'batch_stats', 'batch_stats_adv', ...}."""
  return {'params': params, **model_state}


def _check_finite(history):
  for step, metrics in history:
    loss = float(metrics['loss'])
    if not np.isfinite(loss):
      raise NonFiniteLossError(
          f'Training loss is {loss} at step {step}; stopping. The last checkpoint (before this '
          'step) is kept: lower the learning rate or fix the data and rerun to resume from it.')


def train_and_evaluate(config, workdir: str, *, step_hooks=()) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns the final metrics.

  step_hooks: callables `hook(step, state, metrics)` run after every step (e.g. timing: the ablation
  blocks on the outputs and records the time).
  """
  jax.config.update('jax_default_prng_impl', config.prng_impl)
  config_lib.validate(config, jax.device_count(), jax.process_count())
  mesh = parallel.create_mesh(config.bn_group_size)
  try:  # also checks that the dataset exists, before the workdir is touched
    num_train = input_pipeline.num_examples(config.data, config.data.train_split)
  except (ValueError, FileNotFoundError) as e:
    raise config_lib.ConfigError(f'config.data (dataset={config.data.dataset!r}, '
                                 f'data_dir={config.data.data_dir!r}): {e}') from e
  schedule = factories.schedule(config, num_train)
  total_steps = schedule.total_steps
  loader_batch = factories.loader_batch_size(config)
  model = factories.build_model(config)
  tx, lr_fn = factories.build_optimizer(config, schedule.steps_per_epoch)
  logging.info('%d process(es), %d device(s), mesh %s; %d steps of %d images (%d per epoch)',
               jax.process_count(), jax.device_count(), dict(mesh.shape), total_steps,
               loader_batch, schedule.steps_per_epoch)

  checkpointer = checkpoints.Checkpointer(
      workdir, every_steps=config.checkpoint_every_steps, keep=config.keep_checkpoints,
      config_fingerprint=factories.fingerprint(config))
  init_rng = jax.random.PRNGKey(config.seed)
  state, _ = checkpointer.restore_latest(
      step_lib.abstract_train_state(model, tx, config.data.image_size, mesh), mesh)
  if state is None:
    state = step_lib.create_train_state(model, tx, init_rng, config.data.image_size, mesh)
  start_step = int(state.step)
  if jax.process_index() == 0:
    _write_run_config(config, workdir)
  logging.info('Starting at step %d%s', start_step, ' (resumed)' if start_step else '')

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
  train_step = step_lib.make_train_step(model, tx, config, mesh, lr_fn, config.ema_decay)
  eval_context = evaluators.Context(config, model, mesh)
  batches = input_pipeline.global_batches(
      input_pipeline.train_dataset(config.data, per_process_batch_size=loader_batch // jax.process_count(),
                                   seed=config.seed, start_step=start_step),
      parallel.batch_sharding(mesh))
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every_steps)
  hooks = [report]
  if config.profile_steps and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=workdir, first_profile=config.profile_steps[0],
                                          num_profile_steps=config.profile_steps[1] -
                                          config.profile_steps[0]))
  step_rng = jax.random.PRNGKey(config.seed + 1)
  history, wait_time, window_start = [], 0.0, time.time()

  step = start_step
  while step < total_steps:
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      t = time.time()
      batch = next(batches)
      wait_time += time.time() - t
      state, metrics = train_step(state, batch, step_rng)
    step += 1
    for hook in step_hooks:
      hook(step, state, metrics)
    history.append((step, metrics))
    for hook in hooks:
      hook(step)
    last = step == total_steps
    if step % config.log_every_steps == 0 or last or checkpointer.should_save(step):
      _check_finite(history)
      means = {f'train/{k}': float(np.mean([float(m[k]) for _, m in history])) for k in metrics}
      means['train/input_wait_fraction'] = wait_time / max(time.time() - window_start, 1e-9)
      writer.write_scalars(step, means)
      history, wait_time, window_start = [], 0.0, time.time()
    if step % schedule.eval_every_steps == 0 and not last:
      with report.timed('eval'):
        clean = evaluators.eval_clean(eval_context, variables(state.ema_params, state.ema_model_state),
                                      {})
        writer.write_scalars(step, {f'eval_ema/{k}': v for k, v in clean.items()})
    if checkpointer.should_save(step) or last:
      checkpointer.save(step, state, {'data_step': step}, force=last)
    if checkpointer.preempted and not last:
      logging.warning('Preemption requested: checkpoint at step %d saved, exiting.', step)
      checkpointer.wait()
      checkpointer.close()
      writer.flush()
      return {'preempted_at_step': step}

  final = final_evaluation(config, eval_context, state)
  final['step'] = int(state.step)
  writer.write_scalars(int(state.step), {f'final/{k}': v for k, v in final.items()
                                         if isinstance(v, float)})
  writer.flush()
  checkpointer.wait()
  checkpointer.close()
  if jax.process_index() == 0:
    (epath.Path(workdir) / 'final_metrics.json').write_text(json.dumps(final, indent=2, sort_keys=True))
  return final


def final_evaluation(config, eval_context, state) -> dict:
  """Clean top-1/top-5 of the EMA and raw weights, and PGD top-1 of the EMA weights (main BN) at each
  config.eval_pgd_epsilons_pixels."""
  results = {}
  ema = variables(state.ema_params, state.ema_model_state)
  for name, weights in (('ema', ema), ('raw', variables(state.params, state.model_state))):
    metrics = evaluators.eval_clean(eval_context, weights, {})
    results.update({f'{name}_clean_top1': metrics['top1'], f'{name}_clean_top5': metrics['top5']})
    results['eval_examples'] = metrics['count']
  if config.eval_pgd_epsilons_pixels:
    settings = dict(evaluators.DEFAULT_SETTINGS['pgd'], epsilons_pixels=config.eval_pgd_epsilons_pixels)
    pgd = evaluators.eval_pgd(eval_context, ema, settings)['by_epsilon_pixels']
    results.update({f'ema_pgd{eps}_top1': r['top1'] for eps, r in pgd.items()})
  return results


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out


def _write_run_config(config, workdir):
  """workdir/config.json: the full config, for export / evaluate / predict."""
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  tmp = path / 'config.json.tmp'
  tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  tmp.replace(path / 'config.json')  # atomic overwrite


def format_final_table(config, final: dict) -> str:
  """Markdown table of the main-BN model's final accuracies."""
  header = ['model', 'method', 'clean top-1 (EMA)', 'clean top-1 (raw)']
  row = [config.model, config.method, f'{final["ema_clean_top1"]:.4f}',
         f'{final["raw_clean_top1"]:.4f}']
  for key in sorted(k for k in final if k.startswith('ema_pgd')):
    header.append(f'PGD-{key[len("ema_pgd"):-len("_top1")]}px top-1 (EMA)')
    row.append(f'{final[key]:.4f}')
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header), '| ' + ' | '.join(row) + ' |']
  return '\n'.join(lines)
