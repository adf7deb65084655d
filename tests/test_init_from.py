"""Fine-tuning from weights (config.init_from, configs/finetune.py): the four source kinds, head
re-init, resume precedence, the one-line mismatch error, and a timm-written checkpoint that
fine-tunes and exports back to timm.

Every source holds the weights of tests/fixtures/tiny_timm.safetensors (written by timm itself, see
scripts/make_timm_fixture.py). Runs use configs/finetune.py:b0 shrunk to that tiny model on the
digits dataset. "Loaded exactly" is checked end to end: a run with learning rate 0 and BN momentum 1
(running statistics kept as they are) exports every weight and BN statistic of the source unchanged.
"""
import functools
import json
import os
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from advprop_jax import checkpoints, cli, convert, export, factories, init_from, main, parallel
from advprop_jax import trainer
from advprop_jax import config as config_lib
from advprop_jax import step as step_lib
from export_fixtures import ROOT, write_workdir

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
TIMM_FILE = os.path.join(FIXTURES, 'tiny_timm.safetensors')
with open(os.path.join(FIXTURES, 'tiny_timm.json')) as _f:
  TINY = json.load(_f)
OVERRIDES = dict(width=TINY['width'], depth=TINY['depth'])
KINDS = ('workdir', 'flax', 'timm', 'tf')
CLASSIFIER = ('params', 'classifier')


def settings(data_dir, **extra):
  """configs/finetune.py:b0 overrides: the fixture's tiny model, digits at 16 px, 8 images per step,
  one step with LR 0 and BN momentum 1 (nothing may change the loaded weights); any field in
  `extra`."""
  values = {
      'model_overrides.width': OVERRIDES['width'], 'model_overrides.depth': OVERRIDES['depth'],
      'model_overrides.depthwise_impl': 'grouped', 'model_overrides.bn_momentum': 1.0,
      'dtype': 'float32', 'num_classes': TINY['num_classes'], 'data.dataset': 'sklearn_digits',
      'data.data_dir': data_dir, 'data.image_size': 16, 'data.crop_fraction': 1.0,
      'data.train_crop': 'resize', 'data.augment': 'none', 'data.random_flip': False,
      'data.cache': True, 'data.shuffle_buffer': 64, 'global_batch_size': 8, 'eval_batch_size': 120,
      'base_learning_rate': 0.0, 'warmup_epochs': 0.0, 'max_steps': 1, 'eval_every_epochs': 100.0,
      'eval_pgd_epsilons_pixels': (), 'log_every_steps': 1, 'bn_group_size': -1,
      'prng_impl': 'rbg'}
  values.update(extra)
  return values


def make_config(values):
  config = config_lib.load_file(os.path.join(ROOT, 'configs', 'finetune.py'), 'b0')
  config.update_from_flattened_dict(dict(values))
  return config


def cli_args(values):
  return [f'--config.{k}={v}' for k, v in values.items()]


def flat(tree):
  tree = traverse_util.flatten_dict(jax.device_get(dict(tree)))
  return {k: np.asarray(v) for k, v in tree.items()}


@pytest.fixture(scope='module', autouse=True)
def one_device():
  """Runs here train on one device: the step's mean over devices of the replicated BN statistics
  (8 identical values summed, then divided) is not exact in float32, so an LR-0 run on 8 simulated
  devices moves them by an ulp whatever init_from did."""
  create_mesh = parallel.create_mesh
  with pytest.MonkeyPatch.context() as patch:
    one = jax.devices()[:1]
    patch.setattr(parallel, 'create_mesh', lambda bn_group_size=0, devices=None, **_: create_mesh(
        bn_group_size, one))
    yield


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def timm_state():
  return convert.load_state_dict(TIMM_FILE)


@pytest.fixture(scope='module')
def truth(timm_state):
  """The fixture's weights as main-distribution Flax variables (flat)."""
  return flat(convert.timm_to_flax(timm_state, 'efficientnet-b0', distributions=('clean',),
                                   **OVERRIDES))


def _save_tf(directory, tensors):
  import tensorflow as tf
  os.makedirs(directory)
  keys = sorted(tensors)
  tf.raw_ops.SaveV2(prefix=os.path.join(directory, 'model.ckpt'), tensor_names=keys,
                    shape_and_slices=[''] * len(keys),
                    tensors=[tf.constant(tensors[k]) for k in keys])
  with open(os.path.join(directory, 'checkpoint'), 'w') as f:  # what tf.train.Saver writes too
    f.write('model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n')


