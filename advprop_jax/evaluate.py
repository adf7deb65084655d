"""Clean + robustness evaluation of a trained workdir.

  python -m advprop_jax.evaluate --workdir=DIR [--config=configs/x.py] [--evaluators=clean,pgd,...]
      [--output=DIR/eval] [--ema=true] [--stylized_dir=PATH] [--step=best|N] [--bn=clean|adv|...]
  python -m advprop_jax.evaluate --workdir=DIR --watch [--poll_seconds=30] [--timeout_seconds=S] ...

Without --config the run's workdir/config.json is used. Evaluators (eval/evaluators.py, big_vision style:
names + settings) come from --evaluators, else config.evaluate.evaluators, else a default list (digits:
clean, pgd, corruptions; ImageNet: all; plus minival for a run that holds one out:
config.data.minival_examples); config.evaluate.<name>.<key> overrides a setting. A dataset that
is not prepared makes its evaluator 'skipped' (with the reason); the others still run. --step=best
or N picks the checkpoint (default: the newest; best: the run's config.keep_best_by). --bn=adv
evaluates the same weights through AdvProp's auxiliary BNs instead of the main ones. Writes
OUTPUT/eval_metrics.json, report.md, pgd_accuracy.png, corruption_error.png, each whole or not at
all (a full disk: one line, exit status 3; an --output that is not writable: exit 2, before).

--watch is the sidecar evaluator (eval/watch.py): it evaluates every checkpoint that lands in DIR,
once each, in step order (it may start before the run), writes DIR/eval_watch/records.jsonl and
TensorBoard events there (DIR/eval_watch/raw with --ema=false), continues after its last record when
restarted, and exits 0 once the run's final checkpoint is evaluated (1: --timeout_seconds without a
new checkpoint).
"""
from absl import flags
from ml_collections import config_flags

from advprop_jax import best_checkpoint
from advprop_jax import cli
from advprop_jax.data import input_pipeline
from advprop_jax.eval import evaluators
from advprop_jax.eval import saved_run
from advprop_jax.eval import watch


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = dict(flag_values=flag_values)
  config_flags.DEFINE_config_file('config', None, 'Config file; default: <workdir>/config.json.',
                                  lock_config=False, **fv)
  flags.DEFINE_string('workdir', None, 'Training workdir (checkpoints/, config.json).', required=True, **fv)
  flags.DEFINE_list('evaluators', None, 'Evaluators to run, from '
                    f'{list(evaluators.ALL_EVALUATORS) + list(evaluators.NAMED)} (minival: a run '
                    'with config.data.minival_examples).', **fv)
  flags.DEFINE_string('output', None, 'Output directory; default <workdir>/eval.', **fv)
  flags.DEFINE_bool('ema', True, 'Evaluate the EMA weights (else the raw ones).', **fv)
  flags.DEFINE_string('stylized_dir', None, 'Stylized-ImageNet ImageFolder directory.', **fv)
  flags.DEFINE_string('step', None, "Checkpoint to evaluate: a step number, or 'best' (the run's "
                      'config.keep_best_by); default: the newest complete one.', **fv)
  flags.DEFINE_string('bn', 'clean', "Evaluate through the BatchNorms of this distribution: "
                      "'clean' (the main BN, what inference uses) or an auxiliary one of the "
                      "run's method ('adv' for advprop / fast_advprop, 'adv1', 'adv2', ... for "
                      'fine_grained_advprop).', **fv)
  flags.DEFINE_bool('watch', False, 'Evaluate every checkpoint that lands in --workdir, until the '
                    'final one (writes <workdir>/eval_watch).', **fv)
  flags.DEFINE_float('poll_seconds', None, 'With --watch: seconds between looks for new '
                     'checkpoints (default 30).', **fv)
  flags.DEFINE_float('timeout_seconds', None, 'With --watch: exit (status 1) after this long '
                     'without a new checkpoint (a run that stopped); default: wait for the final '
                     'one.', **fv)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> int:
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; flags are --name=value')
  input_pipeline.keep_tf_off_accelerators()
  if flag_values.watch or flag_values.poll_seconds is not None or \
      flag_values.timeout_seconds is not None:
    return _watch(flag_values)
  try:
    _, results = saved_run.evaluate_workdir(
        flag_values.workdir, flag_values.config, names=flag_values.evaluators, output=flag_values.output,
        ema=flag_values.ema, stylized_dir=flag_values.stylized_dir,
        step=best_checkpoint.parse_step(flag_values.step), bn=flag_values.bn)
  except (FileNotFoundError, ValueError) as e:  # the message names the file or the field
    cli.fail(e)
  print('\n'.join(f'{n}: ' + (f'top1={r["top1"]:.4f}' if 'top1' in r else r.get('reason', r['status']))
                  for n, r in results.items()))
  if all(r['status'] != 'ok' for r in results.values()):
    cli.fail('Every requested evaluator was skipped (reasons above); nothing was evaluated.', code=1)


def _watch(fv: flags.FlagValues) -> int:
  if not fv.watch:
    cli.fail('--poll_seconds and --timeout_seconds go with --watch')
  if fv.output is not None:
    cli.fail('--watch writes <workdir>/eval_watch; --output is for a single evaluation')
  if fv.step is not None:
    cli.fail('--watch evaluates every checkpoint; --step is for a single evaluation')
  if fv.bn != 'clean':
    cli.fail('--watch evaluates through the main BN; --bn is for a single evaluation')
  for name in ('poll_seconds', 'timeout_seconds'):
    if fv[name].value is not None and not fv[name].value > 0:
      cli.fail(f'--{name}={fv[name].value:g}: must be positive')
  try:
    return watch.watch_workdir(
        fv.workdir, fv.config, names=fv.evaluators, ema=fv.ema, stylized_dir=fv.stylized_dir,
        poll_seconds=fv.poll_seconds or 30.0, timeout_seconds=fv.timeout_seconds)
  except (FileNotFoundError, ValueError) as e:  # the message names the file or the field
    cli.fail(e)


def run():
  """Console-script entry point."""
  cli.run(main, 'advprop_jax.evaluate', __doc__, define_flags)


if __name__ == '__main__':
  run()
