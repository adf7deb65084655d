"""advprop_jax.eval (evaluators, robustness, workdir, report, the subset eval step) / data.corruptions /
data.imagenet_subsets (issue #8)."""
import json
import os

import jax
import numpy as np
import pytest
import tensorflow as tf

from advprop_jax import parallel
from advprop_jax import step as step_lib
from advprop_jax.data import corruptions
from advprop_jax.data import imagenet_subsets
from advprop_jax.eval import evaluators
from advprop_jax.eval import report
from advprop_jax.eval import robustness
from advprop_jax.eval import saved_run
from advprop_jax.eval.step import make_eval_step
from conftest import tiny_efficientnet


def test_mce_matches_hand_computation():
  errors = {'gaussian_noise': {1: .5, 2: .6, 3: .7, 4: .8, 5: .9},   # mean .7
            'brightness': {1: .3, 2: .3, 3: .4, 4: .4, 5: .6}}        # mean .4
  out = robustness.mce(errors, clean_err=.25, reference=robustness.ALEXNET_ERR)
  ce_g, ce_b = .7 / .886, .4 / .565
  rel_g, rel_b = (.7 - .25) / (.886 - .4348), (.4 - .25) / (.565 - .4348)
  assert out['per_corruption']['gaussian_noise']['ce'] == pytest.approx(ce_g)
  assert out['mce'] == pytest.approx((ce_g + ce_b) / 2)
  assert out['relative_mce'] == pytest.approx((rel_g + rel_b) / 2)
  assert out['mean_corruption_error'] == pytest.approx(.55)
  # Equals the paper's sum-over-severities form when all 5 severities are present.
  assert out['mce'] == pytest.approx(np.mean([sum(errors[c].values()) / (5 * robustness.ALEXNET_ERR[c])
                                              for c in errors]))
  plain = robustness.mce(errors, clean_err=.25)
  assert 'mce' not in plain and plain['mean_corruption_error_minus_clean'] == pytest.approx(.3)
  assert len(robustness.ALEXNET_ERR) == 15


def test_imagenet_class_lists():
  wnids = imagenet_subsets.imagenet_wnids()
  assert len(wnids) == 1000 == len(set(wnids)) and wnids[0] == 'n01440764'
  labels = np.repeat(np.arange(0, 1000, 5), 3)  # 200 classes, each seen 3 times
  subset = imagenet_subsets.class_subset_from_labels(labels)
  assert len(subset) == 200 == len(set(subset.tolist())) and list(subset[:2]) == [0, 5]
  with pytest.raises(ValueError, match='199 distinct'):
    imagenet_subsets.class_subset_from_labels(labels[3:])


@pytest.mark.parametrize('name', corruptions.CORRUPTIONS)
def test_corruptions_deterministic_uint8(name):
  rng = np.random.default_rng(0)
  image = tf.constant(rng.integers(0, 256, [32, 32, 3]), tf.uint8)
  previous = None
  for severity in corruptions.SEVERITIES:
    seed = corruptions.corruption_seed(0, name, severity, 7)
    a = corruptions.corrupt(image, name, severity, seed).numpy()
    b = corruptions.corrupt(image, name, severity, seed).numpy()
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, image.numpy()), (name, severity)
    if previous is not None:
      assert not np.array_equal(a, previous), (name, severity)
    previous = a
  with pytest.raises(ValueError):
    corruptions.corrupt(image, name, 6, seed)


def test_cifar10_c_constants_are_make_cifar_c_and_milder_than_imagenet_c():
  flat = tf.fill([32, 32, 3], tf.constant(128, tf.uint8))
  for constants, sigma in (('imagenet_c', .08), ('cifar10_c', .04)):  # gaussian_noise, severity 1
    noisy = corruptions.corrupt(flat, 'gaussian_noise', 1, [0, 1], constants).numpy() / 255.
    assert abs(np.std(noisy) - sigma) < .1 * sigma, (constants, np.std(noisy))
  image = tf.constant(np.random.default_rng(1).integers(0, 256, [32, 32, 3]), tf.uint8)
  x = image.numpy() / 255.
  mean = x.mean(axis=(0, 1), keepdims=True)
  for severity, c in zip(corruptions.SEVERITIES, (.75, .5, .4, .3, .15)):  # make_cifar_c.py
    out = corruptions.corrupt(image, 'contrast', severity, [0, 0], 'cifar10_c').numpy()
    np.testing.assert_allclose(out, np.round(((x - mean) * c + mean) * 255), atol=1)
  for name in corruptions.CORRUPTIONS:
    for severity in corruptions.SEVERITIES:
      seed = corruptions.corruption_seed(0, name, severity, 3)
      change = {k: np.abs(corruptions.corrupt(image, name, severity, seed, k).numpy() / 255. - x)
                .mean() for k in corruptions.SEVERITY_CONSTANTS}
      assert 0 < change['cifar10_c'] < change['imagenet_c'], (name, severity, change)
  with pytest.raises(ValueError, match='cifar10_c'):
    corruptions.corrupt(image, 'contrast', 1, [0, 0], 'cifar10')


