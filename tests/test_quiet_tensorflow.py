"""TensorFlow's start-up lines never reach a user: a CLI mistake is one line on any x86 CPU.

TF_ENABLE_ONEDNN_OPTS=1 makes TF take, on any x86 CPU, the start-up path it takes by default on AVX-512
CPUs (oneDNN on, logged twice before TF_CPP_MIN_LOG_LEVEL is read), so these tests mean the same on
every CI machine.
"""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVX512_LIKE = dict(os.environ, TF_ENABLE_ONEDNN_OPTS='1', TF_CPP_MIN_LOG_LEVEL='2',
                   JAX_PLATFORMS='cpu', XLA_FLAGS='')


def _python(code, env, cwd=REPO):
  return subprocess.run([sys.executable, '-c', code], cwd=cwd, capture_output=True, text=True,
                        env=env, timeout=300)


def test_cli_mistake_is_one_line_where_tf_logs_at_start_up(tmp_path):
  bare = _python('import tensorflow', AVX512_LIKE)
  assert bare.returncode == 0 and 'oneDNN' in bare.stderr  # the noise this guards against is real
  result = subprocess.run(
      [sys.executable, '-m', 'advprop_jax.main', '--config=configs/demo.py',
       f'--workdir={tmp_path / "run"}', '--config.global_batch_size=abc'],
      cwd=REPO, capture_output=True, text=True, env=AVX512_LIKE, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "advprop_jax.main: error: flag --config.global_batch_size=abc: invalid literal for int() "
      "with base 10: 'abc'"], result.stderr
  assert not (tmp_path / 'run').exists()


def _fake_tensorflow(root, body):
  package = root / 'tensorflow'
  package.mkdir()
  (package / '__init__.py').write_text('import os\nos.write(2, b"loading noise\\n")\n' + body)
  return dict(os.environ, PYTHONPATH=f'{root}{os.pathsep}{REPO}', TF_CPP_MIN_LOG_LEVEL='2')


def test_import_error_keeps_what_tf_wrote(tmp_path):
  env = _fake_tensorflow(tmp_path, 'raise ImportError("libfoo.so: cannot open shared object")\n')
  result = _python('import advprop_jax\nimport tensorflow', env, cwd=tmp_path)
  assert result.returncode == 1
  assert result.stderr.startswith('loading noise\n'), result.stderr
  assert 'ImportError: libfoo.so' in result.stderr


def test_successful_import_is_silent_unless_asked(tmp_path):
  env = _fake_tensorflow(tmp_path, 'VALUE = 3\n')
  code = 'import advprop_jax\nimport tensorflow\nprint(tensorflow.VALUE, tensorflow.__loader__)'
  result = _python(code, env, cwd=tmp_path)
  assert result.returncode == 0 and result.stderr == '', result.stderr
  assert result.stdout.startswith('3 <_frozen_importlib_external.SourceFileLoader')
  loud = _python(code, dict(env, TF_CPP_MIN_LOG_LEVEL='0'), cwd=tmp_path)
  assert loud.stderr == 'loading noise\n'
