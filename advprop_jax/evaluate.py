"""Clean + robustness evaluation of a trained workdir (issue #8).

  python -m advprop_jax.evaluate --workdir=DIR [--config=configs/x.py] [--evaluators=clean,pgd,...]
      [--output=DIR/eval] [--ema=true] [--stylized_dir=PATH]

Without --config the run's workdir/config.json is used. Evaluators (big_vision style: names + settings)
come from --evaluators, else config.evaluate.evaluators, else a default list (digits: clean, pgd,
corruptions; ImageNet: all). Settings: config.evaluate.<name>.<key> overrides DEFAULT_SETTINGS.
  clean            exact top-1/top-5 on config.data.eval_split
  pgd              white-box untargeted L-inf PGD (main BN) at each eps in pixels (eps 0 = exact clean)
  corruptions      digits: data/corruptions.py types x severities on the fly; ImageNet: TFDS
                   imagenet2012_corrupted/<type>_<severity> (15 x 5) + mCE (robustness.py)
  imagenet_a/_r    TFDS imagenet_a / imagenet_r, logits restricted to their 200 classes (derived
                   from the dataset's labels at run time: data/imagenet_subsets.py)
  imagenet_v2 / imagenet_sketch   TFDS imagenet_v2/matched-frequency / imagenet_sketch;  stylized:
                   an ImageFolder directory (--stylized_dir or config.evaluate.stylized.dir)
A dataset that is not prepared makes its evaluator 'skipped' (with the reason); the others still run.
Writes OUTPUT/eval_metrics.json, report.md, pgd_accuracy.png, corruption_error.png.
"""
import copy
import json
import logging
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import ml_collections

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

ALL_EVALUATORS = ('clean', 'pgd', 'corruptions', 'imagenet_a', 'imagenet_r', 'imagenet_v2',
                  'imagenet_sketch', 'stylized')
DIGITS_EVALUATORS = ('clean', 'pgd', 'corruptions')
DEFAULT_SETTINGS = {
    'pgd': dict(epsilons_pixels=(0.0, 1.0, 2.0, 4.0), step_size_pixels=None, num_steps=0),
    'corruptions': dict(types=None, severities=(1, 2, 3, 4, 5), seed=0, max_examples=None),
    'imagenet_a': dict(dataset='imagenet_a', split='test'),
    'imagenet_r': dict(dataset='imagenet_r', split='test'),
    'imagenet_v2': dict(dataset='imagenet_v2/matched-frequency', split='test'),
    'imagenet_sketch': dict(dataset='imagenet_sketch', split='test'),
    'stylized': dict(dir=None),
}
# RECIPE §3, EfficientNet-B7 vanilla -> AdvProp.
PAPER_B7 = {'imagenet_c_mce': (59.4, 52.9), 'imagenet_a_top1': (37.7, 44.7),
            'stylized_top1': (21.8, 26.6)}
PREPARE_HINT = {
    'imagenet2012_corrupted': 'built from the ImageNet validation set: put ILSVRC2012_img_val.tar in '
                              '<data_dir>/downloads/manual, then `tfds build imagenet2012_corrupted '
                              '--config=<type>_<severity> --data_dir=<data_dir>` (some types need '
                              'ImageMagick/Wand)',
    'stylized': 'generate Stylized-ImageNet (https://github.com/rgeirhos/Stylized-ImageNet) and pass '
                '--stylized_dir=<dir with one sub-folder per WordNet id>',
}


class Skipped(Exception):
  """An evaluator that cannot run here (missing data, wrong number of classes)."""


def _hint(dataset: str) -> str:
  return PREPARE_HINT.get(dataset.split('/')[0], f'`tfds build {dataset} --data_dir=<data_dir>`')


class Context:
  """What every evaluator needs: config, model, mesh, weights, and cached eval steps."""

  def __init__(self, config, model, variables, mesh, stylized_dir=None):
    self.config, self.model, self.mesh = config, model, mesh
    self.params = variables['params']
    self.model_state = {k: v for k, v in variables.items() if k != 'params'}
    self.stylized_dir = stylized_dir
    self._steps = {}

  @property
  def batch_size(self):
    import jax
    return self.config.eval_batch_size // jax.process_count()

  def eval_step(self, attack_settings=None):
    from advprop_jax import train
    key = json.dumps(attack_settings, sort_keys=True, default=lambda a: a.tolist())
    if key not in self._steps:
      self._steps[key] = train.make_eval_step(self.model, self.mesh,
                                              num_classes=self.config.num_classes,
                                              attack_settings=attack_settings)
    return self._steps[key]

  def run(self, dataset, eval_step=None):
    from advprop_jax import robustness
    return robustness.run_eval_step(eval_step or self.eval_step(), self.params, self.model_state,
                                    dataset, self.mesh)

  def tfds_dataset(self, dataset, split, **data_overrides):
    """input_pipeline.eval_dataset on another TFDS dataset; Skipped if it is not prepared."""
    from advprop_jax.data import input_pipeline
    data = copy.deepcopy(self.config.data)
    with data.unlocked():
      data.dataset = dataset
      data.update(data_overrides)
    try:
      return input_pipeline.eval_dataset(data, per_process_batch_size=self.batch_size, split=split)
    except (FileNotFoundError, ValueError) as e:
      raise Skipped(f'TFDS dataset {dataset!r} is not available ({e}). Prepare it: {_hint(dataset)}.')


