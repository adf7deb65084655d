"""Equal-budget ablation of the training methods (the offline digits demo, CIFAR-10, any config).

  python -m advprop_jax.ablation --workdir=DIR [--methods=vanilla,adv_train,advprop,
      fine_grained_advprop,fast_advprop,afan] [--seeds=0,1,2] [--epochs=E | --steps=N]
      [--config=configs/demo.py] [--corruption_examples=N] [--quick]

Each (method, seed) trains with trainer.train_and_evaluate in DIR/<method>/seed<k> (so an interrupted
ablation resumes from the runs' checkpoints; finished runs are read back, not retrained), then the EMA
weights are evaluated on the corruption suite (eval/, written to DIR/<method>/seed<k>/eval), and for
methods with auxiliary BNs (AdvProp's adversarial BN) once more through each of them
(DIR/<method>/seed<k>/eval_bn_<d>: an extra row). A seed fixes the initialisation and the data order
(the same for every method that reads the same batch per step; Fast AdvProp reads more), so the
differences to vanilla are also reported paired by seed.
Writes DIR/ablation.md (mean ± std over seeds, paired differences, top-1 per corruption),
DIR/ablation.json and DIR/ablation.png. Compiled programs are cached in DIR/jax_cache (unless a JAX
compilation cache is
already configured), so every seed after a method's first skips compilation.

Budget matching: every method runs the SAME NUMBER OF OPTIMIZER STEPS, N = int(epochs x train examples /
global_batch_size), with the same step-indexed learning-rate schedule (warm-up and cosine decay over N
steps) and the same clean batch per step. Fast AdvProp's loader draws 1/(1 - adv_fraction) = 1.25x the
batch per step (64 clean + 16 attacked images), so it sees 1.25x the images of the others; its
num_epochs / warmup_epochs are rescaled so that its schedule covers the same N steps.

Step time: each train step is timed to completion (a step hook of the training loop blocks on its
outputs); the reported time per step is
(end of the last step - end of the first step) / (steps - 1), i.e. the training loop's wall time without
the first (compiling) step; periodic evaluation is switched off so only training is timed. A run resumed
from a checkpoint is timed over the steps of its last session only.
"""
import json
import logging
import os
import sys
import time

from absl import flags
import jax
from matplotlib.figure import Figure  # no pyplot: files only, no GUI backend or global figure state
import ml_collections
import numpy as np

from advprop_jax import cli
from advprop_jax import config as config_lib
from advprop_jax import factories
from advprop_jax import methods
from advprop_jax import optim
from advprop_jax import trainer
from advprop_jax.data import input_pipeline
from advprop_jax.eval import saved_run

ALL_METHODS = tuple(methods.METHODS)
EVAL_PGD_EPS = 4.0
QUICK_STAGES = ((1, 3, 1, 1, 16), (1, 3, 2, 6, 24))
COLUMNS = ('clean top-1 (%)', f'PGD-{EVAL_PGD_EPS:g}px top-1 (%)', 'corruptions mean top-1 (%)',
           'step time (ms)', 'step time / vanilla')
KEYS = ('clean', 'pgd', 'corruptions', 'step_ms', 'rel_step')


