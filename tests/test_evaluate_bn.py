"""evaluate --bn: the weights of a saved run evaluated through an auxiliary BatchNorm."""
import json

from advprop_jax import cli
from advprop_jax import evaluate as evaluate_cli
from export_fixtures import demo_workdir


def test_evaluate_through_the_auxiliary_bn(tmp_path, capsys):
  """evaluate --bn=adv: the same weights through AdvProp's adversarial BNs (its own report); a
  distribution the run does not have is one line, exit 2."""
  workdir, _ = demo_workdir(tmp_path / 'run')
  data = f'--config.data.data_dir={tmp_path / "tfds"}'
  losses = {}
  for bn in ('clean', 'adv'):
    out = tmp_path / f'eval_{bn}'
    assert cli.call(evaluate_cli.define_flags, evaluate_cli.main, 'evaluate',
                    [f'--workdir={workdir}', '--config=configs/demo.py', data, f'--bn={bn}',
                     '--evaluators=clean', f'--output={out}']) in (0, None)
    saved = json.loads((out / 'eval_metrics.json').read_text())
    assert saved['meta']['bn'] == bn
    losses[bn] = saved['results']['clean']['loss']
  assert losses['clean'] != losses['adv']
  assert 'through the auxiliary BN' in (tmp_path / 'eval_adv' / 'report.md').read_text()
  capsys.readouterr()
  status = cli.call(evaluate_cli.define_flags, evaluate_cli.main, 'evaluate',
                    [f'--workdir={workdir}', '--config=configs/demo.py', data, '--bn=adv2',
                     '--evaluators=clean', f'--output={tmp_path / "eval_adv2"}'])
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert status == 2 and len(err) == 1 and "distribution 'adv2'" in err[0], err
  assert not (tmp_path / 'eval_adv2').exists()
