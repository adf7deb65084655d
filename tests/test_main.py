"""The training program end to end: recipe configs, CLI errors, resume, preemption, NaN handling."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from advprop_jax import config as config_lib
from advprop_jax.models import efficientnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# RECIPE §2-3 per model: (image size, eval crop fraction, dropout).
RECIPE = {'b0': (224, .875, .2), 'b1': (240, .882, .2), 'b2': (260, .890, .3), 'b3': (300, .904, .3),
          'b4': (380, .922, .4), 'b5': (456, .934, .4), 'b6': (528, .942, .5), 'b7': (600, .949, .5),
          'b8': (672, .954, .5)}


def load_config(path, arg=None):
  import importlib.util
  spec = importlib.util.spec_from_file_location('cfg', os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


@pytest.mark.parametrize('variant', sorted(RECIPE))
def test_recipe_configs(variant):
  c = load_config('configs/efficientnet.py', variant)
  size, crop, dropout = RECIPE[variant]
  assert c.model == f'efficientnet-{variant}'
  # Eval crop: the reference's exact S/(S+32) (crop_fraction None); timm's crop_pct is it rounded.
  assert (c.data.image_size, c.data.crop_fraction) == (size, None)
  assert size / (size + 32) == pytest.approx(crop, abs=1e-3)
  assert (c.data.resize_method, c.data.eval_preprocessing, c.data.augment_semantics) == (
      'tf1_bicubic', 'tf_reference', 'tf_reference')
  assert efficientnet.SCALING[c.model].dropout == dropout and c.model_overrides.dropout_rate is None
  assert c.num_epochs == 350 and c.warmup_epochs == 5
  assert (c.lr_schedule, c.lr_decay_epochs, c.lr_decay_rate) == ('exponential', 2.4, 0.97)
  assert c.base_learning_rate * c.global_batch_size / 256 == pytest.approx(
      0.128 if variant == 'b8' else 0.256)  # the model cards' LR
  assert (c.optimizer, c.rmsprop_decay, c.momentum, c.rmsprop_epsilon) == ('rmsprop', .9, .9, 1e-3)
  assert (c.l2_weight, c.label_smoothing, c.ema_decay) == (1e-5, 0.1, 0.9999)
  assert (c.data.augment, c.data.train_crop, c.data.normalization) == (
      'autoaugment', 'inception', 'minus_one_one')
  assert c.method == 'advprop' and 1 <= c.attack.epsilon_pixels <= 4
  assert c.attack.step_size_pixels == 1 and c.attack.num_steps == 0  # eps + 1 iterations
  assert c.bn_group_size == 0 and c.dtype == 'bfloat16'
  config_lib.validate(c, num_devices=256, process_count=32)


def test_attacker_grows_with_model_size():
  eps = [load_config('configs/efficientnet.py', v).attack.epsilon_pixels for v in sorted(RECIPE)]
  assert eps == sorted(eps) and eps[0] == 1 and eps[-1] == 4


def run_main(workdir, *overrides, timeout=600):
  cmd = [sys.executable, '-m', 'advprop_jax.main', '--config=configs/demo.py',
         f'--workdir={workdir}', *overrides]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))


@pytest.mark.parametrize('override,field', [
    ('--config.method=advprob', 'config.method'),
    ('--config.attack.epsilon_pixels=-1', 'config.attack.epsilon_pixels'),
    ('--config.data.dataset=no_such_dataset', 'no_such_dataset'),
    ('--config.model=efficientnet-b9', 'config.model'),
])
def test_bad_config_exits_2_naming_the_field(tmp_path, override, field):
  workdir = tmp_path / 'run'
  result = run_main(workdir, override)
  assert result.returncode == 2, result.stderr[-2000:]
  assert field in result.stderr and 'Traceback' not in result.stderr
  assert not workdir.exists()  # the workdir is untouched


# ------------------------------------------------------------- slower end-to-end runs of the demo
TINY = ['--config.model_overrides.stages=((1,3,1,1,16),(1,3,2,6,24))',
        '--config.model_overrides.head_features=64', '--config.model_overrides.depthwise_impl=grouped',
        '--config.data.image_size=16', '--config.global_batch_size=32', '--config.max_steps=12',
        '--config.checkpoint_every_steps=4', '--config.log_every_steps=4',
        '--config.eval_every_epochs=100', '--config.eval_pgd_epsilons_pixels=(4.0,)']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _final(workdir):
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize('accumulation', [1, 2])  # 2: two micro-batches per optimizer step
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, data_dir, accumulation):
  args = TINY + [f'--config.data.data_dir={data_dir}',
                 f'--config.grad_accumulation_steps={accumulation}']
  reference = tmp_path / 'reference'
  result = run_main(reference, *args)
  assert result.returncode == 0, result.stderr[-3000:]

  killed = tmp_path / 'killed'
  cmd = [sys.executable, '-m', 'advprop_jax.main', '--config=configs/demo.py',
         f'--workdir={killed}', *args]
  process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))
  deadline = time.time() + 600
  while not (killed / 'checkpoints' / '8').exists() and process.poll() is None:
    assert time.time() < deadline
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (killed / 'final_metrics.json').exists()
  resumed = run_main(killed, *args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed' in resumed.stderr
  assert _final(killed) == _final(reference)  # bitwise equal floats on CPU

  from advprop_jax import checkpoints
  a, _ = checkpoints.load_inference_variables(str(reference))
  b, _ = checkpoints.load_inference_variables(str(killed))
  import jax
  jax.tree.map(np.testing.assert_array_equal, a, b)

  if accumulation > 1:
    return  # the refusals below do not depend on it
  # The same workdir with another model/method is refused, and left as it was.
  listing = sorted(os.listdir(killed / 'checkpoints'))
  refused = run_main(killed, *args, '--config.method=vanilla')
  assert refused.returncode == 2 and 'method' in refused.stderr
  assert sorted(os.listdir(killed / 'checkpoints')) == listing

  # A finished run is kept: rerunning prints its metrics; another schedule is refused unless allowed.
  stamp = os.stat(killed / 'final_metrics.json').st_mtime_ns
  again = run_main(killed, *args)
  assert again.returncode == 0 and 'already finished' in again.stdout
  assert os.stat(killed / 'final_metrics.json').st_mtime_ns == stamp
  refused = run_main(killed, *args, '--config.global_batch_size=64')
  assert refused.returncode == 2 and 'global_batch_size' in refused.stderr
  # One line for the mistake; the run's own INFO progress lines (absl's 'I<date> ...') may precede it.
  problems = [line for line in refused.stderr.strip().splitlines() if not re.match(r'I\d{4} ', line)]
  assert len(problems) == 1 and '--allow_schedule_change' in problems[0], refused.stderr
  assert sorted(os.listdir(killed / 'checkpoints')) == listing
  assert os.stat(killed / 'final_metrics.json').st_mtime_ns == stamp


@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=['SIGTERM', 'SIGINT', 'SIGHUP'])
def test_sigterm_ctrl_c_and_sighup_save_and_exit_cleanly(tmp_path, data_dir, sig):
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'advprop_jax.main', '--config=configs/demo.py',
         f'--workdir={workdir}', *TINY, f'--config.data.data_dir={data_dir}',
         '--config.max_steps=100000', '--config.checkpoint_every_steps=100000',
         '--config.log_every_steps=1']
  process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))
  for line in process.stdout:  # wait until training runs
    running = re.search(r'\] step (\d+)/', line)
    if running and int(running.group(1)) >= 3:
      break
  process.send_signal(sig)
  sent = time.time()
  out, _ = process.communicate(timeout=300)
  assert process.returncode == 0 and 'Traceback' not in out, out[-3000:]
  assert time.time() - sent < 30, out[-3000:]
  steps = [int(n) for n in os.listdir(workdir / 'checkpoints') if n.isdigit()]
  assert len(steps) == 1 and steps[0] >= int(running.group(1))
  assert os.listdir(workdir / 'checkpoints') == [str(steps[0])]  # no save left half-written
  # After the signal: INFO progress lines, then one line saying where it stopped (SIGINT first
  # says it will save, and how to stop at once).
  said = [l for l in out.strip().splitlines() if not re.match(r'I\d{4} ', l)]
  name = signal.Signals(sig).name
  assert said[-1].endswith(f'Stop requested ({name}): checkpoint at step {steps[0]} saved, '
                           'exiting. Rerun the same command to resume.'), out[-3000:]
  assert len(said) == (2 if sig == signal.SIGINT else 1), said


def test_nan_loss_stops_naming_the_step(tmp_path, data_dir):
  from advprop_jax import trainer
  config = load_config('configs/demo.py')
  config.method = 'vanilla'
  config.model_overrides.stages = ((1, 3, 1, 1, 16),)
  config.model_overrides.head_features = 32
  config.model_overrides.depthwise_impl = 'grouped'
  config.data.image_size = 16
  config.data.data_dir = data_dir
  config.global_batch_size = 16
  config.log_every_steps = 2
  config.l2_weight = float('inf')  # the loss is inf from the first step on
  with pytest.raises(trainer.NonFiniteLossError, match='step 1;'):
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints' / '2')  # no bad state saved


@pytest.mark.parametrize('arg', ['50', '101,advprop', '50,fast_advprop', '200,vanilla'])
def test_resnet_configs(arg):
  c = load_config('configs/resnet.py', arg)
  assert c.model == f'resnet{arg.split(",")[0]}'
  assert (c.optimizer, c.momentum, c.weight_decay, c.lr_schedule) == ('sgd', 0.9, 1e-4, 'piecewise')
  assert c.base_learning_rate == 0.1
  # Fast AdvProp is budget-matched to vanilla: fewer epochs.
  assert c.num_epochs == (87 if c.method == 'fast_advprop' else 105)
  config_lib.validate(c, num_devices=32)
