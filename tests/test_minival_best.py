"""Issue #27 items 2, 3 and 5: the minival holdout, the best checkpoint (keep_best_by, --step=best)
and the one evaluator plan."""
import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from advprop_jax import best_checkpoint
from advprop_jax import checkpoints
from advprop_jax import cli
from advprop_jax import config as config_lib
from advprop_jax import evaluate as evaluate_cli
from advprop_jax import export
from advprop_jax import factories
from advprop_jax import main as main_cli
from advprop_jax import predict
from advprop_jax.data import digits
from advprop_jax.data import input_pipeline
from advprop_jax.data import minival
from advprop_jax.eval import evaluators
from export_fixtures import demo_workdir, load_config, save_image
from test_data import fake_imagenet, imagenet_config  # noqa: F401  (a fixture: mocked ImageNet)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, 'configs', 'demo.py')
METRIC = 'minival/ema_clean_top1'


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _demo(data_dir, n=100, train_split='train'):
  config = load_config('demo')
  config.data.data_dir = data_dir
  config.data.minival_examples = n
  config.data.train_split = train_split
  return config


def _ids(builder, split) -> list:
  read = tfds.ReadConfig(add_tfds_id=True)
  return [x['tfds_id'] for x in builder.as_dataset(
      split=split, read_config=read, decoders={'image': tfds.decode.SkipDecoding()}
  ).as_numpy_iterator()]


def test_minival_ids_disjoint_from_trained_ids_and_the_same_everywhere(data_dir, monkeypatch):
  config = _demo(data_dir)
  builder = input_pipeline.prepared_builder(config.data)
  held = _ids(builder, minival.split(config.data, builder))
  assert len(held) == len(set(held)) == 100
  trained = {pc: [i for pi in range(pc)
                  for i in _ids(builder, input_pipeline.train_shard(config.data, builder, pi, pc))]
             for pc in (1, 2, 3)}
  for pc, ids in trained.items():  # every process count trains on the same examples, once each
    assert sorted(ids) == sorted(trained[1]) and len(ids) == digits.NUM_TRAIN - 100, pc
  assert not set(held) & set(trained[1])
  assert set(held) | set(trained[1]) == set(_ids(builder, 'train'))
  assert input_pipeline.num_train_examples(config.data) == digits.NUM_TRAIN - 100

  # What the trainer reads is that shard, from any resume step; the minival is a pure function of
  # the dataset and N (a fresh builder: a restarted or resumed run) at every process count.
  read = []
  monkeypatch.setattr(input_pipeline, '_records', lambda b, split, *a: read.append(split) or
                      builder.as_dataset(split=split, decoders={
                          'image': tfds.decode.SkipDecoding()}, read_config=tfds.ReadConfig(
                              add_tfds_id=True)))
  for start_step in (0, 7):
    input_pipeline.train_dataset(config.data, per_process_batch_size=8, seed=0,
                                 start_step=start_step, process_index=1, process_count=2)
  assert read == [input_pipeline.train_shard(config.data, builder, 1, 2)] * 2
  again = input_pipeline.prepared_builder(_demo(data_dir).data)
  assert _ids(again, minival.split(config.data, again)) == held
  monkeypatch.undo()
  count = sum(float(b['mask'].sum()) for pc in (1, 2) for pi in range(pc) for b in
              input_pipeline.eval_dataset(config.data, per_process_batch_size=32,
                                          split=minival.SPLIT, process_index=pi,
                                          process_count=pc).as_numpy_iterator())
  assert count == 2 * 100  # each example once, at 1 and at 2 processes

  # A sliced train split: the minival is the slice's first N, training the rest of the slice.
  sliced = _demo(data_dir, n=50, train_split='train[100:400]')
  assert minival.split(sliced.data, builder) == 'train[100:150]'
  assert minival.train_split(sliced.data, builder) == 'train[150:400]'