@pytest.fixture(scope='module')
def digits_ctx(tmp_path_factory):
  from configs import demo
  config = demo.get_config()
  config.data.data_dir = str(tmp_path_factory.mktemp('tfds'))
  config.eval_batch_size = 40
  model = tiny_efficientnet()
  variables = step_lib.init_variables(model, jax.random.PRNGKey(0), 32)
  mesh = parallel.create_mesh(-1)
  ctx = evaluators.Context(config, model, mesh)
  ctx.variables = variables  # the weights these tests evaluate
  return ctx


def _write_png_folder(root, classes):
  for c in classes:
    os.makedirs(os.path.join(root, c))
    for i in range(3):
      png = tf.io.encode_png(tf.constant(np.full([40, 48, 3], 30 * i, np.uint8)))
      tf.io.write_file(os.path.join(root, c, f'{i}.png'), png)


def test_evaluators_end_to_end_on_digits(digits_ctx, tmp_path):
  _write_png_folder(str(tmp_path / 'stylized'), ['0', '3'])
  digits_ctx.stylized_dir = str(tmp_path / 'stylized')
  with digits_ctx.config.unlocked():
    digits_ctx.config.evaluate = dict(
        pgd=dict(epsilons_pixels=(0.0, 2.0), num_steps=1),
        corruptions=dict(types=('gaussian_noise', 'contrast', 'jpeg_compression'),
                         severities=(1, 5), max_examples=80))
  plan = evaluators.evaluator_plan(digits_ctx.config, ['clean', 'pgd', 'corruptions', 'stylized',
                                                       'imagenet_a'])
  results = evaluators.run_evaluators(digits_ctx, digits_ctx.variables, plan)
  clean = results['clean']
  assert clean['status'] == 'ok' and clean['count'] == 360
  pgd = results['pgd']['by_epsilon_pixels']
  assert pgd['0']['top1'] == clean['top1'] and pgd['0']['loss'] == pytest.approx(clean['loss'])
  assert pgd['2']['top1'] <= clean['top1'] and pgd['2']['num_steps'] == 1
  cor = results['corruptions']
  assert cor['status'] == 'ok' and set(cor['by_type_and_severity']) == {
      'gaussian_noise', 'contrast', 'jpeg_compression'}
  assert cor['by_type_and_severity']['contrast']['5']['count'] == 80
  assert cor['clean_error'] == pytest.approx(1 - clean['top1']) and 'mce' not in cor
  assert results['stylized']['status'] == 'ok' and results['stylized']['count'] == 6
  assert results['imagenet_a']['status'] == 'skipped'
  assert '1000-class' in results['imagenet_a']['reason']
  # Corrupted inputs are deterministic across runs.
  again = evaluators.run_evaluators(digits_ctx, digits_ctx.variables, [p for p in plan if p[0] == 'corruptions'])
  assert again['corruptions']['by_type_and_severity'] == cor['by_type_and_severity']

  out = tmp_path / 'eval'
  report.write_outputs(str(out), dict(workdir='w', model='efficientnet-b7', method='advprop',
                                      dataset='sklearn_digits', ema=True), results)
  saved = json.loads((out / 'eval_metrics.json').read_text())
  assert saved['results']['clean']['top1'] == clean['top1']
  assert set(saved['plots']) == {'pgd_accuracy.png', 'corruption_error.png'}
  text = (out / 'report.md').read_text()
  assert 'skipped' in text and '59.4' in text and 'White-box PGD' in text


@pytest.fixture
def digits_ctx_copy(digits_ctx):
  """digits_ctx with a config of its own (the test's config.evaluate stays with the test)."""
  import copy
  ctx = copy.copy(digits_ctx)
  ctx.config = copy.deepcopy(digits_ctx.config)
  return ctx


