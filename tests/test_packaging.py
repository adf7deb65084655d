"""`pip install .` gives a working package: console scripts, requirements.txt as dependencies, package data.

The wheel is built offline (`pip wheel --no-deps --no-build-isolation`) from a copy of the package files, so the
checkout gets no build/ or *.egg-info. A full `pip install .` into a fresh venv is too slow for the suite; the
commands to check it by hand are in docs/weights.md ("Installing").
"""
import ast
import email
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {
    'advprop-train': 'advprop_jax.main:run',
    'advprop-eval': 'advprop_jax.evaluate:run',
    'advprop-export': 'advprop_jax.export:run',
    'advprop-predict': 'advprop_jax.predict:run',
    'advprop-plan': 'advprop_jax.plan:run',
}


def requirements():
  with open(os.path.join(ROOT, 'requirements.txt')) as f:
    return [line.split('#')[0].strip() for line in f if line.split('#')[0].strip()]


def canonical(requirement):
  """PEP 503 name normalisation (ml_collections == ml-collections), version as written."""
  name, version = requirement.split('==')
  return re.sub(r'[-_.]+', '-', name).lower() + '==' + version


def test_pyproject_declares_scripts_and_requirements():
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)
  assert project['project']['scripts'] == SCRIPTS
  assert 'dependencies' in project['project']['dynamic']
  assert project['tool']['setuptools']['dynamic']['dependencies'] == {'file': ['requirements.txt']}
  assert requirements() and all(re.fullmatch(r'[A-Za-z0-9_.\[\]-]+==[0-9][\w.+]*', r) for r in requirements())


@pytest.mark.parametrize('script', sorted(SCRIPTS))
def test_console_script_targets_are_zero_argument_functions(script):
  """Each target module defines a top-level `run()` that needs no argument (absl's app.run(main) inside).

  Read from the source, not imported: main.py and evaluate.py define the same absl flags at import time."""
  module, function = SCRIPTS[script].split(':')
  spec = importlib.util.find_spec(module)
  assert spec is not None and spec.origin, f'{script}: module {module} not found'
  with open(spec.origin) as f:
    tree = ast.parse(f.read())
  [run] = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function] or [None]
  assert run is not None, f'{script}: {module} has no top-level {function}()'
  required = len(run.args.args) - len(run.args.defaults) + sum(d is None for d in run.args.kw_defaults)
  assert required == 0, f'{script}: {module}.{function}() must take no arguments'


def test_wheel_has_scripts_dependencies_and_data(tmp_path):
  src = tmp_path / 'src'
  shutil.copytree(os.path.join(ROOT, 'advprop_jax'), src / 'advprop_jax',
                  ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('pyproject.toml', 'README.md', 'requirements.txt'):
    shutil.copy(os.path.join(ROOT, name), src / name)
  proc = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
                         '-w', str(tmp_path / 'dist'), str(src)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  [wheel] = os.listdir(tmp_path / 'dist')
  with zipfile.ZipFile(tmp_path / 'dist' / wheel) as z:
    names = set(z.namelist())
    info = next(n for n in names if n.endswith('.dist-info/METADATA')).rsplit('/', 1)[0]
    metadata = email.message_from_bytes(z.read(f'{info}/METADATA'))
    entry_points = z.read(f'{info}/entry_points.txt').decode()
  assert [canonical(r) for r in metadata.get_all('Requires-Dist')] == [canonical(r) for r in requirements()]
  for script, target in SCRIPTS.items():
    assert f'{script} = {target}' in entry_points
  assert 'advprop_jax/imagenet_classes.txt' in names
  packages = {os.path.relpath(d, ROOT) for d, _, files in os.walk(os.path.join(ROOT, 'advprop_jax'))
              if '__init__.py' in files}
  assert packages and all(f'{p}/__init__.py' in names for p in packages), sorted(packages)
