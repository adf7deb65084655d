"""Checkpointer: exact round trip, retention, half-written steps, config mismatch, signals, export."""
import hashlib
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from advprop_jax import checkpoints
from advprop_jax import optim
from advprop_jax import parallel
from advprop_jax import step as step_lib

FINGERPRINT = {'model': 'efficientnet-b0', 'method': 'advprop', 'num_classes': 10, 'image_size': 16}


@pytest.fixture(scope='module')
def mesh():
  return parallel.create_mesh(1)


def make_state(mesh, seed: int) -> step_lib.TrainState:
  """A TrainState shaped like the real one (RMSProp state, two BN collections, distinct EMA)."""
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  params = {'conv': {'kernel': f(3, 3, 3, 8)}, 'bn': {'scale': f(8), 'bias': f(8)},
            'bn_adv': {'scale': f(8), 'bias': f(8)}, 'head': {'kernel': f(8, 10), 'bias': f(10)}}
  model_state = {'batch_stats': {'bn': {'mean': f(8), 'var': f(8)}},
                 'batch_stats_adv': {'bn': {'mean': f(8), 'var': f(8)}}}
  tx = optim.create_optimizer('rmsprop', 0.1)
  opt_state = tx.update(params, tx.init(params), params)[1]  # non-trivial optimizer statistics
  state = step_lib.TrainState(
      step=jnp.asarray(seed, jnp.int32), params=params, model_state=model_state, opt_state=opt_state,
      ema_params=jax.tree.map(lambda x: x * 0.5, params),
      ema_model_state=jax.tree.map(lambda x: x + 1.0, model_state))
  return jax.device_put(state, parallel.replicated_sharding(mesh))


def assert_trees_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()  # bit-identical


def snapshot(root):
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    rel = os.path.relpath(dirpath, root)
    out[rel] = sorted(dirnames)
    for name in filenames:
      with open(os.path.join(dirpath, name), 'rb') as fh:
        out[os.path.join(rel, name)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def checkpointer(workdir, fingerprint=FINGERPRINT, **kwargs):
  kwargs = dict(dict(every_steps=2, keep=3), **kwargs)
  return checkpoints.Checkpointer(str(workdir), config_fingerprint=fingerprint, **kwargs)


def test_save_restore_is_exact_and_replicated(tmp_path, mesh):
  state = make_state(mesh, seed=4)
  abstract = jax.eval_shape(lambda: state)
  with checkpointer(tmp_path) as ckpt:
    assert ckpt.restore_latest(abstract, mesh) == (None, {})
    assert not ckpt.should_save(3) and ckpt.should_save(4)
    assert not ckpt.save(3, state, {'data_step': 3})  # not due
    assert ckpt.save(4, state, {'data_step': 40, 'rng_seed': 7})
    assert not ckpt.save(4, state, {'data_step': 40}, force=True)  # already saved: skipped, no error
    ckpt.wait()
  with checkpointer(tmp_path) as ckpt:
    restored, extra = ckpt.restore_latest(abstract, mesh)
  assert isinstance(restored, step_lib.TrainState)
  assert extra == {'data_step': 40, 'rng_seed': 7}
  assert_trees_equal(restored, state)
  assert int(restored.step) == 4
  want = NamedSharding(mesh, P())
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim) and leaf.sharding.mesh == mesh


def test_keeps_newest_and_restores_newest(tmp_path, mesh):
  states = {s: make_state(mesh, seed=s) for s in (1, 2, 3, 4)}
  with checkpointer(tmp_path, every_steps=1, keep=2) as ckpt:
    for s, st in states.items():
      assert ckpt.save(s, st, {'data_step': s})
  steps = sorted(int(n) for n in os.listdir(tmp_path / 'checkpoints') if n.isdigit())
  assert steps == [3, 4]
  with checkpointer(tmp_path, every_steps=1, keep=2) as ckpt:
    restored, extra = ckpt.restore_latest(jax.eval_shape(lambda: states[4]), mesh)
  assert extra == {'data_step': 4}
  assert_trees_equal(restored, states[4])


def test_half_written_checkpoints_are_ignored(tmp_path, mesh):
  good = make_state(mesh, seed=2)
  with checkpointer(tmp_path) as ckpt:
    ckpt.save(2, good, {'data_step': 2})
  root = tmp_path / 'checkpoints'
  # A save killed mid-write: orbax's tmp directory (renamed to '<step>' only once complete).
  tmp = root / '6.orbax-checkpoint-tmp-1700000000000000'
  shutil.copytree(root / '2', tmp)
  (tmp / '_CHECKPOINT_METADATA').unlink()
  (tmp / 'commit_success.txt').unlink()
  # A step directory without the completion markers (e.g. a partial copy).
  shutil.copytree(root / '2' / 'state', root / '4' / 'state')
  with checkpointer(tmp_path) as ckpt:
    restored, extra = ckpt.restore_latest(jax.eval_shape(lambda: good), mesh)
    assert extra == {'data_step': 2}
    assert_trees_equal(restored, good)
    # Resuming then saving over the partial step works, and the stale tmp dir is cleaned up.
    assert ckpt.save(4, make_state(mesh, seed=4), {'data_step': 4})
  assert sorted(os.listdir(root)) == ['2', '4']
  with checkpointer(tmp_path) as ckpt:
    assert ckpt.restore_latest(jax.eval_shape(lambda: good), mesh)[1] == {'data_step': 4}