def _require_imagenet(ctx, name):
  if ctx.config.num_classes != 1000:
    raise Skipped(f'{name} needs a 1000-class ImageNet model (num_classes={ctx.config.num_classes})')


def eval_clean(ctx, settings):
  from advprop_jax.data import input_pipeline
  return ctx.run(input_pipeline.eval_dataset(ctx.config.data, per_process_batch_size=ctx.batch_size))


def eval_pgd(ctx, settings):
  from advprop_jax import objectives
  from advprop_jax.data import input_pipeline
  results = {}
  for eps in settings['epsilons_pixels']:
    attack = ml_collections.ConfigDict(dict(
        epsilon_pixels=float(eps), num_steps=int(settings['num_steps'] or 0), random_start=0.0,
        targeted=False, step_size_pixels=float(settings['step_size_pixels'] or
                                               ctx.config.eval_pgd_step_size_pixels)))
    attack_settings = objectives.attack_settings(attack, ctx.config.data.normalization)
    dataset = input_pipeline.eval_dataset(ctx.config.data, per_process_batch_size=ctx.batch_size)
    results[f'{float(eps):g}'] = dict(ctx.run(dataset, ctx.eval_step(attack_settings)),
                                      num_steps=attack_settings['num_steps'])
  return {'by_epsilon_pixels': results}


def eval_corruptions(ctx, settings, clean_top1=None):
  from advprop_jax import robustness
  from advprop_jax.data import corruptions
  from advprop_jax.data import input_pipeline
  digits = ctx.config.data.dataset == input_pipeline.DIGITS
  types = settings['types'] or (corruptions.CORRUPTIONS if digits else robustness.IMAGENET_C_TYPES)
  if not digits:
    _require_imagenet(ctx, 'ImageNet-C')
  errors, details, missing = {}, {}, []
  for c in types:
    for s in settings['severities']:
      if digits:
        ds = robustness.corrupted_eval_dataset(
            ctx.config.data, corruption=c, severity=int(s), seed=int(settings['seed']),
            per_process_batch_size=ctx.batch_size, max_examples=settings['max_examples'])
      else:
        try:  # TFDS images are already the 224 center crop: resize only
          ds = ctx.tfds_dataset(f'imagenet2012_corrupted/{c}_{s}', 'validation', crop_fraction=1.0)
        except Skipped as e:
          missing.append(str(e))
          continue
      metrics = ctx.run(ds)
      details.setdefault(c, {})[str(s)] = metrics
      errors.setdefault(c, {})[int(s)] = 1.0 - metrics['top1']
  if not errors:
    raise Skipped(missing[0] if missing else 'no corruption evaluated')
  if clean_top1 is None:
    clean_top1 = eval_clean(ctx, {})['top1']
  summary = robustness.mce(errors, 1.0 - clean_top1,
                           reference=None if digits else robustness.ALEXNET_ERR)
  summary.update(suite='digits (tf.image corruptions, no AlexNet reference)' if digits else
                 'ImageNet-C (TFDS imagenet2012_corrupted)', by_type_and_severity=details,
                 missing=missing)
  if missing:
    summary['note'] = f'{len(missing)} corruption/severity datasets missing: mCE covers the rest only'
  return summary


def _eval_imagenet_dataset(name, subset=False):
  def evaluator(ctx, settings):
    from advprop_jax import robustness
    from advprop_jax.data import imagenet_subsets
    _require_imagenet(ctx, name)
    ds = ctx.tfds_dataset(settings['dataset'], settings['split'])
    if not subset:
      return ctx.run(ds)
    import tensorflow_datasets as tfds
    builder = tfds.builder(settings['dataset'], data_dir=ctx.config.data.data_dir)
    classes = imagenet_subsets.derive_class_subset(builder, settings['split'])
    step = robustness.make_subset_eval_step(ctx.model, ctx.mesh, num_classes=1000,
                                            class_indices=classes)
    return dict(ctx.run(ds, step), num_subset_classes=len(classes),
                subset_source='derived at run time from the labels present in the dataset')
  return evaluator


