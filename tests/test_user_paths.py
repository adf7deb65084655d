"""Issue #18: what a user meets on the training CLI — one-line exit-2 mistakes before anything is written,
the workdir lock, corrupt checkpoints, schedule changes, failing saves, evaluate with nothing to run."""
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from advprop_jax import checkpoints
from advprop_jax import cli
from advprop_jax import config as config_lib
from advprop_jax import evaluate
from advprop_jax import factories
from advprop_jax import main as main_cli
from advprop_jax import parallel
from advprop_jax import step as step_lib
from advprop_jax import workdir as workdir_lib
from export_fixtures import demo_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, 'configs', 'demo.py')


def train_cli(capsys, *argv):
  """(exit status, stderr lines) of the training CLI run in-process."""
  status = cli.call(main_cli.define_flags, main_cli.main, 'advprop_jax.main', list(argv))
  return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.mark.parametrize('argv, needle', [
    (['--config.lerning_rate=1'], 'did you mean "base_learning_rate"'),
    (['--config.attack.epsilon=2'], '--config.attack.epsilon: no such config field'),
    (['--config.global_batch_size=abc'], '--config.global_batch_size=abc'),
    (['--config.attack.epsilon_pixels=1000'], 'config.attack.epsilon_pixels=1000'),
    (['--config.max_steps=-5'], 'config.max_steps=-5'),
    (['--config.eval_pgd_epsilons_pixels=(-1.0,)'], 'config.eval_pgd_epsilons_pixels'),
    (['--config.model_overrides.width=-1'], 'width=-1'),
    (['--config.model_overrides.stage_sizes=(1,1)'], 'stage_sizes is not a field of model'),
    (['--config.afan.stage=9', '--config.method=afan'], 'config.afan.stage=9'),
    (['--confg=x'], 'Did you mean'),
    (['--distributed=no', '--process_id=1'], '--distributed=yes'),
])
def test_mistakes_are_one_line_exit_2_nothing_written(tmp_path, capsys, argv, needle):
  workdir = tmp_path / 'run'
  status, err = train_cli(capsys, f'--config={DEMO}', f'--workdir={workdir}', *argv)
  assert status == 2 and len(err) == 1 and needle in err[0], err
  assert not workdir.exists()


def test_config_file_mistakes_name_the_file(tmp_path, capsys):
  bad = tmp_path / 'bad.py'
  bad.write_text('def get_config(:\n  pass\n')
  for config, needle in ((str(bad), f'{bad}:1: syntax error'),
                         (str(tmp_path / 'missing.py'), 'missing.py: no such config file'),
                         (f'{REPO}/configs/efficientnet.py:b9', 'unknown model')):
    status, err = train_cli(capsys, f'--config={config}', f'--workdir={tmp_path / "run"}')
    assert status == 2 and len(err) == 1 and needle in err[0], err
  assert not (tmp_path / 'run').exists()


def test_recipe_configs_take_every_model_override(tmp_path, capsys):
  # Parsed and validated, then stopped by the missing ImageNet: the hint names the CLI's field.
  status, err = train_cli(capsys, f'--config={REPO}/configs/efficientnet.py:b0',
                          '--config.model_overrides.width=0.25', '--config.model_overrides.remat=True',
                          f'--config.data.data_dir={tmp_path / "tfds"}', f'--workdir={tmp_path / "run"}')
  assert status == 2 and len(err) == 1 and 'config.data.data_dir' in err[0], err
  assert 'data_config' not in err[0] and not (tmp_path / 'run').exists()


def test_num_classes_smaller_than_the_dataset(tmp_path, capsys, data_dir):
  status, err = train_cli(capsys, f'--config={DEMO}', f'--workdir={tmp_path / "run"}',
                          '--config.num_classes=5', f'--config.data.data_dir={data_dir}')
  assert status == 2 and 'config.num_classes=5' in err[-1] and '10 classes' in err[-1], err
  assert not (tmp_path / 'run').exists()


