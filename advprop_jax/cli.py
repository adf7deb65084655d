"""What the command lines share: absl flags defined when the CLI runs, a user's mistake reported as one
line with exit code 2 (never a traceback), and library INFO logs off unless --verbose.

Every CLI module has `define_flags()` and `main(argv)`; `run(define_flags, main)` is its entry point
(`python -m advprop_jax.X` and the console scripts). Flags are defined when the CLI runs, not when its
module is imported, so library code and tests can import any CLI module side by side.
"""
import logging
import os
import re
import sys

from absl import app
from absl import flags

EXIT_USAGE = 2  # a user's mistake: bad flag, config value, path; nothing was written
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class UsageError(Exception):
  """A user's mistake, reported as its message on one line, exit code 2."""


def fail(message: str, code: int = EXIT_USAGE):
  """Prints `message` as one line on stderr and exits with `code`."""
  print(' '.join(str(message).split('\n')).strip(), file=sys.stderr)
  sys.exit(code)


def run(define_flags, main):
  """Defines the flags, parses the command line (a bad flag or config file: one line, exit 2), runs main."""
  _make_configs_importable()
  define_flags()
  if 'verbose' not in flags.FLAGS:
    flags.DEFINE_bool('verbose', False, 'Also show the INFO logs of the libraries (orbax, TFDS, JAX...).')
  app.run(_quiet_unless_verbose(main), flags_parser=_parse)


def _make_configs_importable():
  """A user's config file may import the shipped ones (`from configs import efficientnet`) from any
  working directory: the checkout's root (which holds configs/) goes on the import path."""
  root = os.path.dirname(PACKAGE_DIR)
  if os.path.isdir(os.path.join(root, 'configs')) and root not in sys.path:
    sys.path.append(root)


def _quiet_unless_verbose(main):
  def wrapped(argv):
    if not flags.FLAGS.verbose:
      for handler in logging.getLogger().handlers + logging.getLogger('absl').handlers:
        handler.addFilter(_OwnInfoOnly())
    return main(argv)
  return wrapped


class _OwnInfoOnly(logging.Filter):
  """INFO records pass only from this package; warnings and errors from anywhere, except TensorFlow's
  deprecation notices (about its own internals, nothing a user can act on)."""

  def filter(self, record):
    if record.levelno < logging.WARNING:
      return record.pathname.startswith(PACKAGE_DIR)
    return not record.pathname.endswith(os.path.join('util', 'deprecation.py'))


def _parse(argv):
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  (every parse failure is the user's input)
    fail(f'{os.path.basename(argv[0])}: {describe_flag_error(e, argv)}')


def describe_flag_error(error: Exception, argv) -> str:
  """One line for what went wrong while parsing `argv`: a flag, a config file or a config field."""
  if isinstance(error, SyntaxError):  # a config file that is not valid Python
    return f'{error.filename}:{error.lineno}: syntax error: {error.msg}'
  text = str(error)
  if 'Traceback (most recent call last)' in text:  # get_config raised: keep its last line
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return f'{text.splitlines()[0].rstrip(":")} {last.strip()}'
  if 'No such file or directory' in text:
    missing = re.search(r"No such file or directory: '([^']*)'", text)
    return f'--config={missing.group(1) if missing else "?"}: no such config file'
  if isinstance(error, (AttributeError, KeyError)):  # an override of a field the config does not have
    override = next((a.split('=')[0] for a in argv if a.startswith('--config.')), '--config.?')
    for arg in argv:
      if arg.startswith('--config.') and _missing_field(arg) in text:
        override = arg.split('=')[0]
    hint = re.search(r'Did you mean "([^"]+)"', text)
    return (f'{override}: no such config field' +
            (f'; did you mean "{hint.group(1)}"?' if hint else '') +
            ' (all fields, with comments: advprop_jax/config.py)')
  return text.splitlines()[0] if text else type(error).__name__


def _missing_field(arg: str) -> str:
  return repr(arg.split('=')[0].split('.')[-1])
