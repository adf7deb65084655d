"""Command-line plumbing shared by the absl CLIs (export, predict; usable by main, evaluate, plan).

* `UserError`: a user's mistake (a flag, a path, a file's contents). The CLI prints ONE line naming it,
  `<prog>: error: ...`, and exits with status 2.
* `run(main, prog, doc, define=None)`: the console-script / `python -m` entry point. absl's `app.run`, plus:
  flag parsing errors (unknown flag, bad enum value, ...) are one line and status 2 (absl: two lines,
  status 1); `--help` exits with status 0 and shows the CLI's docstring and flags also when started from a
  console script, whose `__main__` is pip's wrapper (absl prints `__main__.__doc__` and the flags registered
  for `sys.argv[0]`). Logging shows warnings and errors (absl's default is INFO; --verbosity=0 restores it),
  without orbax's warnings.
* `call(define, main, prog, argv)`: the same CLI in-process on a private flag namespace (tests): returns the
  exit status. Flags are defined by a `define(flag_values)` function instead of at import time, so importing
  a CLI module as a library (predict imports export) adds no flags to another program's command line.
"""
import contextlib
import logging
import sys
from typing import Any, Callable, Optional, Sequence

from absl import app
from absl import flags

HELP_FLAGS = ('--help', '-help', '--helpshort', '-helpshort', '--helpfull', '-helpfull', '-?')


class UserError(ValueError):
  """A user's mistake (flag, path, file contents): one line naming it; the CLIs exit with status 2."""


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


def call(define: Callable[[flags.FlagValues], None], main: Callable, prog: str, argv: Sequence[str]) -> int:
  """main(args, flag_values) on flags parsed from `argv` (no program name); returns the exit status."""
  flag_values = flags.FlagValues()
  define(flag_values)
  try:
    rest = flag_values([prog, *argv])
  except flags.Error as e:
    error(prog, e)
    return 2
  return main(rest, flag_values)


def _quiet_orbax(record: logging.LogRecord) -> bool:
  """Drops orbax's warnings about read-only checkpoint managers and the like (errors still pass)."""
  return record.levelno >= logging.ERROR or '/orbax/' not in record.pathname


def run(main: Callable, prog: str, doc: str,
        define: Optional[Callable[[flags.FlagValues], None]] = None) -> None:
  """app.run(main) with one-line flag errors (status 2) and a --help that lists this CLI's flags."""
  before = set(flags.FLAGS)
  if define is not None:
    define(flags.FLAGS)
  mine = [flags.FLAGS[name] for name in set(flags.FLAGS) - before]
  mine += flags.FLAGS.get_flags_for_module(main.__module__)  # flags defined at import of main's module
  for flag in mine:
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  main_module = sys.modules['__main__']
  if not getattr(main_module, '__doc__', None):  # pip's console-script wrapper has no docstring
    main_module.__doc__ = doc

  def parse(argv):
    if not any(a.startswith(('--verbosity', '-v')) for a in argv[1:]):
      argv = [argv[0], '--verbosity=-1', *argv[1:]]  # warnings and errors only (absl's default: INFO)
    for handler in logging.getLogger().handlers + logging.getLogger('absl').handlers:
      handler.addFilter(_quiet_orbax)
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      error(prog, e)
      sys.exit(2)
    except SystemExit as e:  # absl's --help / --helpfull print the help, then exit with status 1
      if e.code == 1 and any(a.split('=')[0] in HELP_FLAGS for a in argv[1:]):
        sys.exit(0)
      raise
  app.run(main, flags_parser=parse)