def method_config(config_path, method, seed, *, epochs=None, steps=None, quick=False,
                  corruption_examples=None):
  """The config of one run, budget-matched to `steps` optimizer steps (default: epochs of vanilla);
  `corruption_examples`: the first N evaluation images per corruption and severity (default all)."""
  c = config_lib.load_file(config_path, method)
  c.seed = int(seed)
  c.fine_grained_epsilons_pixels = (2.0, 4.0)
  c.afan.stage = 1
  c.eval_pgd_epsilons_pixels = (EVAL_PGD_EPS,)
  # The config's own severity constants (configs/cifar10.py: CIFAR-10-C's), else ImageNet-C's.
  own = c.evaluate.to_dict().get('corruptions', {}) if 'evaluate' in c else {}
  corruptions = dict(severities=(1, 2, 3, 4, 5), seed=0, max_examples=corruption_examples,
                     constants=own.get('constants', 'imagenet_c'))
  if quick:
    c.model_overrides.stages = QUICK_STAGES
    c.model_overrides.head_features = 64
    c.model_overrides.depthwise_impl = 'grouped'
    c.data.image_size = 16
    c.global_batch_size = 32
    c.log_every_steps = 2
    corruptions.update(severities=(3,), max_examples=120)
  c.evaluate = ml_collections.ConfigDict(dict(corruptions=corruptions))
  # Budget: N optimizer steps for every method, N from the vanilla loader (global_batch_size images).
  num_train = input_pipeline.num_train_examples(c.data)  # (without a minival held out)
  clean_spe = factories.schedule(_with(c, method='vanilla'), num_train).steps_per_epoch
  if steps is None:  # the trainer's own conversion: int(epochs * N / batch)
    steps = optim.epochs_to_steps(c.num_epochs if epochs is None else epochs, num_train,
                                  c.global_batch_size)
  spe = factories.schedule(c, num_train).steps_per_epoch
  c.warmup_epochs = c.warmup_epochs * clean_spe / spe
  c.num_epochs = (steps + 0.5) / spe  # int(num_epochs * spe) == steps for every method
  c.max_steps = int(steps)
  c.eval_every_epochs = 1e6  # no periodic evaluation inside the timed loop
  return c


def _with(config, **fields):
  c = config.copy_and_resolve_references()
  c.update(fields)
  return c


class StepTimer:
  """A training-loop step hook: blocks on each step's outputs and records when it ended."""

  def __init__(self):
    self.calls, self.first_end, self.last_end = 0, None, None

  def __call__(self, step, state, metrics):
    del step
    jax.block_until_ready((state, metrics))
    now = time.perf_counter()
    self.calls += 1
    if self.calls == 1:
      self.first_end = now
    self.last_end = now


def run_one(config, run_dir) -> dict:
  """Trains (or resumes / reads back) one run; returns its metrics."""
  summary_path = os.path.join(run_dir, 'ablation_run.json')
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      return json.load(f)
  final_path = os.path.join(run_dir, 'final_metrics.json')
  timing_path = os.path.join(run_dir, 'timing.json')
  if os.path.exists(final_path):
    with open(final_path) as f:
      final = json.load(f)
  else:
    timer = StepTimer()
    start = time.perf_counter()
    final = trainer.train_and_evaluate(config, run_dir, step_hooks=[timer])
    if 'preempted_at_step' in final:
      raise SystemExit(f'{run_dir}: preempted at step {final["preempted_at_step"]}; rerun to resume')
    timed = timer.calls - 1
    timing = dict(timed_steps=max(timed, 0), total_seconds=time.perf_counter() - start,
                  step_seconds=(timer.last_end - timer.first_end) / timed if timed > 0 else float('nan'))
    with open(timing_path, 'w') as f:
      json.dump(timing, f, indent=2)
  timing = {'step_seconds': float('nan')}
  if os.path.exists(timing_path):
    with open(timing_path) as f:
      timing = json.load(f)
  _, results = saved_run.evaluate_workdir(run_dir, config, names=['clean', 'corruptions'],
                                         output=os.path.join(run_dir, 'eval'), ema=True)
  out = dict(clean=100 * final['ema_clean_top1'], pgd=100 * final[f'ema_pgd{EVAL_PGD_EPS:g}_top1'],
             **_corruption_top1(results), step_ms=1000 * timing['step_seconds'],
             steps=final['step'], timed_steps=timing.get('timed_steps'), aux={})
  # The same weights through each auxiliary BN (AdvProp's adversarial one): what that BN learned.
  for d in methods.get(config.method).distributions(config)[1:]:
    _, aux = saved_run.evaluate_workdir(run_dir, config, names=['clean', 'corruptions'],
                                        output=os.path.join(run_dir, f'eval_bn_{d}'),
                                        ema=True, bn=d)
    out['aux'][d] = dict(clean=100 * aux['clean']['top1'], **_corruption_top1(aux))
  with open(summary_path, 'w') as f:
    json.dump(out, f, indent=2)
  return out


