"""The sidecar evaluator, `evaluate --watch` (eval/watch.py, issue #27): every checkpoint once, in
step order, keep-N deletions skipped, restarts continue after the last record, exit 0 after the
final one."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from advprop_jax import checkpoints
from advprop_jax import cli
from advprop_jax import evaluate as evaluate_cli
from advprop_jax import workdir as workdir_lib
from advprop_jax.eval import watch
from export_fixtures import demo_workdir, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save(workdir, *steps):
  """Complete checkpoints at `steps` whose EMA weights are the step, the raw ones minus the step."""
  checkpointer = checkpoints.Checkpointer(str(workdir), every_steps=1, keep=100,
                                          config_fingerprint={}, async_save=False)
  for step in steps:
    w = np.full([2], float(step), np.float32)
    checkpointer.save(step, dict(step=np.int32(step), params={'w': -w}, model_state={'bn': -w},
                                 opt_state={}, ema_params={'w': w}, ema_model_state={'bn': w}), {},
                      force=True)
  checkpointer.close()


def _finish(workdir, step):
  (workdir / 'final_metrics.json').write_text(json.dumps({'step': step, 'ema_clean_top1': .5}))


class FakeEvaluator:
  """evaluate(variables, step): top1 = the weights' value / 100, so a step's own weights show."""

  def __init__(self, on_step=None):
    self.steps, self.on_step = [], on_step

  def __call__(self, variables, step):
    self.steps.append(step)
    if self.on_step:
      self.on_step(step)
    value = float(variables['params']['w'][0])
    return {'clean': dict(status='ok', top1=value / 100, top5=1.0, count=10, seconds=0.1),
            'imagenet_a': dict(status='skipped', reason='needs ImageNet')}


class FakeWriter:
  def __init__(self):
    self.scalars = []

  def write_scalars(self, step, values):
    self.scalars.append((step, dict(values)))

  def flush(self):
    pass


def _watcher(workdir, evaluate, **kwargs):
  kwargs.setdefault('poll_seconds', 0.01)
  kwargs.setdefault('timeout_seconds', 30)
  return watch.Watcher(str(workdir), evaluate, **kwargs)


def _recorded(workdir, ema=True):
  return [r['step'] for r in watch.read_records(watch.output_dir(str(workdir), ema))]


def _prepare_out(workdir, ema=True):
  os.makedirs(watch.output_dir(str(workdir), ema), exist_ok=True)


def test_every_checkpoint_once_in_step_order_then_exit_at_the_final_one(tmp_path):
  _save(tmp_path, 12, 4, 8)
  _finish(tmp_path, 12)
  _prepare_out(tmp_path)
  fake, writer = FakeEvaluator(), FakeWriter()
  assert _watcher(tmp_path, fake, writer=writer).run() == 0
  assert fake.steps == [4, 8, 12] == _recorded(tmp_path)
  records = watch.read_records(str(tmp_path / 'eval_watch'))
  assert [r['scalars'] for r in records] == [{'clean/top1': s / 100, 'clean/top5': 1.0,
                                              'clean/seconds': .1} for s in (4, 8, 12)]
  assert records[0]['weights'] == 'ema'
  assert records[0]['results']['imagenet_a']['status'] == 'skipped'
  assert [s for s, _ in writer.scalars] == [4, 8, 12]
  assert writer.scalars[1][1]['clean/top1'] == .08
  # Nothing left to do: a rerun evaluates nothing and exits at once.
  again = FakeEvaluator()
  assert _watcher(tmp_path, again).run() == 0 and again.steps == []


def test_raw_weights_go_to_their_own_directory(tmp_path):
  _save(tmp_path, 3)
  _finish(tmp_path, 3)
  _prepare_out(tmp_path, ema=False)
  assert _watcher(tmp_path, FakeEvaluator(), ema=False).run() == 0
  records = watch.read_records(str(tmp_path / 'eval_watch' / 'raw'))
  assert [(r['step'], r['weights'], r['scalars']['clean/top1']) for r in records] == [
      (3, 'raw', -.03)]
  assert _recorded(tmp_path) == []


def test_restart_continues_after_the_last_recorded_step(tmp_path):
  _save(tmp_path, 2, 4, 6)
  _finish(tmp_path, 6)
  _prepare_out(tmp_path)

  def killed_at_4(step):
    if step == 4:
      raise KeyboardInterrupt  # killed mid-evaluation: step 4 is not recorded
  with pytest.raises(KeyboardInterrupt):
    _watcher(tmp_path, FakeEvaluator(killed_at_4)).run()
  assert _recorded(tmp_path) == [2]
  path = tmp_path / 'eval_watch' / 'records.jsonl'
  with open(path, 'a') as f:
    f.write('{"step": 4, "weigh')  # a record cut short by a kill or a full disk
  fake = FakeEvaluator()
  assert _watcher(tmp_path, fake).run() == 0
  assert fake.steps == [4, 6] and _recorded(tmp_path) == [2, 4, 6]
  assert path.read_text().count('\n') == 3


def test_checkpoints_deleted_by_keep_n_are_skipped(tmp_path, monkeypatch, caplog):
  _save(tmp_path, 2, 4, 6, 8)
  _finish(tmp_path, 8)
  _prepare_out(tmp_path)
  directory = tmp_path / 'checkpoints'

  def keep_n(step):  # the run deletes 4 while the watcher evaluates 2
    if step == 2:
      shutil.rmtree(directory / '4')
  load = checkpoints.load_inference_variables

  def deleted_while_loading(workdir, **kwargs):  # listed, then gone before its arrays are read
    if kwargs['step'] == 6:
      shutil.rmtree(directory / '6')
    return load(workdir, **kwargs)
  monkeypatch.setattr(checkpoints, 'load_inference_variables', deleted_while_loading)
  fake = FakeEvaluator(keep_n)
  caplog.set_level('INFO')
  assert _watcher(tmp_path, fake).run() == 0
  assert fake.steps == [2, 8] == _recorded(tmp_path)
  assert 'Checkpoint step 6 was deleted (keep_checkpoints) before it was evaluated' in caplog.text


def _read_cut_short():
  """What orbax leaves behind when a checkpoint vanishes mid-restore: a tensorstore read awaited in
  an event loop that is closed (the restore failed first) and resolves later; returns its promise."""
  import asyncio  # pylint: disable=g-import-not-at-top
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  promise, future = ts.Promise.new()

  async def restore():
    async def missing_file():
      raise FileNotFoundError('gone')
    await asyncio.gather(future, missing_file())
  loop = asyncio.new_event_loop()
  with pytest.raises(FileNotFoundError):
    loop.run_until_complete(restore())
  loop.close()
  return promise


def test_a_read_cut_short_by_keep_n_prints_no_traceback(tmp_path, monkeypatch):
  _save(tmp_path, 2, 4)
  _finish(tmp_path, 4)
  _prepare_out(tmp_path)
  printed = []  # what Python's hook would print (a traceback each)
  monkeypatch.setattr(sys, 'unraisablehook', lambda u: printed.append(str(u.exc_value)))
  _read_cut_short().set_result(0)  # control: outside the watcher it reaches the hook
  assert printed == ['Event loop is closed']

  load = checkpoints.load_inference_variables

  def cut_short(workdir, **kwargs):  # step 2 deleted by the run while its arrays are read
    if kwargs['step'] != 2:
      return load(workdir, **kwargs)
    shutil.rmtree(tmp_path / 'checkpoints' / '2')
    _read_cut_short().set_result(0)
    raise FileNotFoundError('gone')
  monkeypatch.setattr(checkpoints, 'load_inference_variables', cut_short)
  fake = FakeEvaluator()
  assert _watcher(tmp_path, fake).run() == 0 and fake.steps == [4]
  assert printed == ['Event loop is closed']  # none from the watcher's cut-short read
  _read_cut_short().set_result(0)  # and the previous hook is back afterwards
  assert printed == ['Event loop is closed'] * 2


def test_waits_for_the_run_and_detects_its_final_checkpoint(tmp_path):
  """Started before the run wrote anything; final_metrics.json names step 4 before its checkpoint is
  listed here: the watcher waits for it, evaluates it and stops."""
  _prepare_out(tmp_path)
  looks = []

  def sleep(seconds):  # the run advances while the watcher waits
    looks.append(seconds)
    if len(looks) == 2:
      _save(tmp_path, 2)
    elif len(looks) == 4:
      _finish(tmp_path, 4)
    elif len(looks) == 6:
      _save(tmp_path, 4)
  fake = FakeEvaluator()
  assert _watcher(tmp_path, fake, sleep=sleep, poll_seconds=7).run() == 0
  assert fake.steps == [2, 4] == _recorded(tmp_path) and set(looks) == {7}
  assert len(looks) == 6  # exited right after the final step, without another look


def test_timeout_without_new_checkpoints_is_status_1(tmp_path):
  _save(tmp_path, 2)
  _prepare_out(tmp_path)
  now = [0.0]

  def sleep(seconds):
    now[0] += seconds
  watcher = _watcher(tmp_path, FakeEvaluator(), sleep=sleep, clock=lambda: now[0], poll_seconds=10,
                     timeout_seconds=60)
  with pytest.raises(cli.Failure) as info:
    watcher.run()
  assert info.value.code == 1 and 'no new checkpoint' in str(info.value)
  assert 'evaluated up to step 2' in str(info.value) and _recorded(tmp_path) == [2]
  assert now[0] == 60


def test_a_record_that_cannot_be_written_leaves_the_file_as_it_was(tmp_path, monkeypatch):
  watch.append_record(str(tmp_path), {'step': 1})
  def no_space(fd):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(os, 'fsync', no_space)
  with pytest.raises(cli.WriteError, match='the watch records .*No space left on device'):
    watch.append_record(str(tmp_path), {'step': 2})
  assert (tmp_path / 'records.jsonl').read_text() == '{"step": 1}\n'


def test_all_evaluators_skipped_is_status_1_and_records_nothing(tmp_path):
  _save(tmp_path, 2)
  _prepare_out(tmp_path)
  skipped = lambda variables, step: {'stylized': dict(status='skipped', reason='no folder')}
  with pytest.raises(cli.Failure, match='every evaluator was skipped at step 2'):
    _watcher(tmp_path, skipped).run()
  assert _recorded(tmp_path) == []


def test_scalars_flatten_nested_results():
  results = {'pgd': {'status': 'ok', 'by_epsilon_pixels': {'4': {'top1': .5, 'count': 9,
                                                                 'num_steps': 5}}},
             'corruptions': {'status': 'ok', 'mce': np.float32(.25), 'suite': 'digits'},
             'stylized': {'status': 'skipped', 'reason': 'x'}}
  assert watch.scalars(results) == {'pgd/by_epsilon_pixels/4/top1': .5, 'corruptions/mce': .25}


@pytest.mark.parametrize('args,message', [
    (['--watch', '--output=/tmp/x'], '--output is for a single evaluation'),
    (['--timeout_seconds=5'], 'go with --watch'),
    (['--watch', '--poll_seconds=0'], '--poll_seconds=0: must be positive'),
    (['--watch', '--bn=adv'], '--bn is for a single evaluation'),
])
def test_bad_watch_flags_are_one_line_exit_2(tmp_path, capsys, args, message):
  status = cli.call(evaluate_cli.define_flags, evaluate_cli.main, 'evaluate',
                    [f'--workdir={tmp_path}', *args])
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert status == 2 and len(err) == 1 and message in err[0], err
  assert os.listdir(tmp_path) == []


def test_a_second_watcher_of_the_same_weights_is_refused(tmp_path, capsys):
  (tmp_path / 'config.json').write_text(load_config('demo').to_json_best_effort())
  out = watch.output_dir(str(tmp_path))
  os.makedirs(out)
  with workdir_lib.Lock(out):
    status = cli.call(evaluate_cli.define_flags, evaluate_cli.main, 'evaluate',
                      [f'--workdir={tmp_path}', '--watch'])
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert status == 2 and len(err) == 1 and 'another watcher (pid' in err[0], err


def test_watch_cli_evaluates_a_saved_run_and_writes_tensorboard(tmp_path, capsys):
  """The real wiring (config.json, model, evaluators, TensorBoard writer) on a finished run."""
  workdir, _ = demo_workdir(tmp_path / 'run')  # one checkpoint, step 10
  config = load_config('demo')
  config.data.data_dir = str(tmp_path / 'tfds')
  (tmp_path / 'run' / 'config.json').write_text(config.to_json_best_effort())
  _finish(tmp_path / 'run', 10)
  args = [f'--workdir={workdir}', '--watch', '--evaluators=clean', '--poll_seconds=0.1']
  assert cli.call(evaluate_cli.define_flags, evaluate_cli.main, 'evaluate', args) == 0
  records = watch.read_records(watch.output_dir(workdir))
  assert [r['step'] for r in records] == [10] and records[0]['results']['clean']['count'] == 360
  assert _tensorboard_steps(watch.output_dir(workdir))['clean/top1'] == {10}
  assert cli.call(evaluate_cli.define_flags, evaluate_cli.main, 'evaluate', args) == 0
  assert len(watch.read_records(watch.output_dir(workdir))) == 1  # nothing evaluated twice
  assert 'Traceback' not in capsys.readouterr().err


# -------------------------------------------------------------------- beside a real training run
STEPS = 160
# test_main.py's tiny demo, checkpointed every 4 steps, keeping 2 (keep-N deletes most of them).
TINY = ['--config.model_overrides.stages=((1,3,1,1,16),(1,3,2,6,24))',
        '--config.model_overrides.head_features=64',
        '--config.model_overrides.depthwise_impl=grouped', '--config.data.image_size=16',
        '--config.global_batch_size=32', f'--config.max_steps={STEPS}',
        '--config.checkpoint_every_steps=4', '--config.keep_checkpoints=2',
        '--config.log_every_steps=4', '--config.eval_every_epochs=100',
        '--config.eval_pgd_epsilons_pixels=(4.0,)']
ENV = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')


def _start_watcher(workdir, log):
  return subprocess.Popen(
      [sys.executable, '-m', 'advprop_jax.evaluate', f'--workdir={workdir}', '--watch',
       '--poll_seconds=0.5', '--timeout_seconds=300', '--evaluators=clean,pgd'],
      cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=ENV)


def _tensorboard_steps(directory):
  """{tag: {steps}} of the event files in `directory` (a killed writer's torn event ends one)."""
  import tensorflow as tf
  steps = {}
  for name in sorted(os.listdir(directory)):
    if name.startswith('events.out.tfevents'):
      try:
        for event in tf.compat.v1.train.summary_iterator(os.path.join(directory, name)):
          for value in event.summary.value:
            steps.setdefault(value.tag, set()).add(event.step)
      except tf.errors.DataLossError:
        pass
  return steps


def _steps_on_disk(workdir):
  directory = workdir / 'checkpoints'
  return {int(n) for n in os.listdir(directory) if n.isdigit()} if directory.exists() else set()


@pytest.mark.slow
def test_watcher_beside_a_training_run_killed_and_restarted(tmp_path):
  """Acceptance (#27): started before the run, SIGKILLed after its first record and restarted,
  the watcher records every checkpoint keep-N left it once, in order, and exits 0 after the final
  one."""
  workdir, data_dir = tmp_path / 'run', tmp_path / 'tfds'
  log_path, records = tmp_path / 'watch.log', workdir / 'eval_watch' / 'records.jsonl'
  seen = set()  # every checkpoint step that was on disk at some look
  with open(log_path, 'w') as log:
    watcher = _start_watcher(workdir, log)  # before the run exists
    trainer = subprocess.Popen(
        [sys.executable, '-m', 'advprop_jax.main', '--config=configs/demo.py',
         f'--workdir={workdir}', *TINY, f'--config.data.data_dir={data_dir}'], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 400
    while not (records.exists() and records.read_text().count('\n') >= 1):
      assert time.time() < deadline and watcher.poll() is None, log_path.read_text()[-3000:]
      seen |= _steps_on_disk(workdir)
      time.sleep(0.1)
    training = trainer.poll() is None
    watcher.send_signal(signal.SIGKILL)  # midway: (most likely) the run goes on
    watcher.wait()
    first = _recorded(workdir)
    watcher = _start_watcher(workdir, log)
    while trainer.poll() is None:
      seen |= _steps_on_disk(workdir)
      time.sleep(0.1)
    assert trainer.returncode == 0, trainer.stderr.read()[-3000:]
    assert watcher.wait(timeout=300) == 0, log_path.read_text()[-3000:]
  steps, survivors = _recorded(workdir), _steps_on_disk(workdir)
  print(f'recorded {steps} (before the kill: {first}, run still training then: {training}); '
        f'seen on disk {sorted(seen)}, kept {sorted(survivors)}')
  assert steps == sorted(set(steps)) and steps[:len(first)] == first and steps[-1] == STEPS
  assert len(first) < len(steps) and survivors <= set(steps) <= seen | survivors
  assert all(s % 4 == 0 for s in steps)
  text = log_path.read_text()
  assert 'Traceback' not in text and f'continuing after step {first[-1]}' in text
  tensorboard = _tensorboard_steps(workdir / 'eval_watch')
  for tag in ('clean/top1', 'pgd/by_epsilon_pixels/4/top1', 'pgd/by_epsilon_pixels/0/top1'):
    assert set(steps) <= tensorboard[tag] <= seen | survivors, tag
  record = watch.read_records(str(workdir / 'eval_watch'))[-1]
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert record['scalars']['clean/top1'] == pytest.approx(final['ema_clean_top1'])
  assert record['scalars']['pgd/by_epsilon_pixels/4/top1'] == pytest.approx(final['ema_pgd4_top1'])