def eval_stylized(ctx, settings):
  from advprop_jax import robustness
  directory = ctx.stylized_dir or settings['dir']
  try:
    ds = robustness.folder_eval_dataset(directory, ctx.config.data, num_classes=ctx.config.num_classes,
                                        per_process_batch_size=ctx.batch_size)
  except (FileNotFoundError, ValueError) as e:
    raise Skipped(f'Stylized-ImageNet folder unavailable ({e}). Prepare it: {PREPARE_HINT["stylized"]}.')
  return ctx.run(ds)


EVALUATORS = {
    'clean': eval_clean, 'pgd': eval_pgd, 'corruptions': eval_corruptions,
    'imagenet_a': _eval_imagenet_dataset('ImageNet-A', subset=True),
    'imagenet_r': _eval_imagenet_dataset('ImageNet-R', subset=True),
    'imagenet_v2': _eval_imagenet_dataset('ImageNet-V2'),
    'imagenet_sketch': _eval_imagenet_dataset('ImageNet-Sketch'),
    'stylized': eval_stylized,
}


def evaluator_plan(config, names=None):
  """[(name, settings)] from --evaluators / config.evaluate / defaults."""
  from advprop_jax.data import input_pipeline
  cfg = config.evaluate.to_dict() if 'evaluate' in config else {}
  if not names:
    names = cfg.get('evaluators') or (DIGITS_EVALUATORS if config.data.dataset ==
                                      input_pipeline.DIGITS else ALL_EVALUATORS)
  plan = []
  for name in names:
    if name not in EVALUATORS:
      raise ValueError(f'Unknown evaluator {name!r}; available: {sorted(EVALUATORS)}')
    settings = dict(DEFAULT_SETTINGS.get(name, {}))
    if name == 'pgd' and tuple(config.get('eval_pgd_epsilons_pixels', ())):
      settings['epsilons_pixels'] = (0.0,) + tuple(config.eval_pgd_epsilons_pixels)
    unknown = set(cfg.get(name, {})) - set(settings)
    if unknown:
      raise ValueError(f'config.evaluate.{name}: unknown settings {sorted(unknown)}')
    settings.update(cfg.get(name, {}))
    plan.append((name, settings))
  return plan


def run_evaluators(ctx, plan) -> dict:
  """Runs each evaluator; one that raises Skipped is recorded as skipped and the rest still run."""
  results = {}
  for name, settings in plan:
    start = time.time()
    try:
      if name == 'corruptions' and 'clean' in results and 'top1' in results['clean']:
        out = eval_corruptions(ctx, settings, clean_top1=results['clean']['top1'])
      else:
        out = EVALUATORS[name](ctx, settings)
      out['status'] = 'ok'
    except Skipped as e:
      out = {'status': 'skipped', 'reason': str(e)}
      logging.warning('Evaluator %s skipped: %s', name, e)
    out['seconds'] = round(time.time() - start, 2)
    results[name] = out
  return results


def load_config(workdir, config=None):
  if config is not None:
    return config
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: pass --config (the training config of this run)')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def evaluate_workdir(workdir, config=None, *, names=None, output=None, ema=True, stylized_dir=None):
  import jax
  from advprop_jax import checkpoints, parallel, trainer
  config = load_config(workdir, config)
  variables, fp = checkpoints.load_inference_variables(workdir, ema=ema)
  model = trainer.build_model(config)
  mesh = parallel.create_mesh(config.bn_group_size)
  variables = jax.device_put(variables, parallel.replicated_sharding(mesh))
  ctx = Context(config, model, variables, mesh, stylized_dir)
  results = run_evaluators(ctx, evaluator_plan(config, names))
  meta = dict(workdir=os.path.abspath(workdir), model=config.model, method=config.get('method'),
              dataset=config.data.dataset, ema=ema, checkpoint_fingerprint=fp)
  write_outputs(output or os.path.join(workdir, 'eval'), meta, results)
  return meta, results


# ------------------------------------------------------------------------------------ outputs
_pct = lambda x: f'{100 * x:.2f}'


