"""Clean + robustness evaluation of a trained workdir.

  python -m advprop_jax.evaluate --workdir=DIR [--config=configs/x.py] [--evaluators=clean,pgd,...]
      [--output=DIR/eval] [--ema=true] [--stylized_dir=PATH]

Without --config the run's workdir/config.json is used. Evaluators (eval/evaluators.py, big_vision style:
names + settings) come from --evaluators, else config.evaluate.evaluators, else a default list (digits:
clean, pgd, corruptions; ImageNet: all); config.evaluate.<name>.<key> overrides a setting. A dataset that
is not prepared makes its evaluator 'skipped' (with the reason); the others still run. Writes
OUTPUT/eval_metrics.json, report.md, pgd_accuracy.png, corruption_error.png.
"""
from absl import flags
from ml_collections import config_flags

from advprop_jax import cli
from advprop_jax.data import input_pipeline
from advprop_jax.eval import evaluators
from advprop_jax.eval import saved_run


FLAGS = flags.FLAGS


def define_flags():
  """The CLI's flags, defined when it runs (so that every CLI module can be imported side by side)."""
  config_flags.DEFINE_config_file('config', None, 'Config file; default: <workdir>/config.json.',
                                  lock_config=False)
  flags.DEFINE_string('workdir', None, 'Training workdir (checkpoints/, config.json).', required=True)
  flags.DEFINE_list('evaluators', None, f'Evaluators to run, from {list(evaluators.ALL_EVALUATORS)}.')
  flags.DEFINE_string('output', None, 'Output directory; default <workdir>/eval.')
  flags.DEFINE_bool('ema', True, 'Evaluate the EMA weights (else the raw ones).')
  flags.DEFINE_string('stylized_dir', None, 'Stylized-ImageNet ImageFolder directory.')


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; flags are --name=value')
  input_pipeline.keep_tf_off_accelerators()
  try:
    _, results = saved_run.evaluate_workdir(FLAGS.workdir, FLAGS.config, names=FLAGS.evaluators,
                                            output=FLAGS.output, ema=FLAGS.ema,
                                            stylized_dir=FLAGS.stylized_dir)
  except (FileNotFoundError, ValueError) as e:
    cli.fail(f'Error: {e}')
  print('\n'.join(f'{n}: ' + (f'top1={r["top1"]:.4f}' if 'top1' in r else r.get('reason', r['status']))
                  for n, r in results.items()))
  if all(r['status'] != 'ok' for r in results.values()):
    cli.fail('Every requested evaluator was skipped (reasons above); nothing was evaluated.', code=1)


def run():
  """Console-script entry point."""
  cli.run(define_flags, main)


if __name__ == '__main__':
  run()
