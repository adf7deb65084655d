"""Gradient accumulation (config.grad_accumulation_steps = k): k micro-batches, one update.

Equivalences: without batch-dependent layers, k micro-batches give the k = 1 update; with
per-device BN, k micro-batches on D devices are the k = 1 step on k*D devices whose shards are the
micro-batches (random numbers included); Fast AdvProp deals its adversarial examples per
micro-batch.
"""
import json
import os
import re
import subprocess
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from advprop_jax import config as config_lib
from advprop_jax import methods
from advprop_jax import optim
from advprop_jax import parallel
from advprop_jax import step as step_lib
from conftest import tiny_efficientnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16


class NoBatchStatsNet(nn.Module):
  """Conv -> swish -> mean -> dense: no layer mixes examples; micro-batching changes no number."""
  num_classes: int = 10
  bn_axis_name: Any = None  # what the step sets on every model; unused

  @nn.compact
  def __call__(self, x, train=False, distribution='clean'):
    del train, distribution
    x = nn.swish(nn.Conv(8, (3, 3), strides=(2, 2))(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, (1, 2)))


def tiny_model(**overrides):
  """One MBConv stage: compiles fast (the step is compiled once per device count and k)."""
  return tiny_efficientnet(stages=((1, 3, 1, 1, 16),), head_features=32, **overrides)


def make_config(**fields):
  c = config_lib.base_config()
  c.num_classes = 10
  c.attack.epsilon_pixels = 4.0
  c.attack.step_size_pixels = 2.0
  c.attack.num_steps = 1
  c.update_from_flattened_dict({k.replace('__', '.'): v for k, v in fields.items()})
  return c


def make_batch(seed, size):
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  return {'image': jax.random.uniform(kx, (size, SIZE, SIZE, 3), minval=-1, maxval=1),
          'label': jax.random.randint(ky, (size,), 0, 10)}


def optimizer():
  lr = optim.learning_rate_schedule(base_lr=0.05, steps_per_epoch=10, num_epochs=1, warmup_epochs=0,
                                    schedule='constant')
  return optim.create_optimizer('rmsprop', lr), lr


def train(model, config, devices, bn_group_size, batch_size, steps=2):
  """`steps` steps from the same initial state and batches; (state, metrics) on the host."""
  tx, lr = optimizer()
  mesh = parallel.create_mesh(bn_group_size, devices=devices)
  state = step_lib.create_train_state(model, tx, jax.random.PRNGKey(0), SIZE, mesh)
  step = step_lib.make_train_step(model, tx, config, mesh, lr, 0.9)
  for i in range(steps):
    batch = jax.device_put(make_batch(i, batch_size), parallel.batch_sharding(mesh))
    state, metrics = step(state, batch, jax.random.PRNGKey(1))
  return jax.device_get(state), jax.device_get(metrics)


def assert_close(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


def assert_states_close(a, b, **tol):
  for field in ('params', 'model_state', 'ema_params', 'ema_model_state', 'opt_state'):
    assert_close(getattr(a, field), getattr(b, field), **tol)


def test_without_batch_statistics_k_micro_batches_give_the_k1_update():
  # Deterministic attack: untargeted, no random start, so k changes no random draw that matters.
  config = make_config(method='advprop', attack__targeted=False)
  model, devices = NoBatchStatsNet(), jax.devices()[:4]
  one, m1 = train(model, config, devices, 1, 16)
  config.grad_accumulation_steps = 2
  two, m2 = train(model, config, devices, 1, 16)
  assert int(two.step) == 2
  assert_states_close(two, one, rtol=1e-6, atol=1e-6)
  for key in ('loss', 'clean_loss', 'adv_loss', 'grad_norm', 'clean_accuracy'):
    np.testing.assert_allclose(m2[key], m1[key], rtol=1e-6, atol=1e-6)
  # The updates themselves are not negligible next to the tolerance.
  initial = step_lib.initial_state(model, optimizer()[0], jax.random.PRNGKey(0), SIZE)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), one.params,
                                       initial.params))
  assert max(moved) > 1e-3


def test_per_device_bn_k_micro_batches_equal_k_times_more_devices():
  # Targeted attack with random starts, dropout and drop-connect: micro-batch i of device d must
  # draw what device d*k + i draws in the k = 1 run.
  config = make_config(method='advprop', attack__random_start=0.5)
  model = tiny_model(dropout_rate=0.3, drop_connect_rate=0.3)
  eight, m8 = train(model, config, jax.devices(), 1, 16)
  config.grad_accumulation_steps = 2
  four, m4 = train(model, config, jax.devices()[:4], 1, 16)
  assert_states_close(four, eight, rtol=1e-5, atol=1e-6)
  for key in ('loss', 'clean_loss', 'adv_loss', 'grad_norm', 'attack_success'):
    np.testing.assert_allclose(m4[key], m8[key], rtol=1e-5, atol=1e-6)