def report_markdown(meta, results) -> str:
  lines = [f'# Evaluation: {meta["model"]} ({meta.get("method")}) on {meta["dataset"]}', '',
           f'workdir `{meta["workdir"]}`, {"EMA" if meta["ema"] else "raw"} weights, main (clean) BN.',
           '', '| evaluator | status | top-1 (%) | top-5 (%) | examples |', '|---|---|---|---|---|']
  for name, r in results.items():
    if r['status'] != 'ok':
      lines.append(f'| {name} | skipped: {r["reason"]} | | | |')
    elif 'top1' in r:
      lines.append(f'| {name} | ok | {_pct(r["top1"])} | {_pct(r["top5"])} | {r["count"]} |')
    else:
      lines.append(f'| {name} | ok | see below | | |')
  pgd = results.get('pgd', {})
  if pgd.get('status') == 'ok':
    lines += ['', '## White-box PGD (untargeted, L-inf, main BN)', '',
              '| eps (pixels) | steps | top-1 (%) |', '|---|---|---|']
    lines += [f'| {e} | {r["num_steps"]} | {_pct(r["top1"])} |'
              for e, r in pgd['by_epsilon_pixels'].items()]
  cor = results.get('corruptions', {})
  if cor.get('status') == 'ok':
    lines += ['', f'## Corruptions: {cor["suite"]}', '',
              f'clean error {_pct(cor["clean_error"])}%, mean corruption error '
              f'{_pct(cor["mean_corruption_error"])}% '
              f'({_pct(cor["mean_corruption_error_minus_clean"])} points above clean).']
    if 'mce' in cor:
      lines += ['', f'**mCE {_pct(cor["mce"])}**, relative mCE {_pct(cor["relative_mce"])} '
                '(CE_c = mean_s err / AlexNet mean_s err, AlexNet per-corruption averages of '
                'Hendrycks & Dietterich 2019; relative uses AlexNet clean error 43.48%).']
    sevs = sorted({s for by_s in cor['by_type_and_severity'].values() for s in by_s})
    lines += ['', '| corruption | ' + ' | '.join(f'err s{s} (%)' for s in sevs) + ' | mean | CE |',
              '|---|' + '---|' * (len(sevs) + 2)]
    for c, by_s in cor['by_type_and_severity'].items():
      row = cor['per_corruption'][c]
      lines.append(f'| {c} | ' + ' | '.join(_pct(1 - by_s[s]['top1']) if s in by_s else ''
                                             for s in sevs) +
                   f' | {_pct(row["mean_error"])} | {_pct(row["ce"]) if "ce" in row else "-"} |')
  if meta['model'] == 'efficientnet-b7':
    ours = {'imagenet_c_mce': 100 * cor['mce'] if 'mce' in cor else None,
            'imagenet_a_top1': 100 * results['imagenet_a']['top1']
            if results.get('imagenet_a', {}).get('status') == 'ok' else None,
            'stylized_top1': 100 * results['stylized']['top1']
            if results.get('stylized', {}).get('status') == 'ok' else None}
    lines += ['', '## Paper reference (AdvProp, EfficientNet-B7)', '',
              '| metric | paper vanilla | paper AdvProp | ours |', '|---|---|---|---|']
    lines += [f'| {k} | {v[0]} | {v[1]} | {"n/a" if ours[k] is None else f"{ours[k]:.1f}"} |'
              for k, v in PAPER_B7.items()]
  return '\n'.join(lines) + '\n'


def write_outputs(output, meta, results):
  import jax
  if jax.process_index() != 0:
    return
  os.makedirs(output, exist_ok=True)
  from advprop_jax import robustness
  plots = robustness.write_plots(results, output)
  with open(os.path.join(output, 'eval_metrics.json'), 'w') as f:
    json.dump(dict(meta=meta, results=results, plots=plots), f, indent=2, sort_keys=True, default=str)
  with open(os.path.join(output, 'report.md'), 'w') as f:
    f.write(report_markdown(meta, results))


# ---------------------------------------------------------------------------------------- CLI
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file; default: <workdir>/config.json.',
                                lock_config=False)
flags.DEFINE_string('workdir', None, 'Training workdir (checkpoints/, config.json).')
flags.DEFINE_list('evaluators', None, f'Evaluators to run, from {list(ALL_EVALUATORS)}.')
flags.DEFINE_string('output', None, 'Output directory; default <workdir>/eval.')
flags.DEFINE_bool('ema', True, 'Evaluate the EMA weights (else the raw ones).')
flags.DEFINE_string('stylized_dir', None, 'Stylized-ImageNet ImageFolder directory.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
  try:
    _, results = evaluate_workdir(FLAGS.workdir, FLAGS.config, names=FLAGS.evaluators,
                                  output=FLAGS.output, ema=FLAGS.ema, stylized_dir=FLAGS.stylized_dir)
  except (FileNotFoundError, ValueError) as e:
    print(f'Error: {e}', file=sys.stderr)
    sys.exit(2)
  print('\n'.join(f'{n}: ' + (f'top1={r["top1"]:.4f}' if 'top1' in r else r.get('reason', r['status']))
                  for n, r in results.items()))


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