def test_image_folder_minival_never_trained_on_any_process_count_or_resume(tmp_path, monkeypatch):
  # What the pipelines yield, decoded: each image's colour says its class and number.
  from test_image_folder import data_config, decode, make_tree  # (its tree and decoder)
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  config = data_config(make_tree(tmp_path / 'images', {'train': 6, 'test': 2}), minival_examples=5)

  def examples(batches):
    out = []
    for b in batches:
      real = b['mask'] > 0 if 'mask' in b else np.ones(len(b['label']), bool)
      labels, numbers = decode(b['image'][real])
      np.testing.assert_array_equal(labels, b['label'][real])
      out += list(zip(labels.tolist(), numbers.tolist()))
    return out

  held = examples(b for pc in (1, 2) for pi in range(pc) for b in input_pipeline.eval_dataset(
      config, per_process_batch_size=4, split=minival.SPLIT, process_index=pi,
      process_count=pc).as_numpy_iterator())
  assert len(held) == 10 and len(set(held)) == 5  # the same 5 at 1 and at 2 processes
  everything = {(label, i) for label in range(3) for i in range(6)}
  for start_step in (0, 1):  # one epoch per batch: the first, and the one a resume at step 1 reads
    one = examples([next(input_pipeline.train_dataset(
        config, per_process_batch_size=13, seed=0, start_step=start_step).as_numpy_iterator())])
    two = examples([next(input_pipeline.train_dataset(
        config, per_process_batch_size=size, seed=0, start_step=start_step, process_index=pi,
        process_count=2).as_numpy_iterator()) for pi, size in ((0, 7), (1, 6))])
    for trained in (one, two):
      assert len(trained) == len(set(trained)) == 13 and set(trained) == everything - set(held)


def test_mocked_imagenet_minival(fake_imagenet):
  with fake_imagenet():  # tests/test_data.py's mocked TFDS imagenet2012: 23 train examples
    config = imagenet_config(minival_examples=5)
    builder = input_pipeline.prepared_builder(config)
    held = _ids(builder, minival.split(config, builder))
    trained = [i for pi in range(2) for i in _ids(builder, input_pipeline.train_shard(
        config, builder, pi, 2))]
    count = sum(float(b['mask'].sum()) for b in input_pipeline.eval_dataset(
        config, per_process_batch_size=4, split=minival.SPLIT).as_numpy_iterator())
    assert input_pipeline.num_train_examples(config) == 18
  assert len(set(held)) == 5 and len(trained) == len(set(trained)) == 18 and count == 5
  assert not set(held) & set(trained)


def test_plan_stages_share_the_table():
  config = load_config('demo')
  periodic = evaluators.plan(config, 'periodic')
  assert [n for n, _ in periodic] == ['clean'] and periodic[0][1]['tag'] == 'eval_ema/'
  final = dict(evaluators.plan(config, 'final'))
  assert final['clean']['weights'] == ('ema', 'raw') and final['pgd']['epsilons_pixels'] == (4.0,)
  assert final['pgd']['weights'] == ('ema',)
  config.data.minival_examples = 100
  (name, settings), = evaluators.plan(config, 'periodic')
  assert (name, settings['type'], settings['split']) == ('minival', 'clean', minival.SPLIT)
  assert [n for n, _ in evaluators.evaluator_plan(config)] == ['clean', 'pgd', 'corruptions',
                                                               'minival']
  assert best_checkpoint.periodic_metrics(config) == (
      'minival/ema_clean_top1', 'minival/ema_clean_top5', 'minival/ema_clean_loss')
  # The final table's keys come from each evaluator's own definition.
  entries = evaluators.plan(config, 'final')
  results = {'clean': dict(top1=0.5, top5=0.9, count=360, status='ok'),
             'pgd': dict(by_epsilon_pixels={'4': dict(top1=0.25)}, status='ok')}
  assert evaluators.final_scalars(entries, results, 'ema') == {
      'ema_clean_top1': 0.5, 'ema_clean_top5': 0.9, 'eval_examples': 360, 'ema_pgd4_top1': 0.25}


