"""The training loop: data, state, resume, steps, metrics, periodic evaluation and checkpoints."""
import logging
import os
import re
import time

import jax
import numpy as np
from clu import metric_writers

from advprop_jax import checkpoints
from advprop_jax import cli
from advprop_jax import config as config_lib
from advprop_jax import factories
from advprop_jax import image_summaries
from advprop_jax import init_from
from advprop_jax import parallel
from advprop_jax import step as step_lib
from advprop_jax import workdir as workdir_lib
from advprop_jax.data import image_folder
from advprop_jax.data import input_pipeline
from advprop_jax.eval import evaluators


class NonFiniteLossError(RuntimeError):
  pass


def variables(params, model_state) -> dict:
  """Flax variables of one set of weights: {'params', 'batch_stats', 'batch_stats_adv', ...}."""
  return {'params': params, **model_state}


def _check_finite(history, checkpointer):
  for step, metrics in history:
    loss = float(metrics['loss'])
    if not np.isfinite(loss):
      checkpointer.wait()  # a save in flight (of an earlier step, checked finite) completes first
      kept = checkpointer.newest_complete()
      # A lower learning rate is a schedule change, which a resume refuses unless allowed.
      advice = (f'the newest checkpoint ({kept}, before this step) is kept: rerun with a lower '
                '--config.base_learning_rate and --allow_schedule_change to resume from it with '
                'that, or fix the data and rerun the same command' if kept != 'none' else
                'no checkpoint was written yet: rerun with a lower --config.base_learning_rate, or '
                'fix the data, to start again')
      raise NonFiniteLossError(f'Training loss is {loss} at step {step}; stopping. {advice}.')


class _Profile:
  """A jax.profiler trace of steps first+1 .. last (config.profile_steps = (first, last)), written
  to WORKDIR/plugins/profile. Not clu's Profile: that one also waits for 3 s of steps (a short run
  ended before them and wrote nothing, silently) and profiles again every hour."""

  def __init__(self, workdir, first, last):
    self.workdir, self.first, self.last, self.running = workdir, first, last, False

  def __call__(self, step):  # after `step` steps
    if step == self.first:
      jax.profiler.start_trace(self.workdir)
      self.running = True
    elif step == self.last and self.running:
      jax.profiler.stop_trace()
      self.running = False
      logging.info('Profiler trace of steps %d-%d written to %s', self.first + 1, self.last,
                   os.path.join(self.workdir, 'plugins', 'profile'))


def _profile(config, workdir, start_step: int, total_steps: int):
  """The trace of config.profile_steps (process 0), or None; warns if the run cannot reach it."""
  if not config.profile_steps or jax.process_index() != 0:
    return None
  first, last = config.profile_steps
  if not start_step <= first < total_steps:
    logging.warning('config.profile_steps=(%d, %d): no profiler trace, the run %s.', first, last,
                    f'ends at step {total_steps}' if first >= total_steps else
                    f'resumes at step {start_step}, after its start')
    return None
  if last > total_steps:
    logging.warning('config.profile_steps=(%d, %d): the run ends at step %d; the trace covers '
                    'steps %d-%d.', first, last, total_steps, first + 1, total_steps)
  profile = _Profile(workdir, first, min(last, total_steps))
  if first == start_step:
    profile(first)  # from the first step on (its compilation included)
  return profile


def _write_failure(error, checkpointer, workdir):
  """A failed write of the run (summaries, config.json, final metrics, ...) as one WriteError naming
  the newest complete checkpoint; other errors as they are (a failed save names itself)."""
  if isinstance(error, cli.WriteError):
    what, path, reason = error.what, error.path, error.reason
  elif (isinstance(error, checkpoints.CheckpointWriteError) or
        cli.write_failure_reason(error) not in cli.DISK_REASONS):  # (not a read's error)
    return error
  else:  # e.g. clu's AsyncError of the TensorBoard writer: TensorFlow names the file in its text
    reason = cli.write_failure_reason(error)
    paths = re.findall(r'(?:^|[\s\'"])(/[^\s;\'"]+)', str(error))
    path = getattr(error, 'filename', None) or (paths[0] if paths else workdir)
    what = 'the TensorBoard summaries' if 'tfevents' in path else 'an output of the run'
  return cli.WriteError(what, path, reason, then=checkpointer.rerun_hint(reason))


