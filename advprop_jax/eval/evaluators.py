"""The table of evaluators and the one plan (big_vision style: names and settings) that the training
loop (periodic and final evaluation), `evaluate` and `evaluate --watch` all run.

A plan is [(name, settings)]; settings['type'] names the evaluator (default: the name), so one
evaluator can appear under several names ('minival' is `clean` on the held-out train examples).
`plan(config, stage)`: 'periodic' (every eval step, EMA weights: its `tag` prefixes the
TensorBoard scalars), 'final' (end of training: `weights` says which, each evaluator's
final_scalars name the final_metrics.json keys), 'offline' (evaluate, --watch: every name of
--evaluators / config.evaluate.evaluators / the defaults); config.evaluate.<name>.<key> overrides
a setting in every stage. Nothing outside an evaluator's own definition branches on its name.

Each evaluator's `fn(ctx, variables, settings, done) -> dict` runs on flax variables {'params',
'batch_stats', ...} (the main BN is used); `done` holds the results of the plan's earlier entries
on the same weights; one that cannot run here raises `Skipped` with the reason.
  clean            exact top-1/top-5 on config.data.eval_split (split=minival.SPLIT: the holdout)
  pgd              white-box untargeted L-inf PGD (main BN) at each eps in pixels (eps 0 = exact clean)
  corruptions      ImageNet: TFDS imagenet2012_corrupted/<type>_<severity> (15 x 5) + mCE
                   (robustness.py); other datasets: data/corruptions.py types x severities on the
                   fly, severity constants 'imagenet_c' (default) or 'cifar10_c' (32 px images)
  imagenet_a/_r    TFDS imagenet_a / imagenet_r, logits restricted to their 200 classes (derived from the
                   dataset's labels at run time: data/imagenet_subsets.py)
  imagenet_v2 / imagenet_sketch   TFDS imagenet_v2/matched-frequency / imagenet_sketch
  stylized         an ImageFolder directory (--stylized_dir or config.evaluate.stylized.dir)
"""
import copy
import dataclasses
import json
import logging
import time

import jax
import ml_collections
import tensorflow_datasets as tfds

from advprop_jax import best_checkpoint
from advprop_jax.data import corruptions
from advprop_jax.data import eval_sets
from advprop_jax.data import imagenet_subsets
from advprop_jax.data import input_pipeline
from advprop_jax.data import minival
from advprop_jax.eval import loop
from advprop_jax.eval import robustness
from advprop_jax.eval.step import make_eval_step
from advprop_jax.methods.passes import attack_settings

ALL_EVALUATORS = ('clean', 'pgd', 'corruptions', 'imagenet_a', 'imagenet_r', 'imagenet_v2',
                  'imagenet_sketch', 'stylized')
DIGITS_EVALUATORS = ('clean', 'pgd', 'corruptions')
IMAGENET = 'imagenet2012'  # the dataset whose corruptions are TFDS's ImageNet-C
# Named entries of other evaluators: name -> settings (with the evaluator's 'type').
NAMED = {minival.NAME: dict(type='clean', split=minival.SPLIT)}
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


def eval_clean(ctx, variables, settings, done=None):
  del done
  return ctx.run(variables, ctx.eval_dataset(split=settings.get('split')))


def _clean_final(result, weights) -> dict:
  return {f'{weights}_clean_top1': result['top1'], f'{weights}_clean_top5': result['top5'],
          'eval_examples': result['count']}


def eval_pgd(ctx, variables, settings, done=None):
  del done
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


def _pgd_from_config(config) -> dict:
  """The training config's PGD epsilons (eval_pgd_epsilons_pixels), after an exact clean eps 0."""
  eps = tuple(config.get('eval_pgd_epsilons_pixels', ()))
  return {'epsilons_pixels': (0.0,) + eps} if eps else {}


def _pgd_final(result, weights) -> dict:
  return {f'{weights}_pgd{eps}_top1': r['top1'] for eps, r in result['by_epsilon_pixels'].items()}