def _corruption_top1(results) -> dict:
  """Mean top-1 (%) over the corruption suite, and per corruption (mean over its severities)."""
  c = results['corruptions']
  return dict(corruptions=100 * (1.0 - c['mean_corruption_error']),
              per_corruption={k: 100 * (1.0 - r['mean_error'])
                              for k, r in c['per_corruption'].items()})


def _rows(runs: dict) -> dict:
  """runs[method][seed] -> rows[row name][seed]: each method, then each of its auxiliary BNs."""
  rows = {}
  for name, by_seed in runs.items():
    rows[name] = by_seed
    for d in next(iter(by_seed.values())).get('aux', {}):
      rows[f'{name} (aux BN {d})'] = {
          seed: dict(r['aux'][d], pgd=float('nan'), step_ms=float('nan'))
          for seed, r in by_seed.items()}
  return rows


def paired_differences(runs: dict, baseline='vanilla') -> dict:
  """{row: {key: (mean, std)}} of (row - baseline) over the seeds both have: the same seed means
  the same initialisation and data order, so the pairing removes what the seeds share."""
  if baseline not in runs:
    return {}
  base, out = runs[baseline], {}
  for name, by_seed in _rows(runs).items():
    seeds = [s for s in by_seed if s in base]
    if name == baseline or not seeds:
      continue
    out[name] = {k: _mean_std([by_seed[s][k] - base[s][k] for s in seeds])
                 for k in ('clean', 'pgd', 'corruptions')}
    out[name]['seeds'] = len(seeds)
  return out


def per_corruption_table(runs: dict) -> dict:
  """{row: {corruption: (mean, std)}} of top-1 (%) per corruption, over seeds."""
  table = {}
  for name, by_seed in _rows(runs).items():
    rows = [r for r in by_seed.values() if 'per_corruption' in r]
    if rows:
      table[name] = {c: _mean_std([r['per_corruption'][c] for r in rows])
                     for c in rows[0]['per_corruption']}
  return table


def _mean_std(values):
  v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
  if not len(v):
    return float('nan'), float('nan')
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def aggregate(runs: dict) -> dict:
  """runs[method][seed] -> {method: {key: (mean, std)}}; step time relative to vanilla's mean."""
  vanilla = _mean_std([r['step_ms'] for r in runs.get('vanilla', {}).values()])[0]
  table = {}
  for name, by_seed in _rows(runs).items():
    rows = list(by_seed.values())
    for r in rows:
      r['rel_step'] = r['step_ms'] / vanilla if np.isfinite(vanilla) else float('nan')
    table[name] = {k: _mean_std([r[k] for r in rows]) for k in KEYS}
    table[name]['seeds'] = len(rows)
  return table


def _fmt(mean, std, digits):
  return 'n/a' if not np.isfinite(mean) else f'{mean:.{digits}f} ± {std:.{digits}f}'