def _save(workdir, step, ema, metric, keep_best_by=METRIC):
  """One checkpoint of the demo model at `step` with EMA weights `ema`, saved with its metric."""
  ema_state = {k: v for k, v in ema.items() if k != 'params'}
  state = dict(step=np.int32(step), params=ema['params'], model_state=ema_state, opt_state={},
               ema_params=ema['params'], ema_model_state=ema_state)
  with checkpoints.Checkpointer(str(workdir), every_steps=1, keep=1, config_fingerprint={},
                                async_save=False, keep_best_by=keep_best_by) as ck:
    ck.save(step, state, {}, metrics=None if metric is None else {METRIC: metric})


def _steps(workdir):
  return sorted(int(p) for p in os.listdir(os.path.join(workdir, 'checkpoints')) if p.isdigit())


def test_best_checkpoint_survives_keep_n_and_step_best_exports_it(tmp_path, capsys):
  workdir, ema = demo_workdir(tmp_path / 'run')  # step 10, saved without a metric
  weights = {s: jax.tree.map(lambda a, s=s: a + s, ema) for s in (20, 30, 40, 50)}
  for step, top1 in ((20, 0.6), (30, 0.9), (40, 0.3)):  # later checkpoints are worse
    _save(workdir, step, weights[step], top1)
  assert _steps(workdir) == [30, 40]  # keep=1 plus the best, across Checkpointer restarts
  _save(workdir, 50, weights[50], None)  # e.g. a preemption save: ranked by recency only
  assert _steps(workdir) == [30, 50]

  out = tmp_path / 'best'
  assert export.call([f'--workdir={workdir}', '--format=flax', f'--output={out}',
                      '--step=best']) == 0
  assert '(checkpoint step 30, the best one)' in capsys.readouterr().out
  main = lambda step: export.inference_variables(export.run_config(workdir), weights[step])
  jax.tree.map(np.testing.assert_array_equal, export.load_exported_flax(str(out))[2], main(30))
  assert export.call([f'--workdir={workdir}', '--format=flax', f'--output={tmp_path / "n"}',
                      '--step=50']) == 0
  jax.tree.map(np.testing.assert_array_equal, export.load_exported_flax(str(tmp_path / 'n'))[2],
               main(50))
  capsys.readouterr()
  # predict reads the run's best checkpoint as export wrote it.
  image = save_image(tmp_path / 'x.png')
  assert predict.call([f'--checkpoint={workdir}', '--step=best', image]) == 0
  from_run = capsys.readouterr().out.splitlines()[1:]
  assert predict.call([f'--checkpoint={out}', image]) == 0
  assert capsys.readouterr().out.splitlines()[1:] == from_run
  # A better one replaces it, and the old best goes with keep-N.
  _save(workdir, 60, weights[50], 0.95)
  assert _steps(workdir) == [60]


def _one_line(capsys):
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1, err
  return err[0]


def test_step_best_without_a_best_is_one_line_exit_2_nothing_written(tmp_path, capsys):
  workdir, _ = demo_workdir(tmp_path / 'run')  # no metric recorded
  out = tmp_path / 'out'
  assert export.call([f'--workdir={workdir}', f'--output={out}', '--step=best']) == 2
  assert 'no best checkpoint recorded' in _one_line(capsys) and not out.exists()
  assert export.call([f'--workdir={workdir}', f'--output={out}', '--step=x']) == 2
  assert "--step=x: give a checkpoint step" in _one_line(capsys) and not out.exists()
  for step, needle in (('best', 'no best checkpoint recorded'),
                       ('7', 'No complete checkpoint step 7')):
    status = cli.call(evaluate_cli.define_flags, evaluate_cli.main, 'evaluate',
                      [f'--workdir={workdir}', f'--output={out}', f'--step={step}'])
    assert status == 2 and needle in _one_line(capsys) and not out.exists()
  image = save_image(tmp_path / 'x.png')
  assert predict.call([f'--checkpoint={workdir}', '--step=best', image]) == 2
  assert 'no best checkpoint recorded' in _one_line(capsys)