def _num_train_examples(config) -> int:
  """What training reads of the training split (the minival held out); a ConfigError (before
  anything is written) if the data cannot work."""
  try:
    num_train = input_pipeline.num_train_examples(config.data)
    dataset_classes = input_pipeline.num_classes(config.data)
  except (ValueError, FileNotFoundError) as e:
    raise config_lib.ConfigError(f'config.data (dataset={config.data.dataset!r}, '
                                 f'data_dir={config.data.data_dir!r}): {e}') from e
  if config.data.dataset == image_folder.NAME and config.num_classes != dataset_classes:
    # An image folder defines the classes: one output per class folder, whatever the config file
    # says (configs/demo.py's 10 would leave untrained outputs); config.json records the number.
    logging.info('config.num_classes=%d -> %d: the class folders of %s', config.num_classes,
                 dataset_classes, config.data.data_dir)
    config.num_classes = dataset_classes
  if dataset_classes > config.num_classes:
    raise config_lib.ConfigError(f'config.num_classes={config.num_classes} is smaller than the '
                                 f'{dataset_classes} classes of dataset {config.data.dataset!r}')
  return num_train


def _summary_writer(workdir):
  """TensorBoard summaries from process 0 (the console gets one progress line per interval instead)."""
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s' if m else f'{s}s'


def _progress_line(step, total_steps, means, images_per_sec, seconds_per_step) -> str:
  accuracy = ''.join(f' | {name} acc {means[f"train/{key}"]:.3f}'
                     for name, key in (('clean', 'clean_accuracy'), ('adv', 'adv_accuracy'))
                     if f'train/{key}' in means)
  eta = _duration((total_steps - step) * seconds_per_step)
  return (f'step {step}/{total_steps} ({100 * step / total_steps:.0f}%) | loss {means["train/loss"]:.4f}'
          f'{accuracy} | {images_per_sec:.1f} img/s | ETA {eta}')