def markdown_table(table) -> str:
  lines = ['| method | seeds | ' + ' | '.join(COLUMNS) + ' |', '|---|---|' + '---|' * len(COLUMNS)]
  for name, row in table.items():
    cells = [_fmt(*row[k], 2 if k == 'rel_step' else 1) for k in KEYS]
    lines.append(f'| {name} | {row["seeds"]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def differences_markdown(diffs) -> str:
  lines = ['| method − vanilla (same seed) | seeds | clean top-1 (pp) | PGD top-1 (pp) | '
           'corruptions top-1 (pp) |', '|---|---|---|---|---|']
  for name, row in diffs.items():
    cells = [_fmt(*row[k], 2) for k in ('clean', 'pgd', 'corruptions')]
    lines.append(f'| {name} | {row["seeds"]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def corruption_markdown(table) -> str:
  if not table:
    return ''
  names = list(next(iter(table.values())))
  lines = ['| method | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]
  for row_name, row in table.items():
    lines.append(f'| {row_name} | ' + ' | '.join(_fmt(*row[c], 1) for c in names) + ' |')
  return '\n'.join(lines)


def write_plot(table, diffs, path):
  names = list(table)
  fig = Figure(figsize=(20 if diffs else 16, 4))
  axes = fig.subplots(1, 5 if diffs else 4)
  for ax, key, title in zip(axes, ('clean', 'pgd', 'corruptions', 'rel_step'), COLUMNS[:3] +
                            COLUMNS[4:]):
    means = [table[m][key][0] for m in names]
    stds = [table[m][key][1] for m in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=3, color='C0')
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha='right', fontsize=8)
    ax.set_title(title, fontsize=9)
    finite = [m for m in means if np.isfinite(m)]
    if key != 'rel_step' and finite:
      ax.set_ylim(max(0.0, min(finite) - 10), 100)
    ax.grid(axis='y', alpha=0.3)
  if diffs:  # paired differences to vanilla, clean and corruptions side by side
    ax, rows = axes[-1], list(diffs)
    for i, (key, color) in enumerate((('clean', 'C0'), ('corruptions', 'C1'))):
      ax.bar([j + 0.4 * i for j in range(len(rows))], [diffs[r][key][0] for r in rows], width=0.4,
             yerr=[diffs[r][key][1] for r in rows], capsize=3, color=color, label=key)
    ax.axhline(0, color='k', lw=0.8)
    ax.set_xticks([j + 0.2 for j in range(len(rows))])
    ax.set_xticklabels(rows, rotation=45, ha='right', fontsize=8)
    ax.set_title('minus vanilla, same seed (pp)', fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis='y', alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def run_ablation(workdir, method_names=ALL_METHODS, seeds=(0,), *, epochs=None, steps=None,
                 config_path='configs/demo.py', quick=False, corruption_examples=None,
                 command=None) -> dict:
  start = time.time()
  runs, settings = {name: {} for name in method_names}, {}
  # Seed by seed, every method: a study stopped part-way already holds complete pairs.
  for seed in seeds:
    for name in method_names:
      config = method_config(config_path, name, seed, epochs=epochs, steps=steps, quick=quick,
                             corruption_examples=corruption_examples)
      settings[name] = dict(steps=config.max_steps, loader_batch=factories.loader_batch_size(config))
      run_dir = os.path.join(workdir, name, f'seed{seed}')
      logging.info('ablation: %s seed %d (%d steps) in %s', name, seed, config.max_steps, run_dir)
      runs[name][seed] = run_one(config, run_dir)
  table, diffs, by_corruption = (aggregate(runs), paired_differences(runs),
                                 per_corruption_table(runs))
  first = next(iter(settings.values()))
  md = [f'# Equal-budget ablation ({"quick, " if quick else ""}{config_path})', '',
        f'Command: `{command or "run_ablation(...)"}`', '',
        f'Budget: {first["steps"]} optimizer steps per run for every method (same step-indexed LR '
        'schedule, same clean batch per step); loader images per step: ' +
        ', '.join(f'{m} {s["loader_batch"]}' for m, s in settings.items()) + '. Seeds: ' +
        ','.join(map(str, seeds)) + '. Mean ± sample std over seeds.', '',
        f'EMA weights, main BN. PGD: white-box untargeted L-inf, eps {EVAL_PGD_EPS:g} px, '
        f'eps+1 steps of 1 px (same for all). Corruptions: mean top-1 over the corruption suite '
        f'(advprop_jax.data.corruptions, {config.evaluate.corruptions.constants} severity '
        'constants, severities ' +
        ','.join(map(str, config.evaluate.corruptions.severities)) + ('' if not corruption_examples
        else f'; the first {corruption_examples} evaluation images') + '). Step time: training-loop '
        'wall time per step excluding the first (compiling) step; relative to vanilla\'s mean.', '',
        markdown_table(table), '',
        'Rows "(aux BN d)": the same EMA weights evaluated through the auxiliary BN of '
        'distribution '
        'd instead of the main one (not what inference uses).', '']
  if diffs:
    md += ['Paired differences to vanilla: per seed (same initialisation and data order), the '
           'method\'s figure minus vanilla\'s; mean ± sample std over seeds (pp = points).', '',
           differences_markdown(diffs), '']
  if by_corruption:
    md += ['Top-1 (%) per corruption (mean over its severities), mean ± sample std over seeds:', '',
           corruption_markdown(by_corruption), '']
  md += [f'Wall time of this invocation: {time.time() - start:.0f} s.', '']
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'ablation.md'), 'w') as f:
    f.write('\n'.join(md))
  with open(os.path.join(workdir, 'ablation.json'), 'w') as f:
    json.dump(dict(runs={m: {str(s): r for s, r in by.items()} for m, by in runs.items()},
                   table=table, paired_differences=diffs, per_corruption=by_corruption,
                   settings=settings), f, indent=2)
  write_plot(table, diffs, os.path.join(workdir, 'ablation.png'))
  return table



def define_flags(flag_values: flags.FlagValues) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string('workdir', None, 'Directory of the ablation (one sub-directory per run).',
                      required=True, **fv)
  flags.DEFINE_list('methods', list(ALL_METHODS), f'Methods to compare, from {list(ALL_METHODS)}.', **fv)
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Integer seeds; one run per method and seed.', **fv)
  flags.DEFINE_float('epochs', None, 'Epochs of the vanilla loader (default: the config\'s num_epochs).',
                     **fv)
  flags.DEFINE_integer('steps', None, 'Optimizer steps per run (overrides --epochs).', **fv)
  flags.DEFINE_string('config', 'configs/demo.py', 'Config file whose get_config(method) is used.', **fv)
  flags.DEFINE_bool('quick', False, 'Tiny model, 16 px, few steps (tests).', **fv)
  flags.DEFINE_integer('corruption_examples', None, 'Evaluate each corruption and severity on the '
                       'first N evaluation images (default: all of them).', lower_bound=1, **fv)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> int:
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; flags are --name=value')
  unknown = [m for m in flag_values.methods if m not in ALL_METHODS]
  if unknown or not flag_values.methods:
    cli.fail(f'--methods={",".join(flag_values.methods)}: unknown {unknown}; choose from {list(ALL_METHODS)}')
  try:
    seeds = [int(s) for s in flag_values.seeds]
  except ValueError:
    seeds = []
  if not seeds:
    cli.fail(f'--seeds={",".join(flag_values.seeds)!r}: a comma-separated list of integers, e.g. 0,1,2')
  if not os.path.isfile(flag_values.config):
    cli.fail(f'--config={flag_values.config}: no such file')
  steps = flag_values.steps
  if steps is None and flag_values.quick and flag_values.epochs is None:
    steps = 4
  logging.getLogger().setLevel(logging.INFO)
  if not jax.config.jax_compilation_cache_dir:  # keep a cache the caller configured
    # Seeds of one method compile identical programs: the persistent cache makes every seed after
    # the first skip compilation (~30 s per run on 2 cores).
    jax.config.update('jax_compilation_cache_dir', os.path.join(os.path.abspath(flag_values.workdir),
                                                                'jax_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  input_pipeline.keep_tf_off_accelerators()
  command = 'python -m advprop_jax.ablation ' + ' '.join(sys.argv[1:])
  table = run_ablation(flag_values.workdir, flag_values.methods, seeds, epochs=flag_values.epochs,
                       steps=steps, config_path=flag_values.config, quick=flag_values.quick,
                       corruption_examples=flag_values.corruption_examples, command=command)
  print(markdown_table(table))


def run():
  """Console-script entry point."""
  cli.run(main, 'advprop_jax.ablation', __doc__, define_flags)


if __name__ == '__main__':
  run()
