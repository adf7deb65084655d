"""Orbax checkpointing of the TrainState: periodic + preemption saves, resume, inference export.

On-disk layout (one orbax CheckpointManager rooted at `<workdir>/checkpoints`)::

  <workdir>/checkpoints/<step>/state/        the TrainState pytree (orbax StandardSave, OCDBT/zarr)
  <workdir>/checkpoints/<step>/extra/        small JSON dict of the training loop (data position, seeds)
  <workdir>/checkpoints/<step>/fingerprint/  JSON config fingerprint of the run that wrote the step
  <workdir>/checkpoints/<step>/_CHECKPOINT_METADATA
  <workdir>/checkpoints/<step>.orbax-checkpoint-tmp-<ts>/   a save in flight, or one killed mid-write

Orbax writes a step into the tmp directory and renames it when complete (on GCS: a commit_success.txt
file instead), so a half-written step is never listed; we additionally require _CHECKPOINT_METADATA.
The fingerprint is stored in every step and compared before any array is read: resuming a run with
another model/method/... raises CheckpointMismatchError and leaves the workdir untouched; so does a
changed training schedule (batch, LR, epochs, seed: `schedule_fields`) unless the caller allows it.

A newest checkpoint that cannot be read (truncated or corrupted files) is renamed
`<step>.unreadable-<time>` with a warning naming the step and the reason (kept for inspection, no longer
listed), and the next older one is restored: a damaged save costs the steps since the previous one.

Preemption: SIGTERM, SIGINT (Ctrl-C) and SIGHUP (terminal closed; left ignored under nohup) make
the next `should_save(step)` True; the loop then saves and exits. Single-process jobs: our handlers
only set a flag. Multi-host jobs must agree on the step (a signal may reach one process, or each at
another step): jax.distributed's preemption service does that (orbax's preemption sync point,
checked every step at no cost until a notice arrives); it listens to SIGTERM only, so our SIGINT and
SIGHUP handlers raise SIGTERM in their own process. A second Ctrl-C stops at once
(KeyboardInterrupt).

A save that fails (disk full, lost permission) raises CheckpointWriteError with one line naming the
step whose save failed (an async save fails at the next save or wait), the directory, the reason and
the newest complete checkpoint; the failed step's partial directory is removed, complete ones stay.
"""
import atexit
import contextlib
import json
import logging
import os
import signal
import threading
import time

from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from advprop_jax import best_checkpoint
from advprop_jax import cli

_STATE, _EXTRA, _FINGERPRINT = 'state', 'extra', 'fingerprint'
_ITEMS = (_STATE, _EXTRA, _FINGERPRINT)
_STEP_METADATA_FILE = '_CHECKPOINT_METADATA'
_TMP_MARKER = '.orbax-checkpoint-tmp'


class CheckpointMismatchError(ValueError):
  """The workdir's checkpoint was written by a run with a different configuration."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written (the message names the step, the directory and the reason)."""


class _QuietOrbax:
  """Silences orbax's own error logs (and their tracebacks) while a failure is handled here instead."""

  def __enter__(self):
    self._loggers = [logging.getLogger(n) for n in ('absl', 'orbax')]
    self._levels = [lg.level for lg in self._loggers]
    for lg in self._loggers:
      lg.setLevel(logging.CRITICAL)

  def __exit__(self, *exc):
    for lg, level in zip(self._loggers, self._levels):
      lg.setLevel(level)


def _jsonable(d: dict) -> dict:
  return json.loads(json.dumps(dict(d), sort_keys=True, default=str))


def _complete_steps(manager: ocp.CheckpointManager) -> list:
  """Steps orbax lists as finalized that also have their step metadata file, newest first."""
  manager.reload()
  steps = []
  for step in sorted(manager.all_steps(), reverse=True):
    path = manager.directory / str(step)  # default step naming: no prefix, no padding
    if (path / _STEP_METADATA_FILE).exists() and all((path / item).exists() for item in _ITEMS):
      steps.append(step)
    else:
      logging.warning('Ignoring incomplete checkpoint %s', path)
  return steps


def _manager(directory: str, *, keep: int = 1, async_save: bool = False, read_only: bool = False,
             keep_best_by=None) -> ocp.CheckpointManager:
  # Read-only (inference) managers read 'state' with the PyTree handler (restore as numpy, no target).
  state_handler = ocp.PyTreeCheckpointHandler() if read_only else ocp.StandardCheckpointHandler()
  preservation, best_fn, best_mode = best_checkpoint.policy(keep, keep_best_by)
  options = ocp.CheckpointManagerOptions(
      preservation_policy=preservation, best_fn=best_fn, best_mode=best_mode,
      enable_async_checkpointing=async_save,
      create=not read_only,
      read_only=read_only,
      cleanup_tmp_directories=False,  # done at the first save, so a refused resume modifies nothing
  )
  handlers = {_STATE: state_handler, _EXTRA: ocp.JsonCheckpointHandler(),
              _FINGERPRINT: ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, item_handlers=handlers, options=options)


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints; a local WORKDIR made absolute, a gs:// one kept as it is."""
  return os.path.join(workdir if '://' in str(workdir) else os.path.abspath(workdir), 'checkpoints')


