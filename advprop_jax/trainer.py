"""The training loop: data, state, resume, steps, metrics, periodic evaluation and checkpoints."""
import json
import logging
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metric_writers
from clu import periodic_actions
from etils import epath

from advprop_jax import checkpoints
from advprop_jax import config as config_lib
from advprop_jax import objectives
from advprop_jax import optim
from advprop_jax import parallel
from advprop_jax import train
from advprop_jax.data import input_pipeline
from advprop_jax.models import create_model


class NonFiniteLossError(RuntimeError):
  pass


# Config fields a checkpoint must agree on to be resumed (anything else may change on resume).
FINGERPRINT_FIELDS = ('model', 'model_overrides', 'method', 'num_classes', 'data.image_size',
                      'optimizer', 'fine_grained_epsilons_pixels')


def _get(config, dotted):
  for part in dotted.split('.'):
    config = config[part]
  return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config


def fingerprint(config) -> dict:
  return {f: json.loads(json.dumps(_get(config, f), default=list)) for f in FINGERPRINT_FIELDS}


def build_model(config, **extra):
  dtype = jnp.bfloat16 if config.dtype == 'bfloat16' else jnp.float32
  # None-valued overrides are unset placeholders (declared so the command line may set them).
  overrides = {k: v for k, v in config.model_overrides.to_dict().items() if v is not None}
  overrides.update(extra)
  overrides.setdefault('distributions', objectives.method_distributions(config))
  return create_model(config.model, num_classes=config.num_classes, dtype=dtype, **overrides)


def loader_batch_size(config) -> int:
  """Images drawn from the loader per step (Fast AdvProp draws 1/(1-adv_fraction) x the batch)."""
  if config.method == 'fast_advprop':
    return int(round(config.global_batch_size / (1.0 - config.fast_advprop.adv_fraction)))
  return config.global_batch_size


def steps_per_epoch(config) -> float:
  return optim.steps_per_epoch(input_pipeline.num_examples(config.data, config.data.train_split),
                               loader_batch_size(config))


def build_optimizer(config, steps_per_epoch_: float):
  base_lr = config.base_learning_rate * config.global_batch_size / 256
  lr_fn = optim.learning_rate_schedule(
      base_lr=base_lr, steps_per_epoch=steps_per_epoch_, num_epochs=config.num_epochs,
      warmup_epochs=config.warmup_epochs, schedule=config.lr_schedule,
      decay_epochs=config.lr_decay_epochs, decay_rate=config.lr_decay_rate,
      boundaries_epochs=tuple(config.lr_boundaries_epochs))
  tx = optim.create_optimizer(config.optimizer, lr_fn, momentum=config.momentum,
                              rmsprop_decay=config.rmsprop_decay,
                              rmsprop_epsilon=config.rmsprop_epsilon, nesterov=config.nesterov,
                              weight_decay=config.weight_decay)
  return tx, lr_fn