@pytest.fixture(scope='module')
def sources(tmp_path_factory, data_dir, timm_state, truth):
  """kind -> path, each holding the fixture's weights. The workdir's raw weights, its auxiliary BNs
  and the TF checkpoint's raw variables differ from them: reading the wrong ones shows."""
  root = tmp_path_factory.mktemp('sources')
  full = flat(convert.timm_to_flax(timm_state, 'efficientnet-b0', **OVERRIDES))  # clean + adv BNs
  full = {p: v + 0.5 if p[0] == 'batch_stats_adv' or p[-1].endswith('_adv') else v
          for p, v in full.items()}
  workdir = write_workdir(root / 'workdir', make_config(settings(data_dir)),
                          traverse_util.unflatten_dict(full))
  flax_dir = export.export(workdir, 'flax', str(root / 'flax'))
  scope, rng, tensors = 'efficientnet-b0', np.random.RandomState(4), {}
  for e in convert.tf_mapping('efficientnet-b0', num_classes=10, **OVERRIDES):
    name = f'{scope}/{e.name}'
    ema = e.from_flax(truth[e.path], 'tf')  # TF layouts (tests/test_convert.py checks them)
    tensors[name + '/ExponentialMovingAverage'] = ema
    tensors[name] = ema + rng.normal(size=ema.shape).astype(np.float32)
  _save_tf(str(root / 'tf'), tensors)
  return dict(workdir=workdir, flax=flax_dir, timm=TIMM_FILE, tf=str(root / 'tf'))


def train_and_export(values, workdir, fmt='flax'):
  """(final metrics, exported main variables) of a run with `values`."""
  final = trainer.train_and_evaluate(make_config(values), str(workdir))
  out = os.path.join(str(workdir), 'export' + ('.safetensors' if fmt == 'timm' else ''))
  export.export(str(workdir), fmt, out)
  if fmt == 'timm':
    return final, convert.load_state_dict(out)
  return final, flat(export.load_exported_flax(out)[2])


@pytest.mark.parametrize('kind', KINDS)
def test_each_source_kind_loads_every_weight_exactly(kind, sources, truth, data_dir, tmp_path):
  values = settings(data_dir, init_from=sources[kind])
  final, exported = train_and_export(values, tmp_path / 'run')
  assert final['step'] == 1  # a new run: the step starts at 0, not at the source's
  assert exported.keys() == truth.keys()
  for path, value in truth.items():
    np.testing.assert_array_equal(exported[path], value, err_msg='/'.join(path))
  # Every auxiliary BN started as a copy of the main one (not the source workdir's own aux BNs).
  variables, _ = checkpoints.load_inference_variables(str(tmp_path / 'run'), ema=False)
  variables = flat(variables)
  for path, value in variables.items():
    if path[0] == 'batch_stats_adv' or path[-1].endswith('_adv'):
      main_path = (path[:-1] + (path[-1][:-len('_adv')],) if path[0] == 'params'
                   else ('batch_stats',) + path[1:])
      np.testing.assert_array_equal(value, truth[main_path], err_msg='/'.join(path))


def test_initial_state_is_fresh_with_the_ema_at_the_loaded_weights(sources, truth, data_dir):
  config = make_config(settings(data_dir, init_from=sources['workdir'], init_from_weights='raw'))
  model = factories.build_model(config)
  source = init_from.load(config, model)
  raw = flat(checkpoints.load_inference_variables(sources['workdir'], ema=False)[0])
  assert all(np.array_equal(source.variables[p], raw[p]) for p in truth)  # raw = EMA + 1 there
  tx, _ = factories.build_optimizer(config, 10.0)
  mesh = parallel.create_mesh(config.bn_group_size)
  state = init_from.initial_state(source, model, tx, config, mesh)
  assert int(state.step) == 0
  for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(state.ema_model_state), jax.tree.leaves(state.model_state)):
    np.testing.assert_array_equal(a, b)
  fresh = tx.init(state.params)
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(fresh)
  for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(a, b)
  # The TF source's raw variables are its non-EMA ones.
  config = make_config(settings(data_dir, init_from=sources['tf'], init_from_weights='raw'))
  tf_raw = init_from.load(config, model).variables
  assert not np.array_equal(tf_raw[('params', 'stem_conv', 'kernel')],
                            truth[('params', 'stem_conv', 'kernel')])


def test_head_of_another_size_is_reinitialised_and_nothing_else(sources, truth, data_dir, caplog):
  caplog.set_level('INFO')
  config = make_config(settings(data_dir, init_from=sources['timm'], num_classes=12))
  model = factories.build_model(config)
  source = init_from.load(config, model)
  assert source.reinit_head
  tx, _ = factories.build_optimizer(config, 10.0)
  state = init_from.initial_state(source, model, tx, config, parallel.create_mesh(-1))
  lines = [r.getMessage() for r in caplog.records if 're-initialised' in r.getMessage()]
  assert len(lines) == 1 and '12 classes' in lines[0], lines
  loaded = flat(trainer.variables(state.params, state.model_state))
  for path, value in truth.items():
    if path[:2] != CLASSIFIER:
      np.testing.assert_array_equal(loaded[path], value, err_msg='/'.join(path))
  # The new head is what a run from scratch initialises with the same seed.
  init = jax.jit(functools.partial(step_lib.init_variables, model, image_size=16))
  fresh = flat(init(jax.random.PRNGKey(config.seed)))
  for leaf in ('kernel', 'bias'):
    path = CLASSIFIER + (leaf,)
    assert loaded[path].shape[-1] == 12
    np.testing.assert_array_equal(loaded[path], fresh[path])


