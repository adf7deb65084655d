"""The sidecar evaluator (`evaluate --watch`): evaluates every checkpoint that lands in a training
workdir, once each, in step order, beside the run (on another host, a small TPU VM or a GPU box
reading the same gs:// workdir), so that the expensive evaluators leave the pod.

What it writes (process 0 only; the rest of the workdir format is workdir.py's)::

  W/eval_watch/records.jsonl    one JSON object per evaluated step: step, weights, scalars, results
  W/eval_watch/events.out.*     the same scalars for TensorBoard (x axis: the checkpoint's step)
  W/eval_watch/raw/...          the same for the raw weights (--ema=false: a second watcher)

Exactly once: a step's record is appended (flushed and fsynced) after its evaluation and its
TensorBoard scalars, and a (re)started watcher continues after the last recorded step. A watcher
killed mid-step evaluates that step again: recorded once, its scalars maybe twice in TensorBoard (at
the same step). Checkpoints are taken in step order, the oldest not yet recorded first; one that
keep-N deletes before the watcher gets there is skipped (one log line). The run's final checkpoint
is the step of its final_metrics.json (written once that checkpoint is complete): when it is
recorded the watcher exits 0. --timeout_seconds without a new checkpoint (a run that stopped): exit
status 1.
"""
import json
import logging
import os
import sys
import time

from clu import metric_writers
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from advprop_jax import checkpoints
from advprop_jax import cli
from advprop_jax import factories
from advprop_jax import parallel
from advprop_jax import workdir as workdir_lib
from advprop_jax.eval import evaluators
from advprop_jax.eval import saved_run

WATCH_DIR = 'eval_watch'
RECORDS_FILE = 'records.jsonl'
RAW_SUBDIR = 'raw'
# Result fields that are not metrics (sizes, settings): kept in the records, not in TensorBoard.
_NOT_SCALARS = ('count', 'num_steps', 'num_subset_classes')
# What process 0 decided, sent to the others (they must evaluate the same step or stop together).
_WAIT, _DONE, _TIMEOUT = -1, -2, -3


def output_dir(workdir: str, ema: bool = True) -> str:
  """W/eval_watch (EMA weights) or W/eval_watch/raw: one watcher each, they may run side by side."""
  base = os.path.join(str(workdir), WATCH_DIR)
  return base if ema else os.path.join(base, RAW_SUBDIR)


def read_records(out: str) -> list:
  """The records of `out`, in file order. A last line without its newline (a write cut short) is
  dropped from the file too, so that the next record starts on a line of its own."""
  path = epath.Path(out) / RECORDS_FILE
  if not path.exists():
    return []
  text = path.read_text()
  whole = text[:text.rfind('\n') + 1]
  if whole != text:
    logging.warning('Dropping the incomplete last line of %s (a write cut short)', path)
    if jax.process_index() == 0:
      with cli.writing('the watch records', str(path)):
        path.write_text(whole)
  return [json.loads(line) for line in whole.splitlines() if line.strip()]


def append_record(out: str, record: dict) -> None:
  """One line appended to out/records.jsonl, on disk when this returns; nothing half written."""
  if jax.process_index() != 0:
    return
  line = json.dumps(record, sort_keys=True, default=_plain) + '\n'
  path = os.path.join(out, RECORDS_FILE)
  with cli.writing('the watch records', path):
    if not workdir_lib.is_local(out):  # object stores cannot append: one whole (atomic) write
      target = epath.Path(path)
      target.write_text((target.read_text() if target.exists() else '') + line)
      return
    with open(path, 'a', encoding='utf-8') as f:
      size = f.tell()
      try:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())  # a record is the watcher's promise not to evaluate that step again
      except BaseException:
        f.truncate(size)
        raise


def _plain(value):
  """numpy scalars as numbers in the records, anything else JSON lacks as its text."""
  return value.item() if isinstance(value, np.generic) else str(value)


def scalars(results: dict) -> dict:
  """The evaluators' numbers as flat TensorBoard names: clean/top1, pgd/by_epsilon_pixels/4/top1,
  corruptions/mce, ... (skipped evaluators have none)."""
  flat = {}

  def walk(prefix, node):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(f'{prefix}{key}/', value)
      elif (isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
            and key not in _NOT_SCALARS):
        flat[f'{prefix}{key}'] = float(value)
  for name, result in results.items():
    if result.get('status') == 'ok':
      walk(f'{name}/', result)
  return flat


def final_step(workdir: str):
  """The step of the run's final checkpoint once the run has finished (final_metrics.json)."""
  try:
    final = workdir_lib.read_final_metrics(workdir)
  except (ValueError, OSError):  # being replaced right now: the next poll reads it
    return None
  return None if final is None or 'step' not in final else int(final['step'])


