"""Issue #29: a write that fails (disk full, no permission) is one line naming what was written
where, exit status 3 (cli.WRITE_FAILED), and leaves nothing half written. ENOSPC is injected at each
write site in-process; a slow test hits a real file-size limit (RLIMIT_FSIZE) in a training run."""
import errno
import glob
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest
from etils import epath

from advprop_jax import checkpoints
from advprop_jax import cli
from advprop_jax import convert
from advprop_jax import evaluate
from advprop_jax import export
from advprop_jax import main as main_cli
from advprop_jax import plan
from advprop_jax import trainer
from advprop_jax import workdir as workdir_lib
from advprop_jax.convert import savedmodel
from advprop_jax.eval import report
from advprop_jax.eval import saved_run
from export_fixtures import demo_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, 'configs', 'demo.py')
NO_SPACE = os.strerror(errno.ENOSPC)
# What TensorStore (through orbax) raises on a full disk: context layers, the spec, the errno.
TENSORSTORE_NO_SPACE = ('RESOURCE_EXHAUSTED: Error writing local file "/w/checkpoints/2.orbax-'
                        'checkpoint-tmp/state/_sharding": Failed to write 579 bytes to file 6: No '
                        'space left on device [tensorstore_spec=\'{"driver":"zarr"}\'] '
                        '[os_error_code=\'28\']')


def no_space(*args, **kwargs):
  raise OSError(errno.ENOSPC, NO_SPACE)


def _tree(root):
  return sorted(os.path.relpath(os.path.join(d, n), root)
                for d, dirs, files in os.walk(root) for n in dirs + files)


def _one_line(capsys, prog):
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and err[0].startswith(f'{prog}: error: cannot write '), err
  assert NO_SPACE in err[0], err
  return err[0]


def test_write_error_recognises_failed_writes_only():
  error = cli.write_error(OSError(errno.ENOSPC, NO_SPACE), 'the lock', '/w/.lock')
  assert isinstance(error, cli.WriteError) and error.code == cli.WRITE_FAILED == 3
  assert str(error) == (f'cannot write the lock (/w/.lock): {NO_SPACE}; nothing was left behind; '
                        'free disk space and rerun')
  ts = cli.write_error(ValueError(TENSORSTORE_NO_SPACE), 'x', '/w')
  assert isinstance(ts, cli.WriteError) and ts.reason == NO_SPACE and 'tensorstore' not in str(ts)
  other = ValueError('shape mismatch')
  assert cli.write_error(other, 'x', '/w') is other
  with pytest.raises(ValueError, match='shape mismatch'):
    with cli.writing('x', '/w'):
      raise other


def test_background_errors_are_dropped_while_they_are_raised_again(caplog):
  def record(path, level=logging.ERROR):
    return logging.LogRecord('absl', level, path, 1, 'Save failed\nTraceback ...', None, None)
  quiet = cli.BackgroundErrors()
  assert not quiet.filter(record('/venv/site-packages/orbax/checkpoint/future.py'))
  assert not quiet.filter(record('/venv/site-packages/clu/asynclib.py'))
  assert quiet.filter(record('/venv/site-packages/orbax/x.py', logging.WARNING))
  assert quiet.filter(record('/repo/advprop_jax/trainer.py'))
  assert quiet.dropped == ['Save failed', 'Save failed']
  with caplog.at_level('WARNING'), cli.BackgroundErrors() as quiet:  # not raised again: one warning
    quiet.dropped.append('orbax: could not delete step 1')
  assert 'could not delete step 1' in caplog.text


@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='needs /dev/full (Linux)')
def test_output_to_a_full_disk_is_one_line(capsys, monkeypatch):
  """predict writes no files; its output (like any CLI's) may go to a full disk: `> /dev/full`."""
  monkeypatch.setattr(sys, 'stdout', open('/dev/full', 'w'))  # pylint: disable=consider-using-with

  def prints(argv, flag_values):
    print('image.png\n  0.9  1  goldfish', flush=True)
  assert cli.call(lambda flag_values: None, prints, 'predict', []) == 3
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f'predict: error: cannot write the output (stdout): {NO_SPACE}; it is incomplete; '
                 'free disk space and rerun'], err