@pytest.fixture(scope='module')
def fine_tuned(tmp_path_factory, sources, data_dir):
  """A run that fine-tunes the timm-written fixture for 3 steps (LR > 0) with a new 12-class head,
  exported as timm."""
  workdir = tmp_path_factory.mktemp('fine_tuned') / 'run'
  values = settings(data_dir, init_from=sources['timm'], num_classes=12, base_learning_rate=0.5,
                    max_steps=3, **{'model_overrides.bn_momentum': 0.9})
  final, state = train_and_export(values, workdir, fmt='timm')
  return values, workdir, final, state


def test_timm_written_checkpoint_fine_tunes_and_exports_back_to_timm(fine_tuned, timm_state):
  _, _, final, state = fine_tuned
  assert final['step'] == 3
  # What timm's load_state_dict(strict=True) checks: the names and shapes of timm's own file (here
  # tf_efficientnet_b0 with num_classes=12: 12 classifier rows).
  assert state.keys() == timm_state.keys()
  for name, value in timm_state.items():
    shape = (12,) + value.shape[1:] if name.startswith('classifier.') else value.shape
    assert state[name].shape == shape and state[name].dtype == value.dtype, name
  changed = [n for n in timm_state if not n.endswith('num_batches_tracked') and
             not n.startswith('classifier.') and not np.array_equal(state[n], timm_state[n])]
  assert 'conv_stem.weight' in changed and 'bn1.running_var' in changed  # it trained


def test_workdir_with_a_checkpoint_resumes_and_ignores_init_from(fine_tuned, tmp_path, caplog):
  caplog.set_level('INFO')
  values, workdir, _, _ = fine_tuned
  missing = str(tmp_path / 'no_such_weights.safetensors')  # would fail if it were read
  final = trainer.train_and_evaluate(make_config(dict(values, init_from=missing, max_steps=4)),
                                     str(workdir))
  assert final['step'] == 4  # resumed at step 3
  lines = [r.getMessage() for r in caplog.records if 'init_from ignored' in r.getMessage()]
  assert len(lines) == 1 and 'resuming' in lines[0], lines


@pytest.mark.parametrize('kind', KINDS)
def test_architecture_mismatch_is_one_line_exit_2_nothing_written(kind, sources, data_dir, tmp_path,
                                                                  capsys):
  workdir = tmp_path / 'run'
  values = settings(data_dir, init_from=sources[kind], **{'model_overrides.width': 0.5})
  argv = [f'--config={os.path.join(ROOT, "configs", "finetune.py")}:b0', f'--workdir={workdir}',
          *cli_args(values)]
  assert cli.call(main.define_flags, main.main, 'advprop_jax.main', argv) == 2
  text = capsys.readouterr().err
  err = [line for line in text.splitlines() if line.startswith('advprop_jax.main: error:')]
  assert len(err) == 1 and 'Traceback' not in text, text
  assert f'config.init_from={sources[kind]}' in err[0] and 'first difference' in err[0], err
  # Both shapes of the first differing parameter: 8 channels in the source, 16 at width 0.5.
  assert 'source (' in err[0] and "this run's model (" in err[0], err
  assert not workdir.exists()


def test_bad_sources_are_one_config_error(sources, data_dir, tmp_path, monkeypatch):
  model = factories.build_model(make_config(settings(data_dir)))
  (tmp_path / 'notes.txt').write_text('x')
  (tmp_path / 'w.pth').write_bytes(b'not a pickle')
  monkeypatch.setitem(sys.modules, 'torch', None)  # torch is not a dependency
  for path, needle in ((tmp_path / 'nope', 'does not exist'), (tmp_path, 'none of the known kinds'),
                       (tmp_path / 'notes.txt', 'Unknown weight file type'),
                       (tmp_path / 'w.pth', 'needs torch'), ('gs://b/w.safetensors', 'local')):
    config = make_config(settings(data_dir, init_from=str(path)))
    with pytest.raises(config_lib.ConfigError, match=needle) as e:
      init_from.load(config, model)
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('arg', ['b0', 'b3', 'b8', 'l2'])
def test_finetune_recipe(arg):
  c = config_lib.load_file(os.path.join(ROOT, 'configs', 'finetune.py'), arg)
  pretrain = config_lib.load_file(os.path.join(ROOT, 'configs', 'efficientnet.py'), arg)
  assert c.method == 'advprop' and c.attack.epsilon_pixels == pretrain.attack.epsilon_pixels
  assert c.data.image_size == pretrain.data.image_size and c.data.normalization == 'minus_one_one'
  assert c.num_epochs < pretrain.num_epochs
  assert c.base_learning_rate * c.global_batch_size < (
      pretrain.base_learning_rate * pretrain.global_batch_size)
  assert c.init_from is None and c.init_from_weights == 'ema'
  config_lib.validate(c, num_devices=8)
  c.init_from_weights = 'best'
  with pytest.raises(config_lib.ConfigError, match='init_from_weights'):
    config_lib.validate(c, num_devices=8)