def train_and_evaluate(config, workdir: str, *, step_hooks=(), allow_schedule_change=False,
                       on_stop=None, process_is_slice=False) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns the final metrics.

  step_hooks: callables `hook(step, state, metrics)` run after every step (e.g. timing: the ablation
  blocks on the outputs and records the time). allow_schedule_change: resume a run whose checkpoint was
  written with another batch size / LR / epochs / seed (refused otherwise, nothing modified). A finished
  run is not trained or evaluated again: its stored final metrics are returned ('already_finished').
  on_stop: called once a signal's checkpoint is saved, while the run is still alive (the command line
  exits the process there: tearing down tf.data's in-flight work takes tens of seconds on a busy host).
  """
  jax.config.update('jax_default_prng_impl', config.prng_impl)
  # process_is_slice: each process stands in for a TPU slice (multislice path on CPU; parallel.py).
  num_slices = parallel.count_slices(process_is_slice=process_is_slice)
  config_lib.validate(config, jax.device_count(), jax.process_count(), num_slices)
  workdir_lib.check_writable(workdir)
  mesh = parallel.create_mesh(config.bn_group_size, process_is_slice=process_is_slice)
  schedule = factories.schedule(config, _num_train_examples(config))
  model = factories.build_model(config)
  source = init_from.prepare(config, workdir, model)  # read and checked before the workdir is created
  tx, lr_fn = factories.build_optimizer(config, schedule.steps_per_epoch)
  logging.info('%d process(es), %d device(s), mesh %s; %d steps of %d images (%.3f per epoch)',
               jax.process_count(), jax.device_count(), dict(mesh.shape), schedule.total_steps,
               factories.loader_batch_size(config), schedule.steps_per_epoch)
  with cli.BackgroundErrors(), workdir_lib.Lock(workdir):
    checkpointer = checkpoints.Checkpointer(
        workdir, every_steps=config.checkpoint_every_steps, keep=config.keep_checkpoints,
        config_fingerprint=factories.fingerprint(config), schedule_fields=factories.SCHEDULE_FIELDS,
        allow_schedule_change=allow_schedule_change, keep_best_by=config.keep_best_by)
    try:
      return _train(config, workdir, mesh, schedule, model, tx, lr_fn, checkpointer, step_hooks,
                    source, on_stop)
    except Exception as e:  # pylint: disable=broad-except  (re-raised unless it is a failed write)
      failure = _write_failure(e, checkpointer, workdir)
      if failure is e:
        raise
      raise failure from None
    finally:
      checkpointer.close()


def _train(config, workdir, mesh, schedule, model, tx, lr_fn, checkpointer, step_hooks,
           source=None, on_stop=None) -> dict:
  total_steps = schedule.total_steps
  state, _ = checkpointer.restore_latest(
      step_lib.abstract_train_state(model, tx, config.data.image_size, mesh), mesh)
  finished = workdir_lib.read_final_metrics(workdir)
  if state is not None and int(state.step) >= total_steps and finished is not None and \
      finished.get('step') == int(state.step):
    logging.info('The run in %s finished at step %d; its final metrics are kept as they are '
                 '(python -m advprop_jax.evaluate evaluates it again).', workdir, int(state.step))
    return dict(finished, already_finished=True)
  if state is None and config.get('init_from'):  # (its checkpoints may all have been unreadable)
    state = init_from.initial_state(source or init_from.load(config, model), model, tx, config, mesh)
  elif state is None:
    state = step_lib.create_train_state(model, tx, jax.random.PRNGKey(config.seed),
                                        config.data.image_size, mesh)
  start_step = int(state.step)
  workdir_lib.write_run_config(config, workdir)
  workdir_lib.write_class_names(input_pipeline.class_names(config.data), workdir)
  logging.info('Starting at step %d%s', start_step, ' (resumed)' if start_step else '')

  writer = _summary_writer(workdir)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
  train_step = step_lib.make_train_step(model, tx, config, mesh, lr_fn, config.ema_decay)
  eval_context = evaluators.Context(config, model, mesh)
  periodic_plan, keep_best = evaluators.plan(config, 'periodic'), config.keep_best_by
  loader_batch = factories.loader_batch_size(config)
  batches = input_pipeline.global_batches(
      input_pipeline.train_dataset(config.data, per_process_batch_size=loader_batch // jax.process_count(),
                                   seed=config.seed, start_step=start_step),
      parallel.batch_sharding(mesh), config.data.normalization)
  profile = _profile(config, workdir, start_step, total_steps)
  log_images = image_summaries.make_logger(model, config, mesh)  # None: log_images_every_steps=0
  step_rng = jax.random.PRNGKey(config.seed + 1)
  history, wait_time, window_start, window_steps = [], 0.0, time.time(), 0

  step = start_step
  while step < total_steps:
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      t = time.time()
      batch = next(batches)
      wait_time += time.time() - t
      if step == start_step:
        logging.info('Compiling the train step (the first step includes compilation)...')
      state, metrics = train_step(state, batch, step_rng)
      if step == start_step:
        jax.block_until_ready(metrics)
        logging.info('Train step compiled and run in %.1f s', time.time() - t)
        window_start = time.time()  # rates exclude compilation
    step += 1
    window_steps += step > start_step + 1
    for hook in step_hooks:
      hook(step, state, metrics)
    history.append((step, metrics))
    if profile is not None:
      profile(step)
    if log_images is not None:
      window_start += log_images(writer, step, state, batch, step_rng)  # rates exclude it
    last = step == total_steps
    if step % config.log_every_steps == 0 or last or checkpointer.should_save(step):
      _check_finite(history, checkpointer)
      seconds = max(time.time() - window_start, 1e-9)
      means = {f'train/{k}': float(np.mean([float(m[k]) for _, m in history])) for k in metrics}
      means.update({'train/input_wait_fraction': wait_time / seconds,
                    'train/steps_per_sec': window_steps / seconds})
      writer.write_scalars(step, means)
      if window_steps and jax.process_index() == 0:  # one progress line per interval, not per host
        logging.info(_progress_line(step, total_steps, means, loader_batch * window_steps / seconds,
                                    seconds / window_steps))
      history, wait_time, window_start, window_steps = [], 0.0, time.time(), 0
    # With keep_best_by every evaluated state is saved with its metric (the last one too): the
    # best checkpoint is chosen among evaluated states only.
    evaluating = (step % schedule.eval_every_steps == 0 and not last) or (last and keep_best)
    save_best = bool(evaluating and keep_best)
    scalars = {}
    if evaluating:
      start = time.time()
      scalars = periodic_evaluation(eval_context, periodic_plan, state)
      writer.write_scalars(step, scalars)
      logging.info('eval at step %d (EMA weights): %s (%.1f s)', step, ', '.join(
          f'{k} {v:.4f}' for k, v in scalars.items() if not k.endswith('count')),
          time.time() - start)
      window_start += time.time() - start  # rates exclude evaluation
    if checkpointer.should_save(step) or last or save_best:
      checkpointer.save(step, state, {'data_step': step}, force=last or save_best,
                        metrics={keep_best: scalars[keep_best]} if keep_best in scalars else None)
    if checkpointer.preempted and not last:
      checkpointer.wait()  # the save is complete (no tmp directory left) before we say so
      logging.warning('Stop requested (%s): checkpoint at step %d saved, exiting. Rerun the same '
                      'command to resume.', checkpointer.stop_reason, step)
      writer.flush()
      if on_stop is not None:
        on_stop()
      return {'preempted_at_step': step}

  final = final_evaluation(config, eval_context, state)
  final['step'] = int(state.step)
  writer.write_scalars(int(state.step), {f'final/{k}': v for k, v in final.items()
                                         if isinstance(v, float)})
  writer.flush()
  checkpointer.wait()
  workdir_lib.write_final_metrics(final, workdir)
  return final


def _weights(state) -> dict:
  return {'ema': variables(state.ema_params, state.ema_model_state),
          'raw': variables(state.params, state.model_state)}


def periodic_evaluation(eval_context, plan, state) -> dict:
  """The plan's periodic stage on `state`: TensorBoard scalars <tag><key> (e.g. eval_ema/top1,
  minival/ema_clean_top1; keep_best_by names one of them)."""
  scalars = {}
  for weights, variables_ in _weights(state).items():
    entries = [(n, s) for n, s in plan if weights in s['weights']]
    results = evaluators.run_evaluators(eval_context, variables_, entries) if entries else {}
    for name, settings in entries:
      scalars.update({f'{settings["tag"]}{k}': v for k, v in results[name].items() if k != 'seconds'
                      and isinstance(v, (int, float)) and not isinstance(v, bool)})
  return scalars


def final_evaluation(config, eval_context, state) -> dict:
  """The plan's final stage (evaluators.plan(config, 'final')): clean top-1/top-5 of the EMA and
  raw weights, and PGD top-1 of the EMA weights (main BN) at each config.eval_pgd_epsilons_pixels,
  as final_metrics.json's keys (ema_clean_top1, raw_clean_top5, eval_examples, ema_pgd4_top1,
  ...)."""
  plan, results = evaluators.plan(config, 'final'), {}
  for weights, variables_ in _weights(state).items():
    entries = [(n, s) for n, s in plan if weights in s['weights']]
    if entries:
      logging.info('final evaluation, %s weights: %s', weights.upper() if weights == 'ema' else
                   weights, ', '.join(n for n, _ in entries))
      out = evaluators.run_evaluators(eval_context, variables_, entries)
      results.update(evaluators.final_scalars(entries, out, weights))
  return results


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out


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
