"""The table of evaluators (big_vision style: a name and its settings), shared by the training loop
(periodic and final evaluation) and the `evaluate` CLI.

Each evaluator is `fn(ctx, variables, settings) -> dict` on flax variables {'params', 'batch_stats', ...}
(the main BN is used); one that cannot run here raises `Skipped` with the reason.
  clean            exact top-1/top-5 on config.data.eval_split
  pgd              white-box untargeted L-inf PGD (main BN) at each eps in pixels (eps 0 = exact clean)
  corruptions      digits: data/corruptions.py types x severities on the fly; ImageNet: TFDS
                   imagenet2012_corrupted/<type>_<severity> (15 x 5) + mCE (robustness.py)
  imagenet_a/_r    TFDS imagenet_a / imagenet_r, logits restricted to their 200 classes (derived from the
                   dataset's labels at run time: data/imagenet_subsets.py)
  imagenet_v2 / imagenet_sketch   TFDS imagenet_v2/matched-frequency / imagenet_sketch
  stylized         an ImageFolder directory (--stylized_dir or config.evaluate.stylized.dir)
"""
import copy
import json
import logging
import time

import jax
import ml_collections
import tensorflow_datasets as tfds

from advprop_jax.data import corruptions
from advprop_jax.data import eval_sets
from advprop_jax.data import imagenet_subsets
from advprop_jax.data import input_pipeline
from advprop_jax.eval import loop
from advprop_jax.eval import robustness
from advprop_jax.eval.step import make_eval_step
from advprop_jax.methods.passes import attack_settings

ALL_EVALUATORS = ('clean', 'pgd', 'corruptions', 'imagenet_a', 'imagenet_r', 'imagenet_v2',
                  'imagenet_sketch', 'stylized')
DIGITS_EVALUATORS = ('clean', 'pgd', 'corruptions')
DEFAULT_SETTINGS = {
    'clean': {},
    'pgd': dict(epsilons_pixels=(0.0, 1.0, 2.0, 4.0), step_size_pixels=None, num_steps=0),
    'corruptions': dict(types=None, severities=(1, 2, 3, 4, 5), seed=0, max_examples=None),
    'imagenet_a': dict(dataset='imagenet_a', split='test'),
    'imagenet_r': dict(dataset='imagenet_r', split='test'),
    'imagenet_v2': dict(dataset='imagenet_v2/matched-frequency', split='test'),
    'imagenet_sketch': dict(dataset='imagenet_sketch', split='test'),
    'stylized': dict(dir=None),
}
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
  """What evaluators share: config, model, mesh, and the compiled eval steps (cached by options)."""

  def __init__(self, config, model, mesh, stylized_dir=None):
    self.config, self.model, self.mesh = config, model, mesh
    self.stylized_dir = stylized_dir
    self._steps = {}

  @property
  def batch_size(self) -> int:
    """Eval images per process and batch."""
    return self.config.eval_batch_size // jax.process_count()

  def step(self, attack=None, class_indices=None):
    """The compiled eval step with these options (compiled once per Context)."""
    key = json.dumps([attack, class_indices], sort_keys=True, default=lambda a: a.tolist())
    if key not in self._steps:
      self._steps[key] = make_eval_step(self.model, self.mesh, num_classes=self.config.num_classes,
                                        attack_settings=attack, class_indices=class_indices)
    return self._steps[key]

  def run(self, variables, dataset, eval_step=None) -> dict:
    params = variables['params']
    model_state = {k: v for k, v in variables.items() if k != 'params'}
    return loop.evaluate(eval_step or self.step(), params, model_state, dataset, self.mesh,
                         self.config.data.normalization)

  def eval_dataset(self, **kwargs):
    return input_pipeline.eval_dataset(self.config.data, per_process_batch_size=self.batch_size,
                                       **kwargs)

  def tfds_dataset(self, dataset, split, **data_overrides):
    """The eval pipeline on another TFDS dataset; Skipped if it is not prepared."""
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


def eval_clean(ctx, variables, settings):
  del settings
  return ctx.run(variables, ctx.eval_dataset())


def eval_pgd(ctx, variables, settings):
  results = {}
  for eps in settings['epsilons_pixels']:
    attack = ml_collections.ConfigDict(dict(
        epsilon_pixels=float(eps), num_steps=int(settings['num_steps'] or 0), random_start=0.0,
        targeted=False, step_size_pixels=float(settings['step_size_pixels'] or
                                               ctx.config.eval_pgd_step_size_pixels)))
    attack = attack_settings(attack, ctx.config.data.normalization)
    results[f'{float(eps):g}'] = dict(ctx.run(variables, ctx.eval_dataset(), ctx.step(attack)),
                                      num_steps=attack['num_steps'])
  return {'by_epsilon_pixels': results}


