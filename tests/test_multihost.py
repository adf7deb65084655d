"""The multi-host path, as local processes over JAX's CPU collectives (issue #16): per-process input
shards, process 0 writing, every process in checkpointing, exact resume, one process failing,
signals to the launcher (issue #29)."""
import fcntl
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from advprop_jax import checkpoints
from advprop_jax import factories
from advprop_jax import parallel
from advprop_jax import step as step_lib
from advprop_jax.eval import saved_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config=configs/demo.py', '--config.model_overrides.stages=((1,3,1,1,16),(1,3,2,6,24))',
        '--config.model_overrides.head_features=64', '--config.model_overrides.depthwise_impl=grouped',
        '--config.data.image_size=16', '--config.global_batch_size=32', '--config.max_steps=12',
        '--config.checkpoint_every_steps=4', '--config.log_every_steps=4', '--config.eval_every_epochs=100',
        '--config.eval_pgd_epsilons_pixels=(4.0,)']
# Subprocesses share the suite's persistent compilation cache: a program compiled once is reused.
ENV = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='', JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='1',
           JAX_COMPILATION_CACHE_DIR=os.environ.get('ADVPROP_JAX_TEST_CACHE', os.path.join(REPO, '.jax_cache')))

pytestmark = pytest.mark.slow


def launch(workdir, data_dir, *extra, processes=2, timeout=900):
  cmd = [sys.executable, '-m', 'advprop_jax.launch_local', f'--processes={processes}', '--',
         *TINY, f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *extra]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV, timeout=timeout)


def final(workdir):
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory, data_dir):
  """An uninterrupted 2-process x 1-device run of the tiny demo (12 steps); both processes start with
  the dataset unprepared, so one prepares it while the other waits."""
  workdir = str(tmp_path_factory.mktemp('two') / 'run')
  result = launch(workdir, data_dir)
  assert result.returncode == 0, result.stdout[-4000:]
  return workdir, result.stdout


def test_two_processes_train_end_to_end(two_process_run):
  workdir, out = two_process_run
  metrics = final(workdir)
  assert metrics['eval_examples'] == 360 and metrics['step'] == 12  # exact eval over both processes
  assert 'JAX process 1 of 2, 1 local / 2 global devices' in out
  # Process 0 alone writes: one events file, one config.json, one progress line per interval.
  assert len(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))) == 1
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  assert '[process 0] ' in out and not [l for l in out.splitlines() if '[process 1]' in l and 'step 4/12' in l]
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit()) == [4, 8, 12]


def test_two_processes_as_two_slices_match_one_slice_with_the_same_bn_groups(tmp_path, data_dir):
  """Multislice (#28) on CPU: each process a slice, so the mesh has a slice axis of 2 and the
  gradient mean crosses it. With the same BN groups (per device: the demo's global BN would be one
  group of 2 on one slice, a group per slice on two) it is the same run. Both start together (the
  same code, half the wall time)."""
  runs = {}
  for name, extra in (('one', ()), ('two', ('--process_is_slice',))):
    cmd = [sys.executable, '-m', 'advprop_jax.launch_local', '--processes=2', '--', *TINY,
           f'--workdir={tmp_path / name}', f'--config.data.data_dir={data_dir}',
           '--config.bn_group_size=1', *extra]
    runs[name] = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
  out = {name: p.communicate(timeout=1200)[0] for name, p in runs.items()}
  assert [p.returncode for p in runs.values()] == [0, 0], out['two'][-4000:]
  meshes = {name: set(re.findall(r"mesh (\{[^}]*\})", text)) for name, text in out.items()}
  assert meshes == {'one': {"{'slice': 1, 'replica': 2, 'bn': 1}"},  # the same BN groups
                    'two': {"{'slice': 2, 'replica': 1, 'bn': 1}"}}, meshes
  assert final(str(tmp_path / 'two')) == final(str(tmp_path / 'one'))