# ---------------------------------------------------------------------------------------- training
@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def test_full_disk_at_the_workdir_lock_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch,
                                                                       data_dir):
  real_open = open

  def full_disk_open(path, *args, **kwargs):  # the file is created, its first line does not fit
    handle = real_open(path, *args, **kwargs)
    return types.SimpleNamespace(fileno=handle.fileno, seek=handle.seek, truncate=handle.truncate,
                                 write=handle.write, read=handle.read, flush=no_space,
                                 close=handle.close)
  monkeypatch.setattr(workdir_lib, 'open', full_disk_open, raising=False)
  workdir = tmp_path / 'new' / 'run'
  status = cli.call(main_cli.define_flags, main_cli.main, 'advprop_jax.main',
                    [f'--config={DEMO}', f'--workdir={workdir}',
                     f'--config.data.data_dir={data_dir}'])
  line = _one_line(capsys, 'advprop_jax.main')
  assert status == 3 and f'the workdir lock ({workdir}/.lock)' in line
  assert not (tmp_path / 'new').exists()  # no empty .lock, no directories made for it


def test_run_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
  real_write = epath.Path.write_text

  def half_then_full(self, text, *args, **kwargs):
    real_write(self, text[:10])
    no_space()
  monkeypatch.setattr(epath.Path, 'write_text', half_then_full)
  with pytest.raises(cli.WriteError, match=f"the run's final_metrics.json .*{NO_SPACE}"):
    workdir_lib.write_final_metrics({'step': 1}, str(tmp_path))
  assert os.listdir(tmp_path) == []


class _Manager:
  """Stands in for orbax's CheckpointManager: step 1 complete; a save of step 2 in flight whose
  asynchronous write fails with TensorStore's full-disk error when it is waited on."""

  def __init__(self, directory):
    self.directory = epath.Path(directory)
    self.failed = False

  def save(self, step, args, force):
    self.wait_until_finished()  # as orbax's does: a failure of the save in flight is raised here
    (self.directory / f'{step}.orbax-checkpoint-tmp-1').mkdir(parents=True)
    return True

  def wait_until_finished(self):
    if any('tmp' in p.name for p in self.directory.iterdir()) and not self.failed:
      self.failed = True
      raise ValueError(TENSORSTORE_NO_SPACE)

  def all_steps(self):
    return [1]

  def reload(self):
    pass

  def close(self):
    pass


def test_a_failed_async_save_names_its_step_and_the_newest_complete_one(tmp_path, monkeypatch):
  ck = checkpoints.Checkpointer(str(tmp_path), every_steps=1, keep=3, config_fingerprint={})
  ck._cleaned_tmp = True  # pylint: disable=protected-access
  ck._manager.close()  # pylint: disable=protected-access
  ck._manager = _Manager(ck.directory)  # pylint: disable=protected-access
  step_1 = os.path.join(ck.directory, '1')
  for item in ('state', 'extra', 'fingerprint', '_CHECKPOINT_METADATA'):
    os.makedirs(os.path.join(step_1, item))
  assert ck.save(2, None, {}, force=True)  # started; its write fails in the background
  with pytest.raises(checkpoints.CheckpointWriteError) as info:
    ck.save(3, None, {}, force=True)  # orbax raises the failure of step 2 here
  message = str(info.value)
  assert message.startswith(f'cannot write checkpoint step 2 ({ck.directory}): {NO_SPACE}; the '
                            'newest complete checkpoint is step 1;'), message
  assert 'tensorstore' not in message and '\n' not in message
  assert sorted(os.listdir(ck.directory)) == ['1']  # the partial step 2 is removed
  ck.close()


def test_other_failed_writes_of_a_run_name_the_newest_checkpoint():
  clu_error = RuntimeError("Error '{{function_node __wrapped__FlushSummaryWriter_device_/job:l}} "
                           f"/w/events.out.tfevents.1.v2; {NO_SPACE}\n\tFailed to flush 2 events'")
  fake = types.SimpleNamespace(
      rerun_hint=lambda reason: 'the newest complete checkpoint is step 4; rerun')
  failure = trainer._write_failure(clu_error, fake, '/w')  # pylint: disable=protected-access
  assert str(failure) == (f'cannot write the TensorBoard summaries (/w/events.out.tfevents.1.v2): '
                          f'{NO_SPACE}; the newest complete checkpoint is step 4; rerun')
  for other in (RuntimeError('a bug'), PermissionError(errno.EACCES, 'Permission denied', '/data')):
    assert trainer._write_failure(other, fake, '/w') is other  # pylint: disable=protected-access