def eval_corruptions(ctx, variables, settings, done=None):
  """ImageNet: TFDS imagenet2012_corrupted (ImageNet-C, 15 x 5) and mCE against AlexNet. Any other
  dataset: its eval split corrupted on the fly (data/corruptions.py) with the severity `constants`
  ('imagenet_c', made for 224 px images, or 'cifar10_c' for 32 px ones)."""
  clean_top1 = (done or {}).get('clean', {}).get('top1')  # the plan's clean result, if it ran
  on_the_fly = ctx.config.data.dataset != IMAGENET
  constants = settings['constants']
  _check_corruptions(settings)
  types = settings['types'] or (corruptions.CORRUPTIONS if on_the_fly else
                                robustness.IMAGENET_C_TYPES)
  if not on_the_fly:
    _require_imagenet(ctx, 'ImageNet-C')
  errors, details, missing = {}, {}, []
  for c in types:
    for s in settings['severities']:
      if on_the_fly:
        ds = eval_sets.corrupted_eval_dataset(
            ctx.config.data, corruption=c, severity=int(s), seed=int(settings['seed']),
            per_process_batch_size=ctx.batch_size, max_examples=settings['max_examples'],
            constants=constants)
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
                           reference=None if on_the_fly else robustness.ALEXNET_ERR)
  summary.update(suite=(f'{ctx.config.data.dataset} corrupted on the fly (tf.image corruptions, '
                        f'{constants} severities, no AlexNet reference)') if on_the_fly else
                 'ImageNet-C (TFDS imagenet2012_corrupted)', by_type_and_severity=details,
                 missing=missing)
  if missing:
    summary['note'] = f'{len(missing)} corruption/severity datasets missing: mCE covers the rest only'
  return summary


def _check_corruptions(settings):
  if settings['constants'] not in corruptions.SEVERITY_CONSTANTS:
    raise ValueError(f'config.evaluate.corruptions.constants={settings["constants"]!r}: choose '
                     f'from {sorted(corruptions.SEVERITY_CONSTANTS)}')


def _eval_imagenet_dataset(name, subset=False):
  def evaluator(ctx, variables, settings, done=None):
    del done
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


def eval_stylized(ctx, variables, settings, done=None):
  del done
  directory = ctx.stylized_dir or settings['dir']
  try:
    ds = eval_sets.folder_eval_dataset(directory, ctx.config.data, num_classes=ctx.config.num_classes,
                                       per_process_batch_size=ctx.batch_size)
  except (FileNotFoundError, ValueError) as e:
    raise Skipped(f'Stylized-ImageNet folder unavailable ({e}). Prepare it: {PREPARE_HINT["stylized"]}.')
  return ctx.run(variables, ds)


@dataclasses.dataclass(frozen=True)
class Evaluator:
  fn: object  # (ctx, variables, settings, done) -> result dict
  defaults: dict
  from_config: object = None  # training config -> settings it implies (before config.evaluate)
  final_scalars: object = None  # (result, weights) -> final_metrics.json entries
  check: object = None  # settings -> None, or ValueError naming the setting (before any compile)


EVALUATORS = {
    'clean': Evaluator(eval_clean, dict(split=None), final_scalars=_clean_final),
    'pgd': Evaluator(eval_pgd, dict(epsilons_pixels=(0.0, 1.0, 2.0, 4.0), step_size_pixels=None,
                                    num_steps=0), _pgd_from_config, _pgd_final),
    'corruptions': Evaluator(eval_corruptions, dict(types=None, severities=(1, 2, 3, 4, 5), seed=0,
                                                    max_examples=None, constants='imagenet_c'),
                             check=_check_corruptions),
    'imagenet_a': Evaluator(_eval_imagenet_dataset('ImageNet-A', subset=True),
                            dict(dataset='imagenet_a', split='test')),
    'imagenet_r': Evaluator(_eval_imagenet_dataset('ImageNet-R', subset=True),
                            dict(dataset='imagenet_r', split='test')),
    'imagenet_v2': Evaluator(_eval_imagenet_dataset('ImageNet-V2'),
                             dict(dataset='imagenet_v2/matched-frequency', split='test')),
    'imagenet_sketch': Evaluator(_eval_imagenet_dataset('ImageNet-Sketch'),
                                 dict(dataset='imagenet_sketch', split='test')),
    'stylized': Evaluator(eval_stylized, dict(dir=None)),
}