def test_evaluated_and_exported_by_one_process(two_process_run, tmp_path):
  workdir, _ = two_process_run
  out = subprocess.run([sys.executable, '-m', 'advprop_jax.evaluate', f'--workdir={workdir}',
                        '--evaluators=clean', f'--output={tmp_path / "eval"}'], cwd=REPO,
                       capture_output=True, text=True, env=ENV, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  evaluated = json.loads((tmp_path / 'eval' / 'eval_metrics.json').read_text())['results']['clean']
  assert evaluated['count'] == 360
  assert abs(evaluated['top1'] - final(workdir)['ema_clean_top1']) <= 1 / 360  # 1 vs 2 devices
  out = subprocess.run([sys.executable, '-m', 'advprop_jax.export', f'--workdir={workdir}', '--format=flax',
                        f'--output={tmp_path / "export"}'], cwd=REPO, capture_output=True, text=True,
                       env=ENV, timeout=600)
  assert out.returncode == 0 and (tmp_path / 'export' / 'config.json').exists(), out.stderr[-3000:]


def test_checkpoint_of_two_devices_restores_on_one_and_on_four(two_process_run):
  workdir, _ = two_process_run
  config = saved_run.load_config(workdir)  # the run's config.json, as evaluate and export read it
  model = factories.build_model(config)
  tx, _ = factories.build_optimizer(config, 22.5)
  restored = []
  for n in (1, 4):
    mesh = parallel.create_mesh(-1, jax.devices()[:n])
    with checkpoints.Checkpointer(workdir, every_steps=100, keep=3,
                                  config_fingerprint=factories.fingerprint(config)) as ck:
      state, extra = ck.restore_latest(step_lib.abstract_train_state(model, tx, 16, mesh), mesh)
    assert int(state.step) == 12 and extra['data_step'] == 12
    assert {d.id for d in jax.tree.leaves(state)[0].sharding.device_set} == {d.id for d in jax.devices()[:n]}
    restored.append(jax.device_get(state))
  jax.tree.map(np.testing.assert_array_equal, restored[0], restored[1])  # weights, optimizer, EMA: exact
  ema, _ = checkpoints.load_inference_variables(workdir)
  np.testing.assert_array_equal(ema['params']['classifier']['kernel'],
                                restored[0].ema_params['classifier']['kernel'])


def test_resume_in_one_process_continues_the_run(two_process_run, tmp_path, data_dir):
  """Another process count resumes the state exactly and continues at its step; the data stream is then
  the new layout's (each process shuffles its own shard), as documented in docs/tpu.md."""
  workdir, _ = two_process_run
  copy = tmp_path / 'copy'
  subprocess.run(['cp', '-r', workdir, str(copy)], check=True)
  cmd = [sys.executable, '-m', 'advprop_jax.main', *TINY, f'--workdir={copy}',
         f'--config.data.data_dir={data_dir}', '--config.max_steps=16']
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'Starting at step 12 (resumed)' in out.stderr
  assert final(copy)['step'] == 16 and final(copy)['eval_examples'] == 360


def test_both_processes_killed_then_restarted_equals_uninterrupted(two_process_run, tmp_path, data_dir):
  reference, _ = two_process_run
  workdir = tmp_path / 'killed'
  cmd = [sys.executable, '-m', 'advprop_jax.launch_local', '--processes=2', '--', *TINY,
         f'--workdir={workdir}', f'--config.data.data_dir={data_dir}']
  launcher = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
  deadline = time.time() + 900
  while not (workdir / 'checkpoints' / '8').exists():
    assert launcher.poll() is None and time.time() < deadline
    time.sleep(0.2)
  # The trainers run in process groups of their own (launch_local): kill each, then the launcher.
  kill(children_of(launcher.pid) + [launcher.pid])
  launcher.wait()
  assert not (workdir / 'final_metrics.json').exists()
  resumed = launch(str(workdir), data_dir)
  assert resumed.returncode == 0 and 'resumed' in resumed.stdout, resumed.stdout[-3000:]
  assert final(str(workdir)) == final(reference)  # bitwise equal floats


def test_a_process_that_dies_alone_ends_the_job_with_a_clear_error(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  port = subprocess.run([sys.executable, '-c', 'from advprop_jax import launch_local as l; print(l.free_port())'],
                        cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
  common = [sys.executable, '-m', 'advprop_jax.main', *TINY, f'--workdir={workdir}',
            f'--config.data.data_dir={data_dir}', '--config.max_steps=100000',
            '--config.checkpoint_every_steps=100000', '--distributed=yes',
            f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', '--heartbeat_timeout_seconds=10']
  env = dict(ENV, JAX_NUM_CPU_DEVICES='1')
  first = subprocess.Popen(common + ['--process_id=0'], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
  second = subprocess.Popen(common + ['--process_id=1'], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  lines = []
  for line in first.stderr:  # until training runs
    lines.append(line)
    if 'step 8/' in line:
      break
  second.send_signal(signal.SIGKILL)
  killed = time.time()
  _, rest = first.communicate(timeout=300)
  assert time.time() - killed < 120 and first.returncode == 1, rest[-3000:]
  last = rest.strip().splitlines()[-1]
  assert 'another process of this job has stopped' in last and 'Fatal Python error' not in rest


def start_stoppable(workdir, data_dir):
  """A launcher of an endless 2-process run; returns (launcher, [trainer pids], output lines, step)
  once process 0 has logged step 3."""
  cmd = [sys.executable, '-m', 'advprop_jax.launch_local', '--processes=2', '--', *TINY,
         f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', '--config.max_steps=100000',
         '--config.checkpoint_every_steps=100000', '--config.log_every_steps=1']
  launcher = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
  lines = []
  for line in launcher.stdout:
    lines.append(line)
    running = re.search(r'^\[process 0\] .*\] step (\d+)/', line)
    if running and int(running.group(1)) >= 3:
      return launcher, children_of(launcher.pid), lines, int(running.group(1))
  raise AssertionError(''.join(lines[-40:]))


def children_of(pid):
  found = []
  for entry in os.listdir('/proc'):
    try:
      with open(f'/proc/{entry}/stat') as f:
        if entry.isdigit() and int(f.read().rsplit(')', 1)[1].split()[1]) == pid:
          found.append(int(entry))
    except (OSError, ValueError):
      pass  # gone meanwhile
  assert len(found) == 2, found
  return found


def alive(pid):
  try:
    os.kill(pid, 0)
    with open(f'/proc/{pid}/stat') as f:  # a zombie (exited, not yet reaped) is not alive
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except (ProcessLookupError, FileNotFoundError):
    return False


def assert_stopped_and_saved(workdir, pids, signalled_at, step):
  """Within 30 s of the signal no process of the job is alive, the workdir is free, and one complete
  checkpoint at or after the signal's step exists (nothing half-written)."""
  while any(alive(p) for p in pids) and time.time() < signalled_at + 30:
    time.sleep(0.2)
  assert not [p for p in pids if alive(p)]
  with open(workdir / '.lock', 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while a process holds the workdir
  saved = os.listdir(workdir / 'checkpoints')
  assert len(saved) == 1 and int(saved[0]) >= step, saved
  assert os.path.exists(workdir / 'checkpoints' / saved[0] / '_CHECKPOINT_METADATA')
  return int(saved[0])


def kill(pids):
  for pid in pids:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_a_signal_to_the_launcher_saves_and_stops_every_process(tmp_path, data_dir, sig):
  workdir = tmp_path / 'run'
  launcher, pids, lines, step = start_stoppable(workdir, data_dir)
  try:
    launcher.send_signal(sig)
    sent = time.time()
    out, _ = launcher.communicate(timeout=60)
    saved = assert_stopped_and_saved(workdir, pids + [launcher.pid], sent, step)
  finally:
    kill(pids + [launcher.pid])
  out = ''.join(lines) + out
  assert launcher.returncode == 0, out[-4000:]
  name = signal.Signals(sig).name
  stopped = [l for l in out.splitlines() if 'Stop requested' in l]
  assert len(stopped) == 2 and all(f'checkpoint at step {saved} saved' in l for l in stopped), out
  said = [l for l in out.splitlines() if l.startswith('[launch_local]')]
  assert len(said) == 2 and said[0].startswith(f'[launch_local] {name}: forwarded'), said
  assert said[1].startswith(f'[launch_local] stopped by {name}: every process saved'), said
  assert 'Traceback' not in out and 'Exception ignored' not in out, out[-4000:]


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='PR_SET_PDEATHSIG is Linux only')
def test_the_processes_stop_by_themselves_when_the_launcher_is_killed(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  launcher, pids, _, step = start_stoppable(workdir, data_dir)
  try:
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    assert_stopped_and_saved(workdir, pids, time.time(), step)  # they saved, then exited
  finally:
    kill(pids)