class Checkpointer:
  """Saves/restores the TrainState under `<workdir>/checkpoints`. Every process must call every method."""

  def __init__(self, workdir: str, *, every_steps: int, keep: int, config_fingerprint: dict,
               async_save: bool = True, schedule_fields=(), allow_schedule_change: bool = False,
               keep_best_by=None):
    if every_steps <= 0 or keep <= 0:
      raise ValueError(f'every_steps ({every_steps}) and keep ({keep}) must be positive')
    self.directory = checkpoint_dir(workdir)
    self.every_steps = every_steps
    self.fingerprint = _jsonable(config_fingerprint)
    self.schedule_fields = tuple(schedule_fields)
    self.allow_schedule_change = allow_schedule_change
    # keep_best_by: the best step by this metric is kept too (best_checkpoint.py).
    self._manager = _manager(self.directory, keep=keep, async_save=async_save,
                             keep_best_by=keep_best_by)
    self._sigterm = False
    self._stop_signal = None  # name of the signal that asked this process to stop
    self._orbax_preempted = False
    self._cleaned_tmp, self._failed = False, False
    self._in_flight = None  # the step of the save started last (async: maybe still being written)
    self._closed = False
    self._previous_handlers = {}
    if threading.current_thread() is threading.main_thread():
      for sig in _stop_signals():
        if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
          continue  # started under nohup: a closed terminal must not stop the run
        self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
    # A save still in flight at a normal exit must complete. atexit is too late: by then
    # concurrent.futures refuses new work and orbax's async save fails (leaving only a tmp dir), so hook
    # into the interpreter's pre-thread-join shutdown, where concurrent.futures itself hooks (LIFO).
    register = getattr(threading, '_register_atexit', atexit.register)
    register(self._close_at_exit)

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    self._stop_signal = signal.Signals(signum).name
    if jax.process_count() > 1:
      os.kill(os.getpid(), signal.SIGTERM)  # to jax's preemption service: it agrees on the step
    else:
      self._sigterm = True  # only a flag: the training loop saves at the next step and exits
    if signum == signal.SIGINT:
      logging.warning('Interrupted: saving a checkpoint after this step, then exiting (Ctrl-C again '
                      'to stop at once, losing the steps since the last checkpoint).')
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def _close_at_exit(self):
    if not self._closed:
      logging.info('Checkpointer not closed before exit: finishing in-flight saves')
      self.close()

  @property
  def preempted(self) -> bool:
    return self._sigterm or self._orbax_preempted

  @property
  def stop_reason(self) -> str:
    """What asked for the stop, for the log line: 'SIGHUP', ..., or 'a preemption notice'."""
    return self._stop_signal or 'a preemption notice'

  def should_save(self, step: int) -> bool:
    """True every `every_steps` steps and once preemption was requested. Call it every step."""
    if self._manager.reached_preemption(step):
      self._orbax_preempted = True
    return step % self.every_steps == 0 or self.preempted

  def save(self, step: int, state, extra: dict, *, force: bool = False, metrics=None) -> bool:
    """Starts an (async) save of `state` + `extra` at `step`; False when skipped (not due, or
    exists). metrics: {keep_best_by: value} of this state, which ranks it for the best
    checkpoint."""
    step = int(step)
    if not (force or self.should_save(step)):
      return False
    self.wait()  # orbax would wait here too; a failure of the save in flight names that one's step
    if step in self._manager.all_steps():
      if step in _complete_steps(self._manager):
        return False  # e.g. the preemption save falls on a step already saved
      self._manager.delete(step)  # an incomplete directory in the way of this save
    if not self._cleaned_tmp:
      self._cleanup_stale_tmp()
    self._in_flight = step
    with self._write_errors():
      return self._manager.save(step, args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardSave(state),
          _EXTRA: ocp.args.JsonSave(_jsonable(extra)),
          _FINGERPRINT: ocp.args.JsonSave(self.fingerprint),
      }), force=True, **({} if metrics is None else {'metrics': metrics}))

  @contextlib.contextmanager
  def _write_errors(self):
    """Turns a failing save of step self._in_flight (raised here or, for async saves, when it is
    next waited on) into one error naming that step; its partial directory is removed."""
    try:
      yield
    except (KeyboardInterrupt, CheckpointWriteError):
      raise
    except Exception as e:  # pylint: disable=broad-except  (any failure of the write: one message)
      step, self._in_flight, self._failed = self._in_flight, None, True
      self._remove_partial()
      reason = cli.write_failure_reason(e) or f'{type(e).__name__}: {_first_line(e)}'
      raise CheckpointWriteError(f'cannot write checkpoint step {step} ({self.directory}): '
                                 f'{reason}; {self.rerun_hint(reason)}') from None

  def newest_complete(self) -> str:
    """'step N' of the newest complete checkpoint, or 'none'."""
    done = _complete_steps(self._manager)
    return f'step {done[0]}' if done else 'none'

  def rerun_hint(self, reason: str) -> str:
    """What a rerun after a failed write starts from, and what to do first."""
    done, advice = self.newest_complete(), cli.write_advice(reason)
    if done == 'none':
      return f'no checkpoint is complete yet; {advice} and rerun the same command to start again'
    return (f'the newest complete checkpoint is {done}; {advice} and rerun the same command to '
            'resume from it')

  def _cleanup_stale_tmp(self):
    """Removes tmp dirs of saves killed mid-write by an earlier run (nothing of ours is in flight)."""
    self._cleaned_tmp = True
    self._remove_partial(stale=True)

  def _remove_partial(self, stale: bool = False):
    """Removes the tmp dirs of unfinished saves (stale: an earlier run's; else ours that failed)."""
    directory = epath.Path(self.directory)  # epath: a gs:// workdir too
    if jax.process_index() == 0 and directory.is_dir():
      for child in directory.iterdir():
        if _TMP_MARKER in child.name:
          if stale:
            logging.info('Removing stale partial checkpoint %s', child.name)
          # A failed save's directory may still get files from orbax's other writer threads (the
          # first failure ends the save, not its writes): rmtree then fails (not empty) and is
          # retried for a few seconds; close() tries again once orbax has stopped; a directory
          # left anyway is ignored by orbax and removed at the next start.
          deadline = time.monotonic() + (0 if stale else 5)
          while True:
            with contextlib.suppress(OSError):
              child.rmtree()
            if not child.exists() or time.monotonic() > deadline:
              break
            time.sleep(0.1)

  def restore_latest(self, abstract_state, mesh):
    """(state, extra) from the newest checkpoint that restores, replicated on `mesh`; (None, {}) if none.

    Raises CheckpointMismatchError (nothing modified) when the newest checkpoint was written by a run with
    another configuration. Unreadable checkpoints are set aside with a warning (see the module doc).
    """
    self.wait()
    sharding = NamedSharding(mesh, P())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          abstract_state)
    for step in _complete_steps(self._manager):
      where = os.path.join(self.directory, str(step))
      try:
        with _QuietOrbax():
          saved = self._manager.restore(step, args=ocp.args.Composite(
              **{_FINGERPRINT: ocp.args.JsonRestore()}))[_FINGERPRINT]
      except Exception as e:  # pylint: disable=broad-except  (any unreadable file: set it aside)
        self._set_aside(step, e)
        continue
      _check_fingerprint(saved, self.fingerprint, where, self.schedule_fields,
                         self.allow_schedule_change)
      try:
        with _QuietOrbax():
          restored = self._manager.restore(step, args=ocp.args.Composite(**{
              _STATE: ocp.args.StandardRestore(target),
              _EXTRA: ocp.args.JsonRestore(),
          }))
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
        continue
      logging.info('Restored checkpoint step %d from %s', step, self.directory)
      return restored[_STATE], dict(restored[_EXTRA] or {})
    return None, {}

  def _set_aside(self, step: int, error: Exception) -> None:
    """Renames an unreadable step directory so that it is kept but no longer listed (every process
    calls this: process 0 renames, the others wait for it)."""
    path = os.path.join(self.directory, str(step))
    aside = f'{path}.unreadable-{time.strftime("%Y%m%d-%H%M%S")}'
    logging.warning('Checkpoint step %d in %s cannot be restored (%s); it is kept as %s and the '
                    'previous checkpoint is tried.', step, self.directory,
                    cli.read_failure(error, path), os.path.basename(aside))
    if jax.process_index() == 0:
      epath.Path(path).rename(aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'advprop_jax set aside checkpoint {step}')
    self._manager.reload()

  def wait(self):
    """Blocks until in-flight async saves are committed (CheckpointWriteError if one failed)."""
    with self._write_errors():
      self._manager.wait_until_finished()

  def close(self):
    """Finishes in-flight saves, closes the manager and restores the previous SIGTERM handler."""
    if self._closed:
      return
    self._closed = True
    try:
      with self._write_errors():
        self._manager.close()
    finally:
      if self._failed:  # orbax's threads are done now: what they wrote after the failure goes too
        self._remove_partial()
      for sig, handler in self._previous_handlers.items():
        signal.signal(sig, handler)
      self._previous_handlers = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _stop_signals():
  """The signals this process handles. Multi-host: not SIGTERM, which jax's preemption service owns
  (replacing its handler would make the processes disagree on when to save), and none at all when
  that service is turned off (raising SIGTERM would then kill the process)."""
  if jax.process_count() == 1:
    return (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
  return (signal.SIGINT, signal.SIGHUP) if jax.config.jax_enable_preemption_service else ()


def _without_unset_overrides(fingerprint: dict) -> dict:
  """Unset (None) model overrides mean the model's default: runs that wrote them (older versions wrote
  the config's unset placeholders) and runs that leave them out describe the same model."""
  fingerprint = dict(fingerprint or {})
  if isinstance(fingerprint.get('model_overrides'), dict):
    fingerprint['model_overrides'] = {k: v for k, v in fingerprint['model_overrides'].items()
                                      if v is not None}
  return fingerprint


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def _check_fingerprint(saved: dict, current: dict, where: str, schedule_fields=(),
                       allow_schedule_change: bool = False):
  """CheckpointMismatchError naming the fields where the saved run and this one differ.

  Schedule fields are compared only when the checkpoint recorded them (older runs did not) and the
  caller does not allow the schedule to change.
  """
  saved, current = _without_unset_overrides(saved), _without_unset_overrides(current)
  absent = '<absent>'
  differs = lambda k: saved.get(k, absent) != current.get(k, absent)
  keys = sorted(k for k in set(saved) | set(current) if k not in schedule_fields and differs(k))
  describe = lambda ks: '; '.join(f'{k}: saved {saved.get(k, absent)!r} vs current '
                                  f'{current.get(k, absent)!r}' for k in ks)
  if keys:
    raise CheckpointMismatchError(
        f'The checkpoint {where} was written by a run with a different configuration ({describe(keys)}). '
        f'Resuming it with this configuration would be wrong; nothing was modified. Use a new --workdir '
        f'for this configuration, or rerun with the original settings to resume that run.')
  schedule = sorted(k for k in schedule_fields if k in saved and differs(k))
  if schedule and not allow_schedule_change:
    raise CheckpointMismatchError(
        f'The checkpoint {where} was written by a run with another training schedule '
        f'({describe(schedule)}); resuming would continue that run under a different schedule. Nothing was '
        'modified. Use a new --workdir, rerun with the original settings, or pass '
        '--allow_schedule_change to continue this run with the new schedule.')


def load_inference_variables(workdir: str, *, ema: bool = True, with_step: bool = False, step=None):
  """Newest checkpoint's (or `step`'s: a number or 'best') (EMA) weights as host numpy flax
  variables, plus its config fingerprint.

  Returns ({'params': ..., 'batch_stats': ..., 'batch_stats_adv': ...}, fingerprint), and the step
  with `with_step`. Needs no mesh and no abstract state: the arrays are restored as np.ndarray
  whatever sharding they were saved with.
  """
  directory = checkpoint_dir(workdir)
  if not epath.Path(directory).is_dir():  # (gs:// too: a watcher on another machine reads it)
    raise FileNotFoundError(f'No checkpoint directory {directory}: was {workdir} used as --workdir '
                            'for training?')
  manager = _manager(directory, read_only=True)
  try:
    steps = _complete_steps(manager)
    if steps and step == best_checkpoint.BEST:
      step = best_checkpoint.best_step(manager, steps)
    if not steps or (step is not None and step not in steps):
      which = '' if step is None else f' step {step}'
      raise FileNotFoundError(f'No complete checkpoint{which} in {directory}')
    step = steps[0] if step is None else step
    metadata = manager.item_metadata(step)[_STATE]
    metadata = getattr(metadata, 'tree', metadata)
    keys = ('ema_params', 'ema_model_state') if ema else ('params', 'model_state')
    item = {k: metadata[k] for k in keys}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = manager.restore(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        _FINGERPRINT: ocp.args.JsonRestore(),
    }))
  finally:
    manager.close()
  state = restored[_STATE]
  variables = {'params': state[keys[0]], **state[keys[1]]}
  variables, fingerprint = jax.tree.map(np.asarray, variables), dict(restored[_FINGERPRINT] or {})
  return (variables, fingerprint, step) if with_step else (variables, fingerprint)
