"""What the command lines share (main, evaluate, export, predict, plan, ablation, launch_local).

* Flags are defined when a CLI runs, by its `define_flags(flag_values)`, not at import: library code and
  tests can import every CLI module side by side, and `call()` runs a CLI in-process on a private flag
  namespace (tests).
* A user's mistake (a flag, a config file or field, a path) is ONE line on stderr, `<prog>: error: ...`,
  exit status 2, before anything is written: raise `UserError` (or `fail(...)`). Other stops that are not
  bugs (training diverged) are one line with their own status (`Failure`). A write that fails (disk
  full, quota, read-only file system, no permission) is one line naming what was written where, exit
  status 3 (`WriteError`, from `writing(...)` / `write_error(...)`); nothing half written is left.
  Never a traceback for any of them.
* `run(main, prog, doc, define_flags)` is the `python -m` / console-script entry point: absl's `app.run`
  plus the above, a `--help` that lists the CLI's flags also from a console script, and logs that show
  this package's INFO lines and everyone's warnings, the libraries' INFO only with `--verbose`.
* A config file of the user's may import the shipped ones (`from configs import efficientnet`) from any
  working directory.
"""
import contextlib
import difflib
import errno
import glob
import importlib.util
import logging
import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

from absl import app
from absl import flags

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
HELP_FLAGS = ('--help', '-help', '--helpshort', '-helpshort', '--helpfull', '-helpfull', '-?')


class UserError(ValueError):
  """A user's mistake (flag, config, path, file contents): one line naming it; exit status 2."""


class Failure(Exception):
  """A stop that is not a bug and not the user's input (diverged loss, failed save): one line, `code`."""

  def __init__(self, message: str, code: int = 1):
    super().__init__(message)
    self.code = code


WRITE_FAILED = 3  # exit status of a failed write (README: "Exit status")
# The OS's words for a failed write (also in the text of errors that are not OSErrors: TensorFlow's
# ResourceExhaustedError, TensorStore's ValueError through orbax) -> what the user can do about it.
_ADVICE = {os.strerror(errno.ENOSPC): 'free disk space',
           os.strerror(errno.EDQUOT): 'free disk space',
           os.strerror(errno.EROFS): 'choose a writable path',
           os.strerror(errno.EACCES): 'choose a writable path',
           os.strerror(errno.EPERM): 'choose a writable path',
           os.strerror(errno.EFBIG): 'raise the file size limit (ulimit -f)'}


# Errors that only a write can cause (unlike permission errors, which a read can meet too).
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
DISK_REASONS = tuple(os.strerror(n) for n in DISK_ERRNOS)


def write_advice(reason: str) -> str:
  return _ADVICE.get(reason, 'fix the cause')


class WriteError(Failure):
  """Writing `what` to `path` failed for `reason` (disk full, no permission...): one line, status 3.
  `then`: what became of the output and what to do (default: nothing was left behind; rerun)."""

  def __init__(self, what: str, path: str, reason: str, then: str = ''):
    self.what, self.path, self.reason = what, path, reason
    then = then or f'nothing was left behind; {write_advice(reason)} and rerun'
    super().__init__(f'cannot write {what} ({path}): {reason}; {then}', WRITE_FAILED)


def write_failure_reason(error: BaseException) -> Optional[str]:
  """The OS's reason (e.g. 'No space left on device') when `error` is a failed write, else None."""
  if isinstance(error, OSError) and error.errno:
    return error.strerror or os.strerror(error.errno)
  text = str(error)
  return next((reason for reason in _ADVICE if reason in text), None)


def write_error(error: BaseException, what: str, path: str, then: str = '') -> BaseException:
  """A WriteError for `error` if it is a failed write (see write_failure_reason), else `error`."""
  reason = write_failure_reason(error)
  return error if reason is None else WriteError(what, path, reason, then)