class CheckpointSteps:
  """The workdir's complete checkpoint steps, oldest first, by the rule a resume uses (finalized by
  orbax, with its step metadata and every item). [] until the run has made the directory."""

  def __init__(self, workdir: str):
    root = str(workdir) if not workdir_lib.is_local(workdir) else os.path.abspath(workdir)
    self.directory, self._manager = os.path.join(root, 'checkpoints'), None

  def list(self) -> list:
    if self._manager is None:
      if not epath.Path(self.directory).is_dir():
        return []
      # pylint: disable-next=protected-access  (checkpoints.py's own reader and completeness rule)
      self._manager = checkpoints._manager(self.directory, read_only=True)
    return sorted(checkpoints._complete_steps(self._manager))  # pylint: disable=protected-access

  def close(self):
    if self._manager is not None:
      self._manager.close()


def _agree(value: int) -> int:
  """Process 0's `value` on every process."""
  if jax.process_count() == 1:
    return value
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def _all(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.bool_(ok))))


class Watcher:
  """The watch loop around `evaluate(variables, step) -> {evaluator: result}` (tests: a fake)."""

  def __init__(self, workdir: str, evaluate, *, ema: bool = True, poll_seconds: float = 30.0,
               timeout_seconds=None, writer=None, sleep=time.sleep, clock=time.monotonic):
    self.workdir, self.evaluate, self.ema = str(workdir), evaluate, ema
    self.poll_seconds, self.timeout_seconds = poll_seconds, timeout_seconds
    self.out = output_dir(workdir, ema)
    self.writer, self.sleep, self.clock = writer, sleep, clock
    self.steps = CheckpointSteps(workdir)
    self.records = read_records(self.out)
    self.last = max((r['step'] for r in self.records), default=-1)

  def _decide(self, idle_since: float) -> int:
    """The next step to evaluate, or _WAIT / _DONE / _TIMEOUT (every process looks, as orbax's
    managers expect; process 0's answer is the one taken)."""
    final = final_step(self.workdir)  # read before listing: its checkpoint is complete by then
    if final is not None and self.last >= final:
      return _DONE
    pending = [s for s in self.steps.list() if s > self.last]
    if pending:
      return pending[0]
    if self.timeout_seconds is not None and self.clock() - idle_since >= self.timeout_seconds:
      return _TIMEOUT
    return _WAIT

  def run(self) -> int:
    """Watches until the final checkpoint is recorded (returns 0); cli.Failure (1) on timeout."""
    if self.records:
      logging.info('Watching %s: %d step(s) recorded in %s, continuing after step %d', self.workdir,
                   len(self.records), self.out, self.last)
    else:
      logging.info('Watching %s for checkpoints (every %g s); records go to %s', self.workdir,
                   self.poll_seconds, self.out)
    idle_since = self.clock()
    previous_hook, sys.unraisablehook = sys.unraisablehook, _drop_aborted_reads(sys.unraisablehook)
    try:
      while True:
        action = _agree(self._decide(idle_since))
        if action == _DONE:
          logging.info('The run finished at step %d and it is evaluated: done (%d step(s) in %s)',
                       self.last, len(self.records), os.path.join(self.out, RECORDS_FILE))
          return 0
        if action == _TIMEOUT:
          done = (f'evaluated up to step {self.last} ({os.path.join(self.out, RECORDS_FILE)})'
                  if self.last >= 0 else 'nothing evaluated')
          raise cli.Failure(
              f'no new checkpoint in {self.workdir} for {self.timeout_seconds:g} s and the run '
              f'has not finished (no {workdir_lib.FINAL_METRICS_FILE}); {done}; rerun --watch '
              'to continue', code=1)
        if action == _WAIT:
          self.sleep(self.poll_seconds)
          continue
        self._evaluate(action)
        idle_since = self.clock()  # a checkpoint appeared (even if keep-N took it): the run lives
    finally:
      sys.unraisablehook = previous_hook
      self.steps.close()

  def _load(self, step: int):
    """The weights of `step` on every process; None when it vanished (keep-N) or is unreadable."""
    variables, error = None, None
    try:
      variables, _ = checkpoints.load_inference_variables(self.workdir, ema=self.ema, step=step)
    except Exception as e:  # pylint: disable=broad-except  (deleted mid-read, or unreadable: below)
      error = e
    if _all(error is None):
      return variables
    if _agree(int(step not in self.steps.list())):
      logging.info('Checkpoint step %d was deleted (keep_checkpoints) before it was evaluated; '
                   'skipped', step)  # (or set aside as unreadable by a resuming run)
    else:
      reason = (cli.read_failure(error, self.steps.directory) if error is not None
                else 'on another process')
      logging.warning('Checkpoint step %d cannot be read (%s); skipped', step, reason)
    self.last = max(self.last, step)  # in memory only: a restart tries it again
    return None

  def _evaluate(self, step: int) -> None:
    """Evaluates and records `step` (unless it vanished: skipped)."""
    variables = self._load(step)
    if variables is None:
      return
    start = time.time()
    results = self.evaluate(variables, step)
    if all(r.get('status') != 'ok' for r in results.values()):
      reasons = '; '.join(f'{n}: {r.get("reason", r.get("status"))}' for n, r in results.items())
      raise cli.Failure(f'every evaluator was skipped at step {step} ({reasons}); nothing was '
                        'evaluated', code=1)
    record = dict(step=step, weights='ema' if self.ema else 'raw', scalars=scalars(results),
                  results=results, seconds=round(time.time() - start, 2), time=time.time())
    if self.writer is not None:  # before the record: a kill in between repeats a scalar, loses none
      with cli.writing('the TensorBoard summaries', self.out):
        self.writer.write_scalars(step, record['scalars'])
        self.writer.flush()
    append_record(self.out, record)
    self.records.append(record)
    self.last = step
    logging.info('step %d evaluated (%.1f s): %s', step, record['seconds'], ', '.join(
        f'{k} {v:.4f}' for k, v in record['scalars'].items() if k.endswith('top1'))[:300])