def test_mismatched_fingerprint_refuses_and_modifies_nothing(tmp_path, mesh):
  state = make_state(mesh, seed=2)
  with checkpointer(tmp_path) as ckpt:
    ckpt.save(2, state, {'data_step': 2})
  before = snapshot(tmp_path)
  other = dict(FINGERPRINT, num_classes=100)
  ckpt = checkpointer(tmp_path, fingerprint=other)
  with pytest.raises(checkpoints.CheckpointMismatchError) as err:
    ckpt.restore_latest(jax.eval_shape(lambda: state), mesh)
  ckpt.close()
  assert isinstance(err.value, ValueError)
  msg = str(err.value)
  assert 'num_classes' in msg and '10' in msg and '100' in msg and '--workdir' in msg
  assert 'image_size' not in msg and 'method' not in msg
  assert snapshot(tmp_path) == before


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGHUP], ids=['SIGTERM', 'SIGHUP'])
def test_sigterm_requests_a_save_without_killing(tmp_path, sig):
  previous = signal.getsignal(sig)
  ckpt = checkpointer(tmp_path, every_steps=100)
  try:
    assert not ckpt.preempted and not ckpt.should_save(7)
    os.kill(os.getpid(), sig)
    assert ckpt.preempted and ckpt.stop_reason == signal.Signals(sig).name
    assert ckpt.should_save(7) and ckpt.should_save(13)
  finally:
    ckpt.close()
  assert signal.getsignal(sig) is previous


def test_sighup_stays_ignored_under_nohup(tmp_path):
  previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
  try:
    with checkpointer(tmp_path, every_steps=100):
      assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGHUP, previous)


def test_multihost_signals_go_to_jax_preemption_service(tmp_path, monkeypatch):
  """With several processes, SIGINT / SIGHUP become SIGTERM for jax's preemption service (which
  agrees on the save step across processes); the process never decides to save on its own."""
  with checkpointer(tmp_path, every_steps=100) as ckpt:
    monkeypatch.setattr(checkpoints.jax, 'process_count', lambda: 2)
    assert checkpoints._stop_signals() == (signal.SIGINT, signal.SIGHUP)  # SIGTERM stays jax's
    sent = []
    monkeypatch.setattr(checkpoints.os, 'kill', lambda pid, sig: sent.append((pid, sig)))
    ckpt._on_signal(signal.SIGHUP, None)
    assert sent == [(os.getpid(), signal.SIGTERM)] and not ckpt.preempted
    assert ckpt.stop_reason == 'SIGHUP'
    monkeypatch.undo()


def test_load_inference_variables(tmp_path, mesh):
  with pytest.raises(FileNotFoundError):
    checkpoints.load_inference_variables(str(tmp_path))
  state = make_state(mesh, seed=6)
  with checkpointer(tmp_path) as ckpt:
    ckpt.save(2, make_state(mesh, seed=5), {})
    ckpt.save(6, state, {})
  variables, fingerprint = checkpoints.load_inference_variables(str(tmp_path))
  assert fingerprint == FINGERPRINT
  assert set(variables) == {'params', 'batch_stats', 'batch_stats_adv'}
  assert all(type(x) is np.ndarray for x in jax.tree.leaves(variables))
  assert_trees_equal(variables, {'params': state.ema_params, **state.ema_model_state})
  raw, _ = checkpoints.load_inference_variables(str(tmp_path), ema=False)
  assert_trees_equal(raw, {'params': state.params, **state.model_state})
  older = make_state(mesh, seed=5)  # a given step (evaluate --watch): not the newest
  variables, _ = checkpoints.load_inference_variables(str(tmp_path), step=2)
  assert_trees_equal(variables, {'params': older.ema_params, **older.ema_model_state})
  with pytest.raises(FileNotFoundError, match='No complete checkpoint step 4 in'):
    checkpoints.load_inference_variables(str(tmp_path), step=4)


def test_orbax_preemption_signal_requests_a_save(tmp_path, monkeypatch):
  with checkpointer(tmp_path, every_steps=100) as ckpt:
    monkeypatch.setattr(ckpt._manager, 'reached_preemption', lambda step: step == 9)
    assert not ckpt.should_save(8) and not ckpt.preempted
    assert ckpt.should_save(9) and ckpt.preempted


_EXIT_SCRIPT = """
import sys, jax, jax.numpy as jnp
from advprop_jax import checkpoints
ckpt = checkpoints.Checkpointer(sys.argv[1], every_steps=1, keep=1, config_fingerprint={'m': 1})
state = {'w': jnp.arange(1 << 20, dtype=jnp.float32)}
assert ckpt.save(1, state, {'data_step': 1})
print('saved', flush=True)
"""  # exits normally with the async save possibly in flight and without close()


def test_in_flight_async_save_is_finished_at_normal_exit(tmp_path):
  import subprocess
  import sys
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='',
             PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         os.environ.get('PYTHONPATH', '')]))
  out = subprocess.run([sys.executable, '-c', _EXIT_SCRIPT, str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=90)
  assert out.returncode == 0 and 'saved' in out.stdout, out.stderr[-2000:]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']
  assert os.path.exists(tmp_path / 'checkpoints' / '1' / '_CHECKPOINT_METADATA')


def test_checkpoint_dir_keeps_a_bucket_path_and_makes_a_local_one_absolute():
  # os.path.abspath('gs://b/run') is '<cwd>/gs:/b/run': a pod run would have saved on its VM's disk.
  assert checkpoints.checkpoint_dir('gs://bucket/run') == 'gs://bucket/run/checkpoints'
  assert checkpoints.checkpoint_dir('run') == os.path.join(os.getcwd(), 'run', 'checkpoints')