def check_writable(flag: str, path: str) -> None:
  """UserError unless `path` is (or can be made as) a writable directory: before the work, not
  after it."""
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f'{flag}={path}: {existing} is not a writable directory')


@contextlib.contextmanager
def writing(what: str, path: str, then: str = ''):
  """Inside the block a failed write (OSError, or a library's error that says so) is one WriteError;
  the caller removes what it half wrote."""
  try:
    yield
  except WriteError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless it is a failed write)
    error = write_error(e, what, path, then)
    if error is e:
      raise
    raise error from None


# TensorStore's status codes (through orbax) in words; its messages add layers of context, its spec.
_READ_FAILURES = {'OUT_OF_RANGE': 'a file is shorter than recorded (truncated)',
                  'DATA_LOSS': 'a file is corrupted', 'NOT_FOUND': 'a file is missing',
                  'PERMISSION_DENIED': 'a file cannot be read (permission denied)'}


def read_failure(error: BaseException, base: str) -> str:
  """Why stored arrays cannot be read, short: TensorStore's status in words and the file (relative
  to `base`) when it names one; other errors' first line."""
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  code = re.match(r'([A-Z_]+): ', text)
  if code is None:
    return text if len(text) <= 160 else text[:157] + '...'
  files = re.findall(r'local file "([^"]+)"', text)
  where = f': {os.path.relpath(files[-1], base)}' if files else ''
  return _READ_FAILURES.get(code[1], code[1].lower().replace('_', ' ')) + where


class BackgroundErrors(logging.Filter):
  """While entered, drops the ERROR logs (each with a traceback, one per thread) of background
  writers whose failure is raised again in the main thread, where it becomes one line: orbax's async
  checkpoint saves, clu's async summary writer. Their first lines are kept in `dropped`; if nothing
  raised them again, the first is logged as one warning at the end."""
  SOURCES = (f'{os.sep}orbax{os.sep}', f'{os.sep}clu{os.sep}')

  def __init__(self):
    super().__init__()
    self.dropped = []

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and any(s in record.pathname for s in self.SOURCES):
      self.dropped.append((record.getMessage().strip().splitlines() or [''])[0])
      return False
    return True

  def __enter__(self):
    logging.getLogger('absl').addFilter(self)  # orbax and clu log through absl's logger
    return self

  def __exit__(self, exc_type, *exc):
    logging.getLogger('absl').removeFilter(self)
    if exc_type is None and self.dropped:
      logging.warning('A background writer reported an error: %s', self.dropped[0])


def fail(message: Any, code: int = 2):
  """Stops the CLI with `message` as one line and exit status `code` (2: the user's mistake)."""
  raise UserError(str(message)) if code == 2 else Failure(str(message), code)


def one_line(message: Any, max_items: int = 3) -> str:
  """A multi-line message (e.g. convert's list of mismatched tensors) as one line with its first items."""
  lines = [line.strip() for line in str(message).splitlines() if line.strip()]
  if len(lines) <= 1:
    return lines[0] if lines else ''
  more = ' ...' if len(lines) > 1 + max_items else ''
  return f'{lines[0]} {"; ".join(lines[1:1 + max_items])}{more}'


def error(prog: str, message: Any) -> None:
  print(f'{prog}: error: {one_line(message)}', file=sys.stderr)


@contextlib.contextmanager
def user_errors(prog: str, status: list):
  """Inside the block a UserError becomes one stderr line and status[0] = 2."""
  try:
    yield
  except UserError as e:
    error(prog, e)
    status[0] = 2


def _guarded(main: Callable, prog: str) -> Callable:
  """main(argv, flag_values) -> status, with UserError / Failure turned into one line and their status."""
  def wrapped(argv, flag_values=flags.FLAGS):
    try:
      return main(argv, flag_values) or 0
    except UserError as e:
      error(prog, e)
      return 2
    except Failure as e:
      error(prog, e)
      return e.code
    except OSError as e:  # a full disk no write site caught, e.g. stdout redirected to a full disk
      if e.errno not in DISK_ERRNOS:
        raise
      what, path = ('the output', 'stdout') if e.filename is None else ('a file', e.filename)
      reason = e.strerror or os.strerror(e.errno)
      error(prog, WriteError(what, path, reason,
                             f'it is incomplete; {write_advice(reason)} and rerun'))
      _drop_unwritten_stdout()
      return WRITE_FAILED
  return wrapped