def eval_corruptions(ctx, variables, settings, clean_top1=None):
  digits = ctx.config.data.dataset == input_pipeline.DIGITS
  types = settings['types'] or (corruptions.CORRUPTIONS if digits else robustness.IMAGENET_C_TYPES)
  if not digits:
    _require_imagenet(ctx, 'ImageNet-C')
  errors, details, missing = {}, {}, []
  for c in types:
    for s in settings['severities']:
      if digits:
        ds = eval_sets.corrupted_eval_dataset(
            ctx.config.data, corruption=c, severity=int(s), seed=int(settings['seed']),
            per_process_batch_size=ctx.batch_size, max_examples=settings['max_examples'])
      else:
        try:  # TFDS images are already the 224 center crop: resize only
          ds = ctx.tfds_dataset(f'imagenet2012_corrupted/{c}_{s}', 'validation', crop_fraction=1.0)
        except Skipped as e:
          missing.append(str(e))
          continue
      metrics = ctx.run(variables, ds)
      details.setdefault(c, {})[str(s)] = metrics
      errors.setdefault(c, {})[int(s)] = 1.0 - metrics['top1']
  if not errors:
    raise Skipped(missing[0] if missing else 'no corruption evaluated')
  if clean_top1 is None:
    clean_top1 = eval_clean(ctx, variables, {})['top1']
  summary = robustness.mce(errors, 1.0 - clean_top1,
                           reference=None if digits else robustness.ALEXNET_ERR)
  summary.update(suite='digits (tf.image corruptions, no AlexNet reference)' if digits else
                 'ImageNet-C (TFDS imagenet2012_corrupted)', by_type_and_severity=details,
                 missing=missing)
  if missing:
    summary['note'] = f'{len(missing)} corruption/severity datasets missing: mCE covers the rest only'
  return summary


def _eval_imagenet_dataset(name, subset=False):
  def evaluator(ctx, variables, settings):
    _require_imagenet(ctx, name)
    ds = ctx.tfds_dataset(settings['dataset'], settings['split'])
    if not subset:
      return ctx.run(variables, ds)
    builder = tfds.builder(settings['dataset'], data_dir=ctx.config.data.data_dir)
    classes = imagenet_subsets.derive_class_subset(builder, settings['split'])
    return dict(ctx.run(variables, ds, ctx.step(class_indices=classes)),
                num_subset_classes=len(classes),
                subset_source='derived at run time from the labels present in the dataset')
  return evaluator


def eval_stylized(ctx, variables, settings):
  directory = ctx.stylized_dir or settings['dir']
  try:
    ds = eval_sets.folder_eval_dataset(directory, ctx.config.data, num_classes=ctx.config.num_classes,
                                       per_process_batch_size=ctx.batch_size)
  except (FileNotFoundError, ValueError) as e:
    raise Skipped(f'Stylized-ImageNet folder unavailable ({e}). Prepare it: {PREPARE_HINT["stylized"]}.')
  return ctx.run(variables, ds)


EVALUATORS = {
    'clean': eval_clean, 'pgd': eval_pgd, 'corruptions': eval_corruptions,
    'imagenet_a': _eval_imagenet_dataset('ImageNet-A', subset=True),
    'imagenet_r': _eval_imagenet_dataset('ImageNet-R', subset=True),
    'imagenet_v2': _eval_imagenet_dataset('ImageNet-V2'),
    'imagenet_sketch': _eval_imagenet_dataset('ImageNet-Sketch'),
    'stylized': eval_stylized,
}


def evaluator_plan(config, names=None):
  """[(name, settings)] from `names` / config.evaluate / defaults; ValueError for an unknown name."""
  cfg = config.evaluate.to_dict() if 'evaluate' in config else {}
  if not names:
    names = cfg.get('evaluators') or (DIGITS_EVALUATORS if config.data.dataset ==
                                      input_pipeline.DIGITS else ALL_EVALUATORS)
  plan = []
  for name in names:
    if name not in EVALUATORS:
      raise ValueError(f'Unknown evaluator {name!r}; available: {sorted(EVALUATORS)}')
    settings = dict(DEFAULT_SETTINGS[name])
    if name == 'pgd' and tuple(config.get('eval_pgd_epsilons_pixels', ())):
      settings['epsilons_pixels'] = (0.0,) + tuple(config.eval_pgd_epsilons_pixels)
    unknown = set(cfg.get(name, {})) - set(settings)
    if unknown:
      raise ValueError(f'config.evaluate.{name}: unknown settings {sorted(unknown)}')
    settings.update(cfg.get(name, {}))
    plan.append((name, settings))
  return plan


def _summary(out) -> str:
  if 'top1' in out:
    return f'top-1 {out["top1"]:.4f} on {out["count"]} examples'
  if 'by_epsilon_pixels' in out:
    return ', '.join(f'eps {e} px top-1 {r["top1"]:.4f}' for e, r in out['by_epsilon_pixels'].items())
  if 'mce' in out:
    return f'mCE {out["mce"]:.4f}'
  return f'mean corruption error {out.get("mean_corruption_error", float("nan")):.4f}'


def run_evaluators(ctx, variables, plan) -> dict:
  """Runs each evaluator; one that raises Skipped is recorded as skipped and the rest still run."""
  results = {}
  for name, settings in plan:
    start = time.time()
    try:
      if name == 'corruptions' and 'top1' in results.get('clean', {}):
        out = eval_corruptions(ctx, variables, settings, clean_top1=results['clean']['top1'])
      else:
        out = EVALUATORS[name](ctx, variables, settings)
      out['status'] = 'ok'
    except Skipped as e:
      out = {'status': 'skipped', 'reason': str(e)}
      logging.warning('Evaluator %s skipped: %s', name, e)
    out['seconds'] = round(time.time() - start, 2)
    if out['status'] == 'ok':
      logging.info('evaluator %s: %s (%.1f s)', name, _summary(out), out['seconds'])
    results[name] = out
  return results
