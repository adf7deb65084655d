"""Clean + robustness evaluation of a trained workdir.

  python -m advprop_jax.evaluate --workdir=DIR [--config=configs/x.py] [--evaluators=clean,pgd,...]
      [--output=DIR/eval] [--ema=true] [--stylized_dir=PATH]

Without --config the run's workdir/config.json is used. Evaluators (eval/evaluators.py, big_vision style:
names + settings) come from --evaluators, else config.evaluate.evaluators, else a default list (digits:
clean, pgd, corruptions; ImageNet: all); config.evaluate.<name>.<key> overrides a setting. A dataset that
is not prepared makes its evaluator 'skipped' (with the reason); the others still run. Writes
OUTPUT/eval_metrics.json, report.md, pgd_accuracy.png, corruption_error.png, each whole or not at
all (a full disk: one line, exit status 3; an --output that is not writable: exit 2, before).
"""
from absl import flags
from ml_collections import config_flags

from advprop_jax import cli
from advprop_jax.data import input_pipeline
from advprop_jax.eval import evaluators
from advprop_jax.eval import saved_run


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = dict(flag_values=flag_values)
  config_flags.DEFINE_config_file('config', None, 'Config file; default: <workdir>/config.json.',
                                  lock_config=False, **fv)
  flags.DEFINE_string('workdir', None, 'Training workdir (checkpoints/, config.json).', required=True, **fv)
  flags.DEFINE_list('evaluators', None, f'Evaluators to run, from {list(evaluators.ALL_EVALUATORS)}.', **fv)
  flags.DEFINE_string('output', None, 'Output directory; default <workdir>/eval.', **fv)
  flags.DEFINE_bool('ema', True, 'Evaluate the EMA weights (else the raw ones).', **fv)
  flags.DEFINE_string('stylized_dir', None, 'Stylized-ImageNet ImageFolder directory.', **fv)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> int:
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; flags are --name=value')
  input_pipeline.keep_tf_off_accelerators()
  try:
    _, results = saved_run.evaluate_workdir(
        flag_values.workdir, flag_values.config, names=flag_values.evaluators, output=flag_values.output,
        ema=flag_values.ema, stylized_dir=flag_values.stylized_dir)
  except (FileNotFoundError, ValueError) as e:  # the message names the file or the field
    cli.fail(e)
  print('\n'.join(f'{n}: ' + (f'top1={r["top1"]:.4f}' if 'top1' in r else r.get('reason', r['status']))
                  for n, r in results.items()))
  if all(r['status'] != 'ok' for r in results.values()):
    cli.fail('Every requested evaluator was skipped (reasons above); nothing was evaluated.', code=1)


def run():
  """Console-script entry point."""
  cli.run(main, 'advprop_jax.evaluate', __doc__, define_flags)


if __name__ == '__main__':
  run()
