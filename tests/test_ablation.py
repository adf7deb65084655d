"""advprop_jax.ablation: budget matching, table formatting, and a quick end-to-end run."""
import json
import os
import re

import numpy as np
import pytest

from advprop_jax import ablation
from advprop_jax import cli
from advprop_jax import factories

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'demo.py')


def _parse(cell):
  m = re.fullmatch(r'(-?\d+\.\d+) ± (\d+\.\d+)', cell)
  assert m, f'cell {cell!r} is not "mean ± std"'
  return float(m.group(1)), float(m.group(2))


@pytest.mark.parametrize('epochs', [1.0, 3.0, 30.0])
def test_every_method_gets_the_same_number_of_optimizer_steps(epochs):
  configs = {m: ablation.method_config(CONFIG, m, 0, epochs=epochs) for m in ablation.ALL_METHODS}
  spe = lambda c: factories.schedule(c, 1437).steps_per_epoch  # the digits' training split
  vanilla_spe = spe(configs['vanilla'])
  expected = int(epochs * 1437 / 64)  # the reference's int(epochs * N / batch): 22, 67, 673
  for name, c in configs.items():
    assert c.max_steps == expected, name
    assert int(c.num_epochs * spe(c)) == expected, name  # the LR schedule spans the same steps
    assert c.warmup_epochs * spe(c) == pytest.approx(2.0 * vanilla_spe), name
  assert factories.loader_batch_size(configs['fast_advprop']) == 80  # 1.25x the images per step
  assert configs['fine_grained_advprop'].fine_grained_epsilons_pixels == (2.0, 4.0)
  assert configs['afan'].afan.stage == 1
  assert configs['vanilla'].evaluate.corruptions.max_examples is None  # all images by default
  c = ablation.method_config(CONFIG, 'advprop', 0, epochs=epochs, corruption_examples=500)
  assert c.evaluate.corruptions.max_examples == 500


def test_table_mean_std_and_relative_step_time():
  runs = {'vanilla': {0: dict(clean=90.0, pgd=50.0, corruptions=70.0, step_ms=10.0),
                      1: dict(clean=92.0, pgd=52.0, corruptions=72.0, step_ms=30.0)},
          'advprop': {0: dict(clean=95.0, pgd=60.0, corruptions=80.0, step_ms=40.0)}}
  table = ablation.aggregate(runs)
  assert table['vanilla']['clean'] == pytest.approx((91.0, np.std([90, 92], ddof=1)))
  assert table['advprop']['rel_step'] == (2.0, 0.0)
  lines = ablation.markdown_table(table).splitlines()
  assert lines[2].split(' | ')[-1] == '1.00 ± 0.71 |'
  assert lines[3].startswith('| advprop | 1 | 95.0 ± 0.0 | 60.0 ± 0.0 | 80.0 ± 0.0 | 40.0 ± 0.0')


def test_paired_differences_per_corruption_and_aux_bn_rows():
  def run(clean, corr, aux_clean=None):
    r = dict(clean=clean, pgd=clean / 2, corruptions=corr, step_ms=10.0,
             per_corruption={'gaussian_noise': corr - 5, 'contrast': corr + 5})
    if aux_clean is not None:
      r['aux'] = {'adv': dict(clean=aux_clean, corruptions=corr + 1,
                              per_corruption={'gaussian_noise': corr, 'contrast': corr + 2})}
    return r
  runs = {'vanilla': {0: run(90.0, 70.0), 1: run(80.0, 60.0), 2: run(85.0, 65.0)},
          'advprop': {0: run(91.0, 74.0, 88.0), 1: run(82.0, 62.0, 79.0), 2: run(85.0, 70.0, 84.0)}}
  diffs = ablation.paired_differences(runs)
  assert list(diffs) == ['advprop', 'advprop (aux BN adv)']
  assert diffs['advprop']['clean'] == pytest.approx((1.0, np.std([1, 2, 0], ddof=1)))
  assert diffs['advprop']['corruptions'] == pytest.approx((11 / 3, np.std([4, 2, 5], ddof=1)))
  assert diffs['advprop (aux BN adv)']['clean'] == pytest.approx((-4 / 3, np.std([-2, -1, -1],
                                                                                 ddof=1)))
  assert np.isnan(diffs['advprop (aux BN adv)']['pgd'][0]) and diffs['advprop']['seeds'] == 3
  by_corruption = ablation.per_corruption_table(runs)
  assert by_corruption['vanilla']['contrast'] == pytest.approx((70.0, 5.0))
  assert by_corruption['advprop (aux BN adv)']['gaussian_noise'][0] == pytest.approx(206 / 3)
  table = ablation.aggregate(runs)
  assert list(table) == ['vanilla', 'advprop', 'advprop (aux BN adv)']
  assert '| advprop (aux BN adv) | 3 | 83.7 ± 4.5 | n/a |' in ablation.markdown_table(table)
  assert ablation.differences_markdown(diffs).splitlines()[2].startswith(
      '| advprop | 3 | 1.00 ± 1.00 | 0.50 ± 0.50 | 3.67 ± 1.53 |')
  assert ablation.corruption_markdown(by_corruption).splitlines()[0] == (
      '| method | gaussian_noise | contrast |')