def _drop_unwritten_stdout() -> None:
  """Python's exit would flush the output that did not fit again, and print a second error."""
  try:
    sys.stdout.flush()
  except OSError:
    pass
  with contextlib.suppress(OSError, ValueError):
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _define(define: Optional[Callable], flag_values: flags.FlagValues) -> None:
  if define is not None:
    define(flag_values)
  if 'verbose' not in flag_values:
    flags.DEFINE_bool('verbose', False, 'Also show the INFO logs of the libraries (orbax, TFDS, JAX, ...).',
                      flag_values=flag_values)


def _parse(prog: str, flag_values: flags.FlagValues, argv: Sequence[str]):
  """flag_values(argv), with any failure (bad flag, config file, config field) as one line."""
  try:
    rest = flag_values(list(argv))
    for name in flag_values:  # config_flags defers a config file's load error until it is first read
      value = flag_values[name].value
      if type(value).__name__ == '_ErrorConfig':
        value.keys()  # raises that error
    return rest
  except Exception as e:  # pylint: disable=broad-except  (every parse failure is the user's input)
    raise UserError(describe_flag_error(e, argv)) from None


def call(define: Callable[[flags.FlagValues], None], main: Callable, prog: str, argv: Sequence[str]) -> int:
  """main(args, flag_values) on flags parsed from `argv` (no program name); returns the exit status."""
  flag_values = flags.FlagValues()
  saved, sys.argv = sys.argv, [prog, *argv]  # config_flags reads --config.* overrides from sys.argv
  try:
    _define(define, flag_values)
    rest = _parse(prog, flag_values, sys.argv)
  except UserError as e:
    error(prog, e)
    return 2
  finally:
    sys.argv = saved
  return _guarded(main, prog)(rest, flag_values)


def run(main: Callable, prog: str, doc: str, define: Optional[Callable[[flags.FlagValues], None]] = None):
  """The entry point: app.run(main) with this module's conventions (see the module doc)."""
  _make_configs_importable()
  _no_tpu_backend_without_a_tpu()
  before = set(flags.FLAGS)
  _define(define, flags.FLAGS)
  for name in set(flags.FLAGS) - before:  # --help of a console script lists this CLI's flags
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
  main_module = sys.modules['__main__']
  if not getattr(main_module, '__doc__', None):  # pip's console-script wrapper has no docstring
    main_module.__doc__ = doc

  def parse(argv):
    try:
      return _parse(prog, flags.FLAGS, argv)
    except UserError as e:
      error(prog, e)
      sys.exit(2)
    except SystemExit as e:  # absl's --help / --helpfull print the help, then exit with status 1
      if e.code == 1 and any(a.split('=')[0] in HELP_FLAGS for a in argv[1:]):
        sys.exit(0)
      raise

  def main_with_logs(argv):
    if not flags.FLAGS.verbose:
      for handler in logging.getLogger().handlers + logging.getLogger('absl').handlers:
        handler.addFilter(_own_info_only)
      # TF logs through its own logger and handler, from tf_logging.py rather than the caller's file.
      logging.getLogger('tensorflow').addFilter(
          lambda record: 'is deprecated and will be removed' not in record.getMessage())
    sys.exit(_guarded(main, prog)(argv, flags.FLAGS))

  app.run(main_with_logs, flags_parser=parse)


