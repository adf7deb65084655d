"""Holds back what TensorFlow writes to stderr while it is first imported.

TF's C++ libraries log while they load, before TF_CPP_MIN_LOG_LEVEL is read: on CPUs where oneDNN is on
by default (AVX-512, as on TPU VM hosts) every process prints absl's 'All log messages before
absl::InitializeLog() ...' and 'oneDNN custom operations are on ...', twice. That turned each one-line
error of our CLIs into five lines on those machines only. `install()` puts a finder in front of the
import system that runs the first `import tensorflow` (ours, tfds's or a user script's) with file
descriptor 2 pointed at a temporary file: dropped when the import succeeds, written out when it fails,
so an import error keeps its explanation. A user who sets TF_CPP_MIN_LOG_LEVEL=0 asked for TF's logs:
stderr is left alone. No library does this (absl offers no switch for C++ lines logged before
InitializeLog), hence by hand.
"""
import contextlib
import importlib.abc
import importlib.util
import os
import sys
import tempfile


@contextlib.contextmanager
def held_stderr():
  """Points fd 2 at a temporary file for the body; replays what it caught if the body raises."""
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with tempfile.TemporaryFile() as held:
      os.dup2(held.fileno(), 2)
      try:
        yield
      except BaseException:
        sys.stderr.flush()
        os.dup2(saved, 2)
        held.seek(0)
        os.write(2, held.read())
        raise
      finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
  finally:
    os.close(saved)


class _HeldStderrLoader(importlib.abc.Loader):
  """Runs the wrapped loader's exec_module inside held_stderr; the module keeps the real loader."""

  def __init__(self, loader):
    self._loader = loader

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    module.__loader__ = module.__spec__.loader = self._loader
    with held_stderr():
      self._loader.exec_module(module)


class _TensorFlowFinder(importlib.abc.MetaPathFinder):

  def find_spec(self, name, path=None, target=None):  # pylint: disable=unused-argument
    if name != 'tensorflow':
      return None
    uninstall()  # one import only; also keeps the find_spec below from coming back here
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.loader is not None:
      spec.loader = _HeldStderrLoader(spec.loader)
    return spec


def install() -> None:
  """Idempotent; a no-op once TF is imported or when the user set TF_CPP_MIN_LOG_LEVEL=0."""
  if 'tensorflow' in sys.modules or os.environ.get('TF_CPP_MIN_LOG_LEVEL') == '0':
    return
  if not any(isinstance(f, _TensorFlowFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _TensorFlowFinder())


def uninstall() -> None:
  sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TensorFlowFinder)]