@pytest.mark.parametrize('kept', ['step 8', 'none'])
def test_nan_message_tells_what_is_kept_and_a_command_that_is_accepted(kept):
  fake = types.SimpleNamespace(wait=lambda: None, newest_complete=lambda: kept)
  with pytest.raises(trainer.NonFiniteLossError) as info:
    history = [(10, {'loss': 1.0}), (11, {'loss': float('nan')})]
    trainer._check_finite(history, fake)  # pylint: disable=protected-access
  message = str(info.value)
  assert message.startswith('Training loss is nan at step 11; stopping.')
  if kept == 'none':
    assert 'no checkpoint was written yet' in message and 'is kept' not in message
  else:  # resuming with another learning rate is a schedule change: the advice allows it
    assert '(step 8, before this step) is kept' in message and '--allow_schedule_change' in message
    flag_values = main_cli.flags.FlagValues()
    main_cli.define_flags(flag_values)
    assert 'allow_schedule_change' in flag_values  # the advice names a flag that exists


def test_profile_window_is_checked_up_front_and_written(tmp_path, caplog):
  def window(steps, start=0, total=20):
    config = types.SimpleNamespace(profile_steps=steps)
    return trainer._profile(config, str(tmp_path), start, total)  # pylint: disable=protected-access
  with caplog.at_level('WARNING'):
    assert window((25, 30)) is None and 'no profiler trace, the run ends at step 20' in caplog.text
    assert window((2, 5), start=10) is None and 'resumes at step 10' in caplog.text
    assert window((10, 30)).last == 20 and 'covers steps 11-20' in caplog.text
  profile = window((10, 15))
  profile(10)
  jax.block_until_ready(jax.jit(lambda x: x * 2)(jnp.ones(4)))
  profile(15)
  assert glob.glob(str(tmp_path / 'plugins' / 'profile' / '*' / '*.xplane.pb'))


# -------------------------------------------------------------------------- export, evaluate, plan
@pytest.fixture(scope='module')
def demo(tmp_path_factory):
  return demo_workdir(tmp_path_factory.mktemp('demo') / 'run')[0]


@pytest.mark.parametrize('fmt', ['flax', 'timm', 'savedmodel'])
def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(demo, tmp_path, capsys, monkeypatch,
                                                               fmt):
  def write_half_then_fail(target, error):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target if fmt == 'timm' else os.path.join(os.path.dirname(target), 'half'), 'w') as f:
      f.write('half')
    raise error
  if fmt == 'flax':  # orbax (TensorStore) raises a ValueError, not "the checkpoint does not fit"
    monkeypatch.setattr(export.ocp.StandardCheckpointer, 'save', lambda self, path, tree:
                        write_half_then_fail(path, ValueError(TENSORSTORE_NO_SPACE)))
  elif fmt == 'timm':
    monkeypatch.setattr(convert, 'save_timm_safetensors', lambda main, module, target, metadata:
                        write_half_then_fail(target, OSError(errno.ENOSPC, NO_SPACE)))
  else:  # TensorFlow's ResourceExhaustedError says it in its text
    monkeypatch.setattr(savedmodel, 'save_savedmodel', lambda module, main, target, **kwargs:
                        write_half_then_fail(target, RuntimeError(f'{target}/x.pb; {NO_SPACE}')))
  output = tmp_path / 'new' / ('w.safetensors' if fmt == 'timm' else 'out')
  assert export.call([f'--workdir={demo}', f'--format={fmt}', f'--output={output}']) == 3
  line = _one_line(capsys, 'export')
  assert f'the {fmt} export ({output})' in line and 'tensorstore' not in line
  assert os.listdir(tmp_path) == []


def test_export_says_which_step_it_exported(demo, tmp_path, capsys):
  output = tmp_path / 'w.safetensors'
  assert export.call([f'--workdir={demo}', '--format=timm', f'--output={output}']) == 0
  assert '(checkpoint step 10, the newest complete one)' in capsys.readouterr().out


def test_evaluate_names_a_truncated_config_json(tmp_path, capsys):
  (tmp_path / 'config.json').write_text('{"model": "efficientnet-b0", "data": {"dataset": "skle')
  status = cli.call(evaluate.define_flags, evaluate.main, 'evaluate', [f'--workdir={tmp_path}'])
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert status == 2 and len(err) == 1, err
  assert err[0].startswith(f'evaluate: error: {tmp_path / "config.json"}: not valid JSON'), err