def evaluate(config, eval_step, params, model_state, mesh) -> dict:
  """Exact evaluation over the whole eval split (padded, masked batches)."""
  per_process = config.eval_batch_size // jax.process_count()
  dataset = input_pipeline.eval_dataset(config.data, per_process_batch_size=per_process)
  totals = None
  for batch in input_pipeline.global_batches(dataset, parallel.batch_sharding(mesh)):
    sums = eval_step(params, model_state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.tree.map(float, totals)
  count = max(totals['count'], 1.0)
  return dict(top1=totals['top1'] / count, top5=totals['top5'] / count, loss=totals['loss'] / count,
              count=int(totals['count']))


def make_evaluators(config, model, mesh):
  """name -> eval_step: clean, plus white-box PGD (main BN) at each config.eval_pgd_epsilons_pixels."""
  evaluators = {'clean': train.make_eval_step(model, mesh, num_classes=config.num_classes)}
  for eps in config.eval_pgd_epsilons_pixels:
    attack = ml_collections.ConfigDict(dict(
        epsilon_pixels=eps, step_size_pixels=config.eval_pgd_step_size_pixels, num_steps=0,
        random_start=0.0, targeted=False))
    settings = objectives.attack_settings(attack, config.data.normalization)
    evaluators[f'pgd{eps:g}'] = train.make_eval_step(model, mesh, num_classes=config.num_classes,
                                                     attack_settings=settings)
  return evaluators


def _check_finite(history):
  for step, metrics in history:
    loss = float(metrics['loss'])
    if not np.isfinite(loss):
      raise NonFiniteLossError(
          f'Training loss is {loss} at step {step}; stopping. The last checkpoint (before this '
          'step) is kept: lower the learning rate or fix the data and rerun to resume from it.')


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns the final metrics."""
  jax.config.update('jax_default_prng_impl', config.prng_impl)
  config_lib.validate(config, jax.device_count(), jax.process_count())
  mesh = parallel.create_mesh(config.bn_group_size)
  try:  # also checks that the dataset exists, before the workdir is touched
    num_train = input_pipeline.num_examples(config.data, config.data.train_split)
  except (ValueError, FileNotFoundError) as e:
    raise config_lib.ConfigError(f'config.data (dataset={config.data.dataset!r}, '
                                 f'data_dir={config.data.data_dir!r}): {e}') from e
  spe = optim.steps_per_epoch(num_train, loader_batch_size(config))
  total_steps = optim.epochs_to_steps(config.num_epochs, num_train, loader_batch_size(config))
  if config.max_steps is not None:
    total_steps = min(total_steps, config.max_steps)
  model = build_model(config)
  tx, lr_fn = build_optimizer(config, spe)
  logging.info('%d process(es), %d device(s), mesh %s; %d steps of %d images (%.3f per epoch)',
               jax.process_count(), jax.device_count(), dict(mesh.shape), total_steps,
               loader_batch_size(config), spe)

  checkpointer = checkpoints.Checkpointer(
      workdir, every_steps=config.checkpoint_every_steps, keep=config.keep_checkpoints,
      config_fingerprint=fingerprint(config))
  init_rng = jax.random.PRNGKey(config.seed)
  make_state = lambda: train.create_train_state(model, tx, init_rng, config.data.image_size, mesh)
  state, _ = checkpointer.restore_latest(jax.eval_shape(make_state), mesh)
  if state is None:
    state = make_state()
  start_step = int(state.step)
  if jax.process_index() == 0:
    _write_run_config(config, workdir)
  logging.info('Starting at step %d%s', start_step, ' (resumed)' if start_step else '')

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
  train_step = train.make_train_step(model, tx, config, mesh, lr_fn, config.ema_decay)
  evaluators = make_evaluators(config, model, mesh)
  per_process_batch = loader_batch_size(config) // jax.process_count()
  batches = input_pipeline.global_batches(
      input_pipeline.train_dataset(config.data, per_process_batch_size=per_process_batch,
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
  eval_every = max(1, optim.epochs_to_steps(config.eval_every_epochs, num_train,
                                            loader_batch_size(config)))
  history, wait_time, window_start = [], 0.0, time.time()

  step = start_step
  while step < total_steps:
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      t = time.time()
      batch = next(batches)
      wait_time += time.time() - t
      state, metrics = train_step(state, batch, step_rng)
    step += 1
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
    if step % eval_every == 0 and not last:
      with report.timed('eval'):
        writer.write_scalars(step, {f'eval_ema/{k}': v for k, v in evaluate(
            config, evaluators['clean'], state.ema_params, state.ema_model_state, mesh).items()})
    if checkpointer.should_save(step) or last:
      checkpointer.save(step, state, {'data_step': step}, force=last)
    if checkpointer.preempted and not last:
      logging.warning('Preemption requested: checkpoint at step %d saved, exiting.', step)
      checkpointer.wait()
      checkpointer.close()
      writer.flush()
      return {'preempted_at_step': step}

  final = final_evaluation(config, evaluators, state, mesh)
  final['step'] = int(state.step)
  writer.write_scalars(int(state.step), {f'final/{k}': v for k, v in final.items()
                                         if isinstance(v, float)})
  writer.flush()
  checkpointer.wait()
  checkpointer.close()
  if jax.process_index() == 0:
    (epath.Path(workdir) / 'final_metrics.json').write_text(json.dumps(final, indent=2, sort_keys=True))
  return final


def final_evaluation(config, evaluators, state, mesh) -> dict:
  """Clean top-1/top-5 of the EMA and raw weights, and PGD top-1 of the EMA weights (main BN)."""
  results = {}
  for name, params, model_state in (('ema', state.ema_params, state.ema_model_state),
                                    ('raw', state.params, state.model_state)):
    metrics = evaluate(config, evaluators['clean'], params, model_state, mesh)
    results.update({f'{name}_clean_top1': metrics['top1'], f'{name}_clean_top5': metrics['top5']})
    results['eval_examples'] = metrics['count']
  for name, eval_step in evaluators.items():
    if name != 'clean':
      results[f'ema_{name}_top1'] = evaluate(config, eval_step, state.ema_params,
                                             state.ema_model_state, mesh)['top1']
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