def _drop_aborted_reads(hook):
  """`hook` without the noise of a read that keep-N cut short. A checkpoint deleted while it is read
  fails orbax's restore at the first missing file and orbax closes the restore's event loop; the
  tensorstore reads still in flight then call back into the closed loop as they end, each printing
  'RuntimeError: Event loop is closed' with a traceback as an unraisable exception. _load says
  what happened in one line; those, and nothing else, are dropped while the watcher runs."""
  def drop_aborted_reads(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
      hook(unraisable)
  return drop_aborted_reads


def _wait_for_config(workdir, config, poll_seconds, timeout_seconds):
  """The run's config (config.json), waiting for a run that has not started writing yet."""
  start, said = time.monotonic(), False
  while True:
    try:
      return saved_run.load_config(workdir, config)
    except FileNotFoundError:
      if timeout_seconds is not None and time.monotonic() - start >= timeout_seconds:
        raise
      if not said:
        logging.info('Waiting for the run to write %s', os.path.join(str(workdir), 'config.json'))
        said = True
      time.sleep(poll_seconds)


def watch_workdir(workdir, config=None, *, names=None, ema=True, stylized_dir=None,
                  poll_seconds=30.0, timeout_seconds=None) -> int:
  """`evaluate --watch`: the model, mesh and compiled eval steps are built once; each checkpoint
  only changes the weights (a few seconds per step after the first compilation)."""
  config = _wait_for_config(workdir, config, poll_seconds, timeout_seconds)
  plan = evaluators.evaluator_plan(config, names)
  out = output_dir(workdir, ema)
  if jax.process_index() == 0:
    with cli.writing('the watch output', out):
      epath.Path(out).mkdir(parents=True, exist_ok=True)
  lock = _lock(out)  # before the model is built: a second watcher stops at once
  try:
    model = factories.build_model(config)
    mesh = parallel.create_mesh(config.bn_group_size)
    ctx = evaluators.Context(config, model, mesh, stylized_dir)

    def evaluate_checkpoint(variables, step):  # the plan's evaluators, compiled once for all steps
      logging.info('Evaluating checkpoint step %d (%s weights)', step, 'EMA' if ema else 'raw')
      weights = jax.device_put(variables, parallel.replicated_sharding(mesh))
      return evaluators.run_evaluators(ctx, weights, plan)
    writer = (metric_writers.SummaryWriter(out) if jax.process_index() == 0
              else metric_writers.MultiWriter([]))
    try:
      return Watcher(workdir, evaluate_checkpoint, ema=ema, poll_seconds=poll_seconds,
                     timeout_seconds=timeout_seconds, writer=writer).run()
    finally:
      writer.close()
  finally:
    lock.release()


def _lock(out: str) -> workdir_lib.Lock:
  """One watcher per output (local disks: an flock the kernel drops however the watcher ends): two
  would evaluate and record the same steps."""
  try:
    return workdir_lib.Lock(out).acquire()
  except workdir_lib.WorkdirError:
    with open(os.path.join(out, workdir_lib.LOCK_FILE), encoding='utf-8') as f:
      holder = f.read().strip()
    raise cli.UserError(f'another watcher ({holder}) is writing {out}; stop it first, or watch '
                        'the other weights (--ema)') from None
