"""The architecture's promises: no import cycle, a TF-free config/model/step path, methods asked by record,
one eval step, and config mistakes stopped before the workdir exists."""
import ast
import os
import re
import subprocess
import sys

import pytest

from advprop_jax import methods

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, 'advprop_jax')


def _modules():
  """{dotted module name: path} of the package."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith('.py'):
        rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].replace(os.sep, '.')
        out[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = os.path.join(root, f)
  return out


def _imports(path, names):
  """The package modules `path` imports (explicitly; a submodule rather than its package when named)."""
  targets = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      targets.update(a.name for a in node.names if a.name in names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for a in node.names:
        full = f'{node.module}.{a.name}'
        if full in names:
          targets.add(full)
        elif node.module in names:
          targets.add(node.module)
  return targets


def test_no_import_cycle():
  modules = _modules()
  graph = {m: _imports(p, modules) for m, p in modules.items()}
  state = {}

  def visit(m, path):
    state[m] = 'open'
    for n in sorted(graph[m]):
      if state.get(n) == 'open':
        pytest.fail('import cycle: ' + ' -> '.join(path[path.index(n):] + [n]))
      if n not in state:
        visit(n, path + [n])
    state[m] = 'done'

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])


def test_config_models_and_step_load_no_tensorflow():
  code = ('import sys, advprop_jax.config, advprop_jax.models, advprop_jax.step, advprop_jax.factories, '
          'advprop_jax.eval.step, advprop_jax.flops\n'
          'import configs.efficientnet, configs.resnet, configs.demo\n'
          'loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", '
          '"tensorflow_datasets", "clu"))\n'
          'print(loaded)\nassert not loaded')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr


def test_only_the_methods_table_branches_on_the_method_name():
  pattern = re.compile(r'method ==|method in ')
  offenders = []
  for top in ('advprop_jax', 'benchmarks', 'configs'):
    for root, _, files in os.walk(os.path.join(REPO, top)):
      if os.path.join('advprop_jax', 'methods') in root:
        continue
      for f in files:
        if f.endswith(('.py', '.sh')):
          path = os.path.join(root, f)
          offenders += [f'{path}:{i + 1}' for i, line in enumerate(open(path)) if pattern.search(line)]
  assert not offenders


def test_one_eval_step_and_one_eval_loop():
  defs = []
  for path in _modules().values():
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.FunctionDef) and re.search(r'eval_step$|^evaluate$', node.name):
        defs.append(f'{os.path.relpath(path, REPO)}:{node.name}')
  assert sorted(defs) == ['advprop_jax/eval/loop.py:evaluate', 'advprop_jax/eval/step.py:make_eval_step']


def test_every_method_record_is_complete():
  from advprop_jax import config as config_lib
  for name, method in methods.METHODS.items():
    config = config_lib.base_config()
    config.method = name
    assert method.name == name and method.distributions(config)[0] == 'clean'
    assert method.loader_batch_size(config) >= config.global_batch_size
    method.validate(config, 8)


@pytest.mark.parametrize('override, field', [
    ('--config.afan.stage=9', 'config.afan.stage'),
    ('--config.fast_advprop.adv_fraction=1.5', 'config.fast_advprop.adv_fraction'),
    ('--config.fast_advprop.noise_weight=-1', 'config.fast_advprop.noise_weight')])
def test_bad_method_setting_exits_2_before_the_workdir_exists(tmp_path, override, field):
  method = field.split('.')[1]
  workdir = tmp_path / 'run'
  out = subprocess.run(
      [sys.executable, '-m', 'advprop_jax.main', '--config=configs/demo.py', f'--workdir={workdir}',
       f'--config.method={method}', override, f'--config.data.data_dir={tmp_path / "tfds"}'],
      cwd=REPO, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert field in out.stderr and 'Traceback' not in out.stderr
  assert not workdir.exists()