def test_workdir_that_is_a_file_or_not_writable(tmp_path, capsys, monkeypatch, data_dir):
  a_file = tmp_path / 'file'
  a_file.write_text('x')
  status, err = train_cli(capsys, f'--config={DEMO}', f'--workdir={a_file}',
                          f'--config.data.data_dir={data_dir}')
  assert status == 2 and len(err) == 1 and 'is a file' in err[0]
  monkeypatch.setattr(os, 'access', lambda *a: False)  # a read-only file system (root ignores modes)
  with pytest.raises(workdir_lib.WorkdirError, match='not writable'):
    workdir_lib.check_writable(str(tmp_path / 'new' / 'run'))


def test_a_second_run_on_a_locked_workdir_is_refused(tmp_path, capsys, data_dir):
  workdir = tmp_path / 'run'
  with workdir_lib.Lock(str(workdir)):
    status, err = train_cli(capsys, f'--config={DEMO}', f'--workdir={workdir}',
                            f'--config.data.data_dir={data_dir}')
  assert status == 2 and len(err) == 1 and 'in use by another run' in err[0] and f'pid {os.getpid()}' in err[0]
  assert sorted(os.listdir(workdir)) == ['.lock']
  # The lock dies with its process: a killed holder leaves only a stale file, which does not block.
  holder = subprocess.Popen([sys.executable, '-c', 'import sys; from advprop_jax import workdir as w; '
                             f'lock = w.Lock({str(workdir)!r}).acquire(); print("held", flush=True); '
                             'sys.stdin.read()'], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
  assert holder.stdout.readline().strip() == 'held'
  with pytest.raises(workdir_lib.WorkdirError):
    workdir_lib.Lock(str(workdir)).acquire()
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  workdir_lib.Lock(str(workdir)).acquire().release()


# ---------------------------------------------------------------------------------- checkpoints
def _state(mesh, value):
  """A TrainState as the trainer saves it, with incompressible weights (so data files are not tiny)."""
  w = {'w': np.random.default_rng(value).normal(size=[128, 128]).astype(np.float32)}
  state = step_lib.TrainState(step=np.int32(value), params=w, model_state={}, opt_state={}, ema_params=w,
                              ema_model_state={})
  return jax.device_put(state, parallel.replicated_sharding(mesh))


def _checkpointer(workdir, fingerprint, **kwargs):
  return checkpoints.Checkpointer(str(workdir), every_steps=1, keep=5, config_fingerprint=fingerprint,
                                  async_save=False, schedule_fields=factories.SCHEDULE_FIELDS, **kwargs)


@pytest.mark.parametrize('damage', ['truncate', 'flip', 'metadata'])
def test_unreadable_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage):
  mesh = parallel.create_mesh(-1)
  with _checkpointer(tmp_path, {'model': 'm'}) as ck:
    ck.save(1, _state(mesh, 1), {}, force=True)
    ck.save(2, _state(mesh, 2), {}, force=True)
  step_dir = tmp_path / 'checkpoints' / '2'
  if damage == 'metadata':
    os.remove(step_dir / 'state' / '_METADATA')
  else:  # every data file of the step (OCDBT keeps the arrays under .../d/)
    for data in (p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd'):
      raw = data.read_bytes()
      data.write_bytes(raw[:len(raw) // 2] if damage == 'truncate' else bytes(b ^ 0xFF for b in raw))
  with _checkpointer(tmp_path, {'model': 'm'}) as ck, caplog.at_level('WARNING'):
    state, _ = ck.restore_latest(jax.eval_shape(lambda: _state(mesh, 0)), mesh)
  assert int(state.step) == 1
  np.testing.assert_array_equal(state.params['w'], _state(mesh, 1).params['w'])
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert any('step 2' in w and 'cannot be restored' in w for w in warnings), warnings
  assert not any('tensorstore_spec' in w or '\n' in w for w in warnings), warnings  # issue #29
  kept = [n for n in os.listdir(tmp_path / 'checkpoints') if n.startswith('2.unreadable-')]
  assert len(kept) == 1 and not step_dir.exists()  # set aside, not deleted


def test_schedule_change_refused_unless_allowed(tmp_path):
  mesh = parallel.create_mesh(-1)
  config = config_lib.load_file(DEMO)
  with _checkpointer(tmp_path, factories.fingerprint(config)) as ck:
    ck.save(3, _state(mesh, 3), {}, force=True)
  listing = sorted(os.listdir(tmp_path / 'checkpoints'))
  changed = config_lib.load_file(DEMO)
  changed.global_batch_size = 128
  target = jax.eval_shape(lambda: _state(mesh, 0))
  with pytest.raises(checkpoints.CheckpointMismatchError, match='global_batch_size.*--allow_schedule_change'):
    with _checkpointer(tmp_path, factories.fingerprint(changed)) as ck:
      ck.restore_latest(target, mesh)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == listing
  with _checkpointer(tmp_path, factories.fingerprint(changed), allow_schedule_change=True) as ck:
    assert int(ck.restore_latest(target, mesh)[0].step) == 3
  # A checkpoint from before schedules were recorded resumes; unset overrides then and now agree.
  old = {k: v for k, v in factories.fingerprint(config).items() if k not in factories.SCHEDULE_FIELDS}
  old['model_overrides'] = dict(old['model_overrides'], stages=None, head_features=None)
  with _checkpointer(tmp_path / 'old', old) as ck:
    ck.save(1, _state(mesh, 1), {}, force=True)
  with _checkpointer(tmp_path / 'old', factories.fingerprint(changed)) as ck:
    assert int(ck.restore_latest(target, mesh)[0].step) == 1


def test_a_failing_save_is_one_error_naming_the_step(tmp_path, monkeypatch):
  mesh = parallel.create_mesh(-1)
  with _checkpointer(tmp_path, {}) as ck:
    ck.save(1, _state(mesh, 1), {}, force=True)
    def no_space(*args, **kwargs):
      raise OSError(28, 'No space left on device')
    monkeypatch.setattr(ck._manager, 'save', no_space)  # pylint: disable=protected-access
    with pytest.raises(checkpoints.CheckpointWriteError) as info:
      ck.save(2, _state(mesh, 2), {}, force=True)
  message = str(info.value)
  assert 'step 2' in message and 'No space left on device' in message and 'step 1' in message
  assert '\n' not in message


def test_evaluate_with_every_evaluator_skipped_is_an_error(tmp_path, capsys):
  workdir, _ = demo_workdir(tmp_path / 'run')
  status = cli.call(evaluate.define_flags, evaluate.main, 'evaluate',
                    [f'--workdir={workdir}', '--evaluators=imagenet_a,stylized'])
  err = capsys.readouterr()
  assert status == 1 and 'skipped' in err.err and '1000-class' in err.out


@pytest.mark.parametrize('tpu_attached', [False, True])
def test_libtpu_without_a_tpu_selects_the_cpu_backend(monkeypatch, tpu_attached):
  """requirements-tpu.txt installs libtpu for `plan`; off a TPU the CLIs must not start (and warn about)
  the TPU backend, on a TPU VM they must leave JAX's choice alone."""
  updates = []
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  monkeypatch.delenv('TPU_ACCELERATOR_TYPE', raising=False)
  monkeypatch.setattr(cli.importlib.util, 'find_spec', lambda name: object() if name == 'libtpu' else None)
  monkeypatch.setattr(cli.glob, 'glob', lambda pattern: ['/dev/accel0'] if tpu_attached else [])
  monkeypatch.setattr(jax.config, 'update', lambda *args: updates.append(args))
  cli._no_tpu_backend_without_a_tpu()  # pylint: disable=protected-access
  if tpu_attached:
    assert 'JAX_PLATFORMS' not in os.environ and not updates
  else:
    assert os.environ['JAX_PLATFORMS'] == 'cpu' and updates == [('jax_platforms', 'cpu')]