def settings_of(config, name: str) -> dict:
  """The settings of plan entry `name`: its evaluator's defaults, what the training config implies,
  the entry's own (NAMED), then config.evaluate.<name>; ValueError for an unknown name or key."""
  cfg = config.evaluate.to_dict() if 'evaluate' in config else {}
  named = NAMED.get(name, {})
  kind = named.get('type', name)
  if kind not in EVALUATORS:
    raise ValueError(f'Unknown evaluator {name!r}; available: {sorted(EVALUATORS) + sorted(NAMED)}')
  evaluator = EVALUATORS[kind]
  settings = dict(evaluator.defaults, type=kind)
  settings.update(evaluator.from_config(config) if evaluator.from_config else {})
  settings.update(named)
  unknown = set(cfg.get(name, {})) - set(settings)
  if unknown:
    raise ValueError(f'config.evaluate.{name}: unknown settings {sorted(unknown)}')
  settings.update(cfg.get(name, {}))
  if evaluator.check is not None:
    evaluator.check(settings)
  return settings


def offline_names(config) -> tuple:
  """What `evaluate` and --watch run without --evaluators: config.evaluate.evaluators, else the
  dataset's defaults, and the minival when the run holds one out."""
  cfg = config.evaluate.to_dict() if 'evaluate' in config else {}
  names = tuple(cfg.get('evaluators') or (DIGITS_EVALUATORS if config.data.dataset ==
                                          input_pipeline.DIGITS else ALL_EVALUATORS))
  return names + ((minival.NAME,) if minival.examples(config.data) else ())


def plan(config, stage: str, names=None) -> list:
  """[(name, settings)] of one stage: 'periodic', 'final' or 'offline' (names: --evaluators)."""
  if stage == 'offline':
    return [(name, settings_of(config, name)) for name in (names or offline_names(config))]
  if stage == 'periodic':  # the cost of today's: one clean pass of the EMA weights
    name = minival.NAME if minival.examples(config.data) else 'clean'
    return [(name, dict(settings_of(config, name), weights=('ema',),
                        tag=best_checkpoint.periodic_prefix(config)))]
  if stage != 'final':
    raise ValueError(f'unknown plan stage {stage!r}')
  final = [('clean', dict(settings_of(config, 'clean'), weights=('ema', 'raw')))]
  if config.eval_pgd_epsilons_pixels:  # the final table's PGD columns: the config's epsilons only
    final.append(('pgd', dict(settings_of(config, 'pgd'), weights=('ema',),
                              epsilons_pixels=tuple(config.eval_pgd_epsilons_pixels))))
  return final


def evaluator_plan(config, names=None):
  """The offline plan: [(name, settings)] from `names` / config.evaluate / defaults."""
  return plan(config, 'offline', names)


def final_scalars(plan_entries, results: dict, weights: str) -> dict:
  """final_metrics.json entries of `results` (run_evaluators on `weights`), by each evaluator."""
  out = {}
  for name, settings in plan_entries:
    hook = EVALUATORS[settings['type']].final_scalars
    if hook is not None and results.get(name, {}).get('status') == 'ok':
      out.update(hook(results[name], weights))
  return out


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
      out = EVALUATORS[settings.get('type', name)].fn(ctx, variables, settings, results)
      out['status'] = 'ok'
    except Skipped as e:
      out = {'status': 'skipped', 'reason': str(e)}
      logging.warning('Evaluator %s skipped: %s', name, e)
    out['seconds'] = round(time.time() - start, 2)
    if out['status'] == 'ok':
      logging.info('evaluator %s: %s (%.1f s)', name, _summary(out), out['seconds'])
    results[name] = out
  return results