@pytest.mark.parametrize('existing', [False, True])
def test_evaluate_report_on_a_full_disk_leaves_nothing_half_written(tmp_path, monkeypatch,
                                                                     existing):
  def half_then_full(output, meta, results):
    with open(os.path.join(output, 'eval_metrics.json'), 'w') as f:
      f.write('{"me')
    no_space()
  monkeypatch.setattr(report, 'write_outputs', half_then_full)
  output = tmp_path / 'eval' / 'out'
  if existing:
    output.mkdir(parents=True)
    (output / 'eval_metrics.json').write_text('{"earlier": 1}')
  with pytest.raises(cli.WriteError, match=f'the evaluation report .*{NO_SPACE}'):
    saved_run.write_report(str(output), {}, {})
  if existing:  # the earlier report stays whole
    assert _tree(tmp_path) == ['eval', 'eval/out', 'eval/out/eval_metrics.json']
    assert (output / 'eval_metrics.json').read_text() == '{"earlier": 1}'
  else:
    assert os.listdir(tmp_path) == []


def test_unwritable_outputs_are_refused_before_the_work(demo, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(os, 'access', lambda *a: False)  # read-only file system (root ignores modes)
  output = tmp_path / 'eval'
  status = cli.call(evaluate.define_flags, evaluate.main, 'evaluate',
                    [f'--workdir={demo}', f'--output={output}'])
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert status == 2 and err == [f'evaluate: error: --output={output}: {tmp_path} is not a '
                                 'writable directory'], err
  if plan.topologies.libtpu_available():  # else plan stops earlier, naming the missing compiler
    status = cli.call(plan.define_flags, plan.main, 'advprop_jax.plan',
                      [f'--config={DEMO}', '--topology=v4-8', f'--output={output}'])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and err == [f'advprop_jax.plan: error: --output={output}: {tmp_path} is '
                                   'not a writable directory'], err
  assert not output.exists()


RESULT = dict(model='efficientnet-b0', method='advprop', topology='v4-8', devices=4, processes=1,
              per_core_batch=8, per_core_bytes=2 ** 30, hbm_bytes_per_core=32 * 2 ** 30, fits=True,
              flops_per_step=3e12, flops_per_image=1e9, compile_s=5.0,
              no_projection="the size of dataset 'sklearn_digits' is not known here")


def test_plan_without_a_projection_prints_no_nan(tmp_path, capsys):
  plan._report(dict(RESULT), str(tmp_path / 'plans'))  # pylint: disable=protected-access
  out = capsys.readouterr().out
  assert 'nan' not in out and 'no projection of the run' in out
  assert '| - | - h / - h | - |' in plan.markdown_row(RESULT)
  assert sorted(os.listdir(tmp_path / 'plans')) == ['efficientnet-b0-advprop-v4-8.json',
                                                     'efficientnet-b0-advprop-v4-8.md']


def test_plan_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
  real_open = open

  def second_file_does_not_fit(path, mode='r', *args, **kwargs):
    if path.endswith('.md.tmp'):
      no_space()
    return real_open(path, mode, *args, **kwargs)
  monkeypatch.setattr(plan, 'open', second_file_does_not_fit, raising=False)
  with pytest.raises(cli.WriteError, match=f'the plan .*{NO_SPACE}'):
    plan._report(dict(RESULT), str(tmp_path / 'new' / 'plans'))  # pylint: disable=protected-access
  assert os.listdir(tmp_path) == []


# ------------------------------------------------------------- the CLI's one line, for real (slow)
@pytest.mark.slow
def test_training_whose_checkpoint_does_not_fit_is_one_line(tmp_path, data_dir):
  """A real failing write under orbax's async save: a file-size limit (RLIMIT_FSIZE, no root needed)
  that the config and the lock fit and a checkpoint's data file does not."""
  from test_main import TINY  # pylint: disable=g-import-not-at-top
  from advprop_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from advprop_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_file(DEMO)
  config.data.data_dir = data_dir
  input_pipeline.num_examples(config.data, 'train')  # prepares the dataset here, without the limit

  def limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
  workdir = tmp_path / 'run'
  proc = subprocess.run([sys.executable, '-m', 'advprop_jax.main', f'--config={DEMO}',
                         f'--workdir={workdir}', *TINY, f'--config.data.data_dir={data_dir}'],
                        cwd=REPO, capture_output=True, text=True, timeout=600, preexec_fn=limit,
                        env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))
  problems = [line for line in proc.stderr.splitlines()
              if line.strip() and not re.match(r'I\d{4} ', line)]  # absl's INFO lines
  assert proc.returncode == 3 and len(problems) == 1, proc.stderr[-3000:]
  assert problems[0].startswith(f'advprop_jax.main: error: cannot write checkpoint step 4 '
                                f'({workdir}/checkpoints): File too large; no checkpoint is '
                                'complete yet'), problems[0]
  assert not [n for n in os.listdir(workdir / 'checkpoints') if 'tmp' in n]