def test_corruptions_on_the_fly_use_the_chosen_severity_constants(digits_ctx_copy):
  digits_ctx, config = digits_ctx_copy, digits_ctx_copy.config
  results = {}
  for constants in ('imagenet_c', 'cifar10_c'):
    with config.unlocked():
      config.evaluate = dict(corruptions=dict(types=('contrast',), severities=(5,), max_examples=40,
                                              constants=constants))
    plan = evaluators.evaluator_plan(config, ['corruptions'])
    results[constants] = evaluators.run_evaluators(digits_ctx, digits_ctx.variables,
                                                   plan)['corruptions']
    assert f'{constants} severities' in results[constants]['suite']
  imagenet, cifar = (results[k]['by_type_and_severity']['contrast']['5'] for k in results)
  assert imagenet['count'] == cifar['count'] == 40 and imagenet['loss'] != cifar['loss']
  with config.unlocked():
    config.evaluate = dict(corruptions=dict(constants='cifar'))
  with pytest.raises(ValueError, match=r"config.evaluate.corruptions.constants='cifar'"):
    evaluators.evaluator_plan(config, ['clean', 'corruptions'])  # the plan, before any compile


def test_missing_dataset_is_skipped_with_its_name(digits_ctx, tmp_path):
  import copy
  config = copy.deepcopy(digits_ctx.config)
  with config.unlocked():
    config.num_classes = 1000
    config.data.data_dir = str(tmp_path)  # nothing prepared here
  ctx = evaluators.Context(config, None, digits_ctx.mesh)
  config.data.dataset = 'imagenet2012'
  results = evaluators.run_evaluators(ctx, {'params': {}}, evaluators.evaluator_plan(
      config, ['imagenet_a', 'imagenet_r', 'imagenet_v2', 'imagenet_sketch', 'stylized']))
  for name, dataset in (('imagenet_a', 'imagenet_a'), ('imagenet_r', 'imagenet_r'),
                        ('imagenet_v2', 'imagenet_v2/matched-frequency'),
                        ('imagenet_sketch', 'imagenet_sketch')):
    assert results[name]['status'] == 'skipped'
    assert f"TFDS dataset '{dataset}'" in results[name]['reason'] and 'tfds build' in results[name]['reason']
  assert results['stylized']['status'] == 'skipped' and '--stylized_dir' in results['stylized']['reason']
  cor = evaluators.run_evaluators(ctx, {'params': {}},
                                 evaluators.evaluator_plan(config, ['corruptions']))['corruptions']
  assert cor['status'] == 'skipped' and 'imagenet2012_corrupted/gaussian_noise_1' in cor['reason']
  assert 'downloads/manual' in cor['reason']


def test_plan_and_config_json(tmp_path):
  from configs import demo
  config = demo.get_config()
  names = [n for n, _ in evaluators.evaluator_plan(config)]
  assert names == ['clean', 'pgd', 'corruptions']
  assert dict(evaluators.evaluator_plan(config))['pgd']['epsilons_pixels'] == (0.0, 4.0)
  with config.unlocked():
    config.evaluate = dict(evaluators=['clean'], bogus=dict(x=1))
  assert [n for n, _ in evaluators.evaluator_plan(config)] == ['clean']
  with pytest.raises(ValueError, match='Unknown evaluator'):
    evaluators.evaluator_plan(config, ['nope'])
  with config.unlocked():
    config.evaluate = dict(pgd=dict(eps=1))
  with pytest.raises(ValueError, match='unknown settings'):
    evaluators.evaluator_plan(config, ['pgd'])
  (tmp_path / 'config.json').write_text(config.to_json_best_effort())
  loaded = saved_run.load_config(str(tmp_path))
  assert loaded.model == config.model and loaded.data.image_size == 32
  with pytest.raises(FileNotFoundError, match='--config'):
    saved_run.load_config(str(tmp_path / 'none'))


def test_subset_eval_step_restricts_logits(digits_ctx):
  ctx, subset = digits_ctx, np.array([1, 3, 5, 7, 8, 9])
  step = make_eval_step(ctx.model, ctx.mesh, num_classes=10, class_indices=subset)
  rng = np.random.default_rng(1)
  batch = dict(image=rng.uniform(-1, 1, [16, 32, 32, 3]).astype(np.float32),
               label=rng.choice(subset, 16).astype(np.int32), mask=np.ones([16], np.float32))
  batch['mask'][-2:] = 0
  sharding = parallel.batch_sharding(ctx.mesh)
  params = ctx.variables['params']
  model_state = {k: v for k, v in ctx.variables.items() if k != 'params'}
  sums = step(params, model_state, jax.device_put(batch, sharding))
  logits = np.asarray(ctx.model.apply(ctx.variables, batch['image'], train=False))[:, subset]
  pred = subset[np.argmax(logits, -1)]
  assert float(sums['count']) == 14
  assert float(sums['top1']) == np.sum((pred == batch['label'])[:14])