def _no_tpu_backend_without_a_tpu() -> None:
  """With libtpu installed (requirements-tpu.txt, for `plan`) on a machine without a TPU, JAX would try the
  TPU backend first and libtpu print a screen of warnings about missing TPU metadata: use the CPU. Left
  alone where JAX_PLATFORMS is set, a TPU is attached (/dev/accel*, /dev/vfio/N) or a GPU plugin is
  installed (JAX then picks the GPU itself)."""
  if os.environ.get('JAX_PLATFORMS') or importlib.util.find_spec('libtpu') is None:
    return
  if glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*') or os.environ.get('TPU_ACCELERATOR_TYPE'):
    return
  if any(importlib.util.find_spec(p) for p in ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm7_plugin')):
    return
  os.environ['JAX_PLATFORMS'] = 'cpu'
  if 'jax' in sys.modules:  # read from the environment at import; backends start at first use
    sys.modules['jax'].config.update('jax_platforms', 'cpu')


def _own_info_only(record: logging.LogRecord) -> bool:
  """INFO from this package only; warnings and errors from anywhere, except TensorFlow's deprecation notices
  (about its own internals: nothing a user can act on) and orbax's warnings (read-only managers...)."""
  if record.levelno < logging.WARNING:
    return record.pathname.startswith(PACKAGE_DIR)
  if record.levelno < logging.ERROR and '/orbax/' in record.pathname:
    return False
  return not record.pathname.endswith(os.path.join('util', 'deprecation.py'))


def _make_configs_importable():
  """The checkout's root (which holds configs/) goes on the import path, so that a user's config file can
  import the shipped ones from any working directory."""
  root = os.path.dirname(PACKAGE_DIR)
  if os.path.isdir(os.path.join(root, 'configs')) and root not in sys.path:
    sys.path.append(root)


def describe_flag_error(error_: Exception, argv: Sequence[str]) -> str:
  """One line for what went wrong while parsing `argv`: a flag, a config file or a config field."""
  if isinstance(error_, SyntaxError):  # a config file that is not valid Python
    return f'{error_.filename}:{error_.lineno}: syntax error: {error_.msg}'
  text = str(error_)
  if 'Traceback (most recent call last)' in text:  # get_config raised: keep its last line
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return f'{text.splitlines()[0].rstrip(":")} {last.strip()}'
  missing = re.search(r"No such file or directory: '([^']*)'", text)
  if missing and 'config' in text.lower():
    return f'--config={missing.group(1)}: no such config file'
  unknown = re.search(r"Unknown command line flag '(config\.[^']+)'", text)
  overrides = [a.split('=')[0] for a in argv if a.startswith('--config.')]
  named = [o for o in overrides if o.split('.')[-1] in text or (unknown and o[2:] == unknown[1])]
  if named and (unknown or isinstance(error_, (AttributeError, KeyError))):  # a field the config lacks
    override = named[0]
    hint = _closest_field(argv, override[len('--config.'):])
    return (f'{override}: no such config field' + (f'; did you mean "{hint}"?' if hint else '') +
            ' (all fields, with comments: advprop_jax/config.py)')
  return text.splitlines()[0] if text else type(error_).__name__


def _closest_field(argv: Sequence[str], field: str) -> Optional[str]:
  """The config field closest to `field`, from the --config file of `argv` (None if it does not load)."""
  from advprop_jax import config as config_lib  # pylint: disable=g-import-not-at-top  (only on errors)
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is None:
    return None
  path, _, arg = spec.partition(':')
  try:
    config = config_lib.load_file(path, arg or None)
  except Exception:  # pylint: disable=broad-except  (no hint then)
    return None
  fields = []

  def walk(node, prefix):
    for key, value in node.items():
      fields.append(prefix + key)
      if hasattr(value, 'items'):
        walk(value, f'{prefix}{key}.')
  walk(config, '')
  parent = field.rpartition('.')[0]
  siblings = [f for f in fields if f.rpartition('.')[0] == parent] or fields
  match = difflib.get_close_matches(field, siblings, n=1, cutoff=0.6)
  return match[0] if match else None