@pytest.mark.slow
def test_quick_ablation_end_to_end(tmp_path):
  workdir = str(tmp_path / 'ablation')
  argv = [f'--workdir={workdir}', '--methods=vanilla,advprop', '--seeds=0', '--steps=3', '--quick',
          f'--config={CONFIG}']
  assert cli.call(ablation.define_flags, ablation.main, 'ablation', argv) == 0
  table = json.load(open(os.path.join(workdir, 'ablation.json')))['table']
  assert list(table) == ['vanilla', 'advprop', 'advprop (aux BN adv)']
  with open(os.path.join(workdir, 'ablation.md')) as f:
    text = f.read()
  tables = [t.splitlines() for t in re.findall(r'(?:^\|.*\n)+', text, re.M)]
  assert len(tables) == 3  # the main table, the paired differences, the per-corruption table
  rows = tables[0]
  header = [c.strip() for c in rows[0].strip('|').split('|')]
  assert header == ['method', 'seeds'] + list(ablation.COLUMNS)
  assert [r.split('|')[1].strip() for r in rows[2:]] == list(table)
  assert [r.split('|')[1].strip() for r in tables[1][2:]] == list(table)[1:]
  aux = [c.strip() for c in rows[-1].strip('|').split('|')]
  assert aux[3] == aux[5] == aux[6] == 'n/a' and 0 <= _parse(aux[2])[0] <= 100
  for row in rows[2:-1]:
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert len(cells) == len(header) and cells[1] == '1'
    values = [_parse(c) for c in cells[2:]]
    for (mean, std), column in zip(values, ablation.COLUMNS):
      assert std == 0.0  # one seed
      if '%' in column:
        assert 0.0 <= mean <= 100.0
      else:
        assert mean > 0.0
  assert _parse(rows[2].strip('|').split('|')[-1].strip())[0] == 1.0  # vanilla / vanilla
  assert '3 optimizer steps per run' in text
  assert os.path.getsize(os.path.join(workdir, 'ablation.png')) > 1000
  for method in ('vanilla', 'advprop'):
    run = os.path.join(workdir, method, 'seed0')
    assert os.path.exists(os.path.join(run, 'final_metrics.json'))
    assert os.path.exists(os.path.join(run, 'eval', 'eval_metrics.json'))
  assert os.path.exists(os.path.join(workdir, 'advprop', 'seed0', 'eval_bn_adv',
                                     'eval_metrics.json'))
  # Rerunning reads the finished runs back (no retraining) and gives the same table.
  assert cli.call(ablation.define_flags, ablation.main, 'ablation', argv) == 0
  assert json.load(open(os.path.join(workdir, 'ablation.json')))['table'] == table


@pytest.mark.parametrize('argv, message', [
    (['--seeds=0,x'], '--seeds'), (['--seeds=,'], '--seeds'), (['--methods=vanilla,magic'], 'magic')])
def test_bad_arguments_stop_before_training(tmp_path, capsys, argv, message):
  status = cli.call(ablation.define_flags, ablation.main, 'ablation', [f'--workdir={tmp_path}'] + argv)
  assert status == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1
  assert not list(tmp_path.iterdir())  # nothing written
