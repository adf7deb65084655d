"""The training workdir: what the loop writes there (config.json, classes.json, final_metrics.json;
checkpoints/ is checkpoints.py's), the checks before anything is written, and the lock that keeps
two runs out of it.

The lock is an flock on WORKDIR/.lock held by process 0 for the life of the run: the kernel releases it
when the process ends however it ends (SIGKILL included), so a killed run never leaves it stuck. Workdirs
on object stores (gs://...) have no flock; there the lock is skipped (TPU pods run one job per workdir
through launch_tpu.sh, which stops stale trainers first).
"""
import fcntl
import json
import os
import socket
import time

import jax
from etils import epath

from advprop_jax import cli

CONFIG_FILE = 'config.json'
FINAL_METRICS_FILE = 'final_metrics.json'
CLASSES_FILE = 'classes.json'  # the class names, label order: a JSON list of strings
LOCK_FILE = '.lock'


class WorkdirError(Exception):
  """The workdir cannot be used: not a directory, not writable, or held by another run."""


def is_local(workdir: str) -> bool:
  return '://' not in str(workdir)


def check_writable(workdir: str) -> None:
  """WorkdirError unless `workdir` is (or can be created as) a writable directory. Writes nothing."""
  if not is_local(workdir):
    return
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f'--workdir={workdir} is a file, not a directory')
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise WorkdirError(f'--workdir={workdir}: {existing} is not writable (read-only file system or '
                       'no permission); choose a writable directory')


class Lock:
  """Exclusive use of a workdir by one run (process 0 holds it; other processes hold nothing)."""

  def __init__(self, workdir: str):
    self.workdir, self._file = workdir, None

  def acquire(self) -> 'Lock':
    if jax.process_index() != 0 or not is_local(self.workdir):
      return self
    path = os.path.join(self.workdir, LOCK_FILE)
    made, existed = _missing_dirs(self.workdir), os.path.exists(path)  # removed if the lock fails
    try:
      with cli.writing('the workdir lock', path):
        os.makedirs(self.workdir, exist_ok=True)
        handle = open(path, 'a+')  # pylint: disable=consider-using-with  (held until release)
    except cli.WriteError:
      _remove(made)
      raise
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or 'another process'
      handle.close()
      raise WorkdirError(f'--workdir={self.workdir} is in use by another run ({holder}); wait for it '
                         'to finish, stop it, or use another --workdir') from None
    try:
      with cli.writing('the workdir lock', path):
        handle.seek(0)
        handle.truncate()
        handle.write(f'pid {os.getpid()} on {socket.gethostname()} since '
                     f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n')
        handle.flush()
    except cli.WriteError:  # e.g. a full disk: no empty .lock (nor workdir) is left behind
      _remove(([] if existed else [path]) + made)
      try:
        handle.close()  # flushes the unwritten line again, and fails again
      except OSError:
        pass
      raise
    self._file = handle
    return self

  def release(self) -> None:
    if self._file is not None:
      self._file.close()  # closing releases the flock
      self._file = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _missing_dirs(path: str) -> list:
  """`path` and its ancestors that do not exist yet, deepest first."""
  missing, path = [], os.path.abspath(path)
  while not os.path.exists(path):
    missing, path = missing + [path], os.path.dirname(path)
  return missing


def _remove(paths) -> None:
  """Removes what a failed write made, in order (the file, then the directories, deepest first)."""
  for path in paths:
    try:
      (os.rmdir if os.path.isdir(path) else os.remove)(path)
    except OSError:
      pass


def _write_atomic(path: epath.Path, text: str) -> None:
  tmp = path.parent / (path.name + '.tmp')
  with cli.writing(f"the run's {path.name}", str(path)):
    try:
      tmp.write_text(text)
      tmp.replace(path)  # a reader sees the old file or the new one, never half of one
    except BaseException:
      if tmp.exists():
        tmp.unlink()  # nothing half written is left
      raise


def write_run_config(config, workdir: str) -> None:
  """WORKDIR/config.json: the full config, for export / evaluate / predict (process 0 only)."""
  if jax.process_index() == 0:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    _write_atomic(path / CONFIG_FILE, config.to_json_best_effort(indent=2, sort_keys=True))


def write_class_names(names, workdir: str) -> None:
  """WORKDIR/classes.json when the dataset names its classes (image folders; process 0 only), for
  export and predict."""
  if names is not None and jax.process_index() == 0:
    _write_atomic(epath.Path(workdir) / CLASSES_FILE, json.dumps(list(names), indent=1))


def read_class_names(workdir: str):
  """The run's class names (label order), or None when it recorded none."""
  path = epath.Path(workdir) / CLASSES_FILE
  return json.loads(path.read_text()) if path.exists() else None


def write_final_metrics(final: dict, workdir: str) -> None:
  if jax.process_index() == 0:
    _write_atomic(epath.Path(workdir) / FINAL_METRICS_FILE, json.dumps(final, indent=2, sort_keys=True))


def read_final_metrics(workdir: str):
  """The finished run's final metrics, or None."""
  path = epath.Path(workdir) / FINAL_METRICS_FILE
  return json.loads(path.read_text()) if path.exists() else None