def test_fast_advprop_deals_adversarial_examples_per_micro_batch():
  """k = 2 on D = 2 devices (per-device BN, so 2 BN groups): the step equals a plain loop over
  the micro-batches, each a k = 1 grad function on the D devices (its adversarial examples dealt
  over the D groups), whose gradients and statistics are averaged; 2 adversarial images per
  micro-batch and device make the deal an all_to_all."""
  k, num_devices, shard = 2, 2, 20
  config = make_config(method='fast_advprop', grad_accumulation_steps=k, attack__random_start=0.5,
                       attack__epsilon_pixels=4.0)
  model = tiny_model(distributions=('clean', 'adv'))
  tx, lr = optimizer()
  mesh = parallel.create_mesh(1, devices=jax.devices()[:num_devices])
  state = step_lib.create_train_state(model, tx, jax.random.PRNGKey(0), SIZE, mesh)
  batch = make_batch(0, num_devices * k * shard)
  rng = jax.random.PRNGKey(1)
  step = step_lib.make_train_step(model, tx, config, mesh, lr, 0.9)
  sharded = jax.device_put(batch, parallel.batch_sharding(mesh))
  new_state, _ = step(jax.tree.map(jnp.copy, state), sharded, rng)  # the step donates its state

  grad_fn = methods.get('fast_advprop').make_grad_fn(model, config)
  axes = parallel.DATA_AXES

  def per_device(params, model_state, micro_batch, i):
    device_rng = jax.random.fold_in(jax.random.fold_in(rng, 0), lax.axis_index(axes) * k + i)
    return lax.pmean(grad_fn(params, model_state, micro_batch, device_rng)[:2], axes)

  loop = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(axes), P()),
                               out_specs=P(), check_vma=False))
  parts = []
  for i in range(k):  # micro-batch i: rows [i*m, (i+1)*m) of every device's shard
    micro = jax.tree.map(lambda a: a.reshape((num_devices, k, shard) + a.shape[1:])[:, i].reshape(
        (num_devices * shard,) + a.shape[1:]), batch)
    parts.append(loop(state.params, state.model_state, micro, i))
  grads, model_state = jax.tree.map(lambda *x: sum(x) / k, *parts)
  updates, _ = tx.update(grads, state.opt_state, state.params)
  assert_close(jax.device_get(new_state.params), optax.apply_updates(state.params, updates),
               rtol=1e-5, atol=1e-6)
  assert_close(jax.device_get(new_state.model_state), model_state, rtol=1e-5, atol=1e-6)


def test_bad_grad_accumulation_steps_raise():
  for value, match in ((0, 'grad_accumulation_steps=0 must be >= 1'),
                       (-2, 'grad_accumulation_steps=-2 must be >= 1'),
                       (3, r'grad_accumulation_steps=3 must divide the per-device batch 256')):
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.validate(make_config(grad_accumulation_steps=value), num_devices=8)
  config_lib.validate(make_config(grad_accumulation_steps=4), num_devices=8)
  # Fast AdvProp splits each micro-batch: 40 loader images on 8 devices, 5 per device; k = 5 leaves
  # one image per micro-batch and no adversarial one.
  fast = make_config(method='fast_advprop', global_batch_size=32)
  config_lib.validate(fast, num_devices=8)
  fast.grad_accumulation_steps = 5
  with pytest.raises(config_lib.ConfigError,
                     match='grad_accumulation_steps=5.*leaves 0 adversarial'):
    config_lib.validate(fast, num_devices=8)


# ------------------------------------------------------------------- the program, end to end
def run_main(workdir, *overrides, timeout=600):
  cmd = [sys.executable, '-m', 'advprop_jax.main', '--config=configs/demo.py',
         f'--workdir={workdir}', *overrides]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))


def problem_lines(stderr):
  """stderr without the run's own INFO progress lines (absl's 'I<date> ...')."""
  return [line for line in stderr.strip().splitlines() if not re.match(r'I\d{4} ', line)]


@pytest.mark.parametrize('value', ['0', '3'])  # the demo's per-device batch is 64 (one device)
def test_bad_grad_accumulation_steps_exit_2_writing_nothing(tmp_path, value):
  workdir = tmp_path / 'run'
  result = run_main(workdir, f'--config.grad_accumulation_steps={value}')
  assert result.returncode == 2, result.stderr[-2000:]
  problems = problem_lines(result.stderr)
  assert len(problems) == 1 and 'config.grad_accumulation_steps' in problems[0], result.stderr
  assert not workdir.exists()


def final_metrics(workdir):
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    return json.load(f)


@pytest.mark.slow
def test_demo_with_k2_reaches_the_demo_accuracy(tmp_path):
  """The whole demo (30 epochs, global BN on one device) with 2 micro-batches of 32 per step: BN now
  normalises over 32 images instead of 64; the demo's accuracy must still be reached: README's range
  for the demo, 98 ± 1.5 % clean top-1 (98.89 % measured at k = 2 on the development machine)."""
  workdir = tmp_path / 'demo'
  result = run_main(workdir, '--config.grad_accumulation_steps=2',
                    f'--config.data.data_dir={tmp_path / "tfds"}', timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  final = final_metrics(workdir)
  assert final['step'] == 673  # the demo's schedule, unchanged by k
  assert final['ema_clean_top1'] >= 0.965, final