@pytest.mark.parametrize('argv, needle', [
    (['--config.keep_best_by=minival/ema_clean_top1'], 'minival/... metrics need'),
    (['--config.data.minival_examples=100', '--config.keep_best_by=minival/top1'],
     "config.keep_best_by='minival/top1' is not a metric"),
    (['--config.data.minival_examples=-1'], 'config.data.minival_examples=-1 must be >= 0'),
    (['--config.data.minival_examples=1437'],
     'minival_examples=1437 must be smaller than the 1437'),
])
def test_bad_values_are_one_line_exit_2_nothing_written(tmp_path, capsys, data_dir, argv, needle):
  workdir = tmp_path / 'run'
  status = cli.call(main_cli.define_flags, main_cli.main, 'advprop_jax.main',
                    [f'--config={DEMO}', f'--workdir={workdir}',
                     f'--config.data.data_dir={data_dir}', *argv])
  assert status == 2 and needle in _one_line(capsys) and not workdir.exists()


def test_minival_is_a_schedule_field():
  config = load_config('demo')
  config.data.minival_examples = 100
  assert factories.fingerprint(config)['data.minival_examples'] == 100
  assert 'data.minival_examples' in factories.SCHEDULE_FIELDS
  config_lib.validate(config, 1)
  assert json.loads(json.dumps(factories.fingerprint(config)))


def _scalars(directory, tag) -> dict:
  """{step: value} of TensorBoard scalar `tag` in the event files directly in `directory`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  values = {}
  for name in sorted(os.listdir(directory)):
    if 'tfevents' in name:
      for event in tf.compat.v1.train.summary_iterator(os.path.join(directory, name)):
        for value in event.summary.value:
          if value.tag == tag:
            values[event.step] = float(tf.make_ndarray(value.tensor))
  return values


@pytest.mark.slow
def test_training_with_minival_keeps_the_best_and_the_watcher_reports_minival(tmp_path, data_dir,
                                                                              capsys):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from test_main import TINY  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  # 1237 trained examples at batch 32: evaluation every 3 steps (3, 6, 9, and 12, the last);
  # checkpoints every 4 steps and at every evaluation; keep 1 plus the best.
  cmd = [sys.executable, '-m', 'advprop_jax.main', f'--config={DEMO}', f'--workdir={workdir}',
         *TINY,
         f'--config.data.data_dir={data_dir}', '--config.data.minival_examples=200',
         f'--config.keep_best_by={METRIC}', '--config.eval_every_epochs=0.08',
         '--config.keep_checkpoints=1']
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))
  assert result.returncode == 0, result.stderr[-3000:]
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert set(final) == {'ema_clean_top1', 'ema_clean_top5', 'raw_clean_top1', 'raw_clean_top5',
                        'eval_examples', 'ema_pgd4_top1', 'step'}
  assert final['eval_examples'] == digits.NUM_TEST and final['step'] == 12  # the test split
  minival_top1 = _scalars(str(workdir), METRIC)
  assert sorted(minival_top1) == [3, 6, 9, 12] and not _scalars(str(workdir), 'eval_ema/top1')
  assert _scalars(str(workdir), 'minival/ema_clean_count') == {s: 200 for s in (3, 6, 9, 12)}
  best = max(minival_top1, key=lambda s: (minival_top1[s], s))
  assert _steps(str(workdir)) == sorted({best, 12})

  # The sidecar reports the minival as minival/... for the steps that survived, with the trainer's
  # numbers (same EMA weights, same examples).
  assert cli.call(evaluate_cli.define_flags, evaluate_cli.main, 'evaluate',
                  [f'--workdir={workdir}', '--watch', '--evaluators=minival',
                   '--poll_seconds=1', '--timeout_seconds=60']) == 0
  records = [json.loads(line) for line in
             (workdir / 'eval_watch' / 'records.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == sorted({best, 12})
  for r in records:
    assert r['results']['minival']['count'] == 200
    assert r['scalars']['minival/top1'] == pytest.approx(minival_top1[r['step']], abs=1e-6)
