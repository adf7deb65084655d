"""export: the demo run and a ResNet run (mean/std inputs) in every format, read by predict; one-line errors.

Workdirs are written as the trainer writes them (tests/export_fixtures.py): configs/demo.py's config.json keeps
its None placeholders (model_overrides.stages / head_features), which reached create_model before (#18).
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from advprop_jax import convert, export, predict
from export_fixtures import ROOT, demo_workdir, resnet_workdir, save_image, stdout_blocks

IMAGENET_MEAN_01 = [0.485, 0.456, 0.406]  # torchvision / timm, spelled out here independently of the code
IMAGENET_STD_01 = [0.229, 0.224, 0.225]
MEAN_PIXELS, STD_PIXELS = np.multiply(IMAGENET_MEAN_01, 255), np.multiply(IMAGENET_STD_01, 255)


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
  return demo_workdir(tmp_path_factory.mktemp('demo'))


@pytest.fixture(scope='module')
def resnet(tmp_path_factory):
  return resnet_workdir(tmp_path_factory.mktemp('resnet'))


@pytest.fixture(scope='module')
def image(tmp_path_factory):
  return save_image(tmp_path_factory.mktemp('images') / 'image.png', seed=3)


def probabilities(module, variables, x):
  forward = jax.jit(lambda v, x: jax.nn.softmax(module.apply(v, x, train=False), axis=-1))  # eager: 30 s
  return np.asarray(forward(variables, np.asarray(x, np.float32)))


def check_predict_output(out, config, module, main, image):
  """predict's stdout for `image` matches the model on the recorded preprocessing, to the printed digits."""
  first, blocks = stdout_blocks(out)
  size = config['image_size']
  assert f'input {size}x{size} px' in first and f'normalization {config["normalization"]}' in first
  mean, std = export.pixel_stats(config)
  x = predict.preprocess(image, size, config['crop_fraction'], mean, std)[None]
  probs = probabilities(module, main, x)[0]
  printed = blocks[image]
  assert [i for i, _ in printed] == np.argsort(-probs)[:5].tolist()
  np.testing.assert_allclose([p for _, p in printed], probs[[i for i, _ in printed]], atol=6e-5)
  return probs


def test_demo_workdir_flax_export_and_predict(demo, image, tmp_path, capsys):
  workdir, variables = demo
  with open(os.path.join(workdir, 'config.json')) as f:
    overrides = json.load(f)['model_overrides']
  assert overrides['stages'] is None and overrides['head_features'] is None  # as the demo writes them
  out = tmp_path / 'flax'
  assert export.call([f'--workdir={workdir}', '--format=flax', f'--output={out}']) == 0
  config, module, exported = export.load_exported_flax(str(out))
  assert config['model_overrides'] == dict(width=0.25, depth=0.25, dropout_rate=0.1, drop_connect_rate=0.1,
                                           depthwise_impl='auto')
  assert config['image_size'] == 32 and config['crop_fraction'] == 1.0
  assert config['normalization'] == 'minus_one_one'
  assert config['pixel_mean'] == [127.5] * 3 and config['input_range'] == [-1.0, 1.0]
  main = convert.main_distribution(variables, ('clean', 'adv'))  # EMA weights, main BNs
  assert jax.tree.structure(exported) == jax.tree.structure(main)
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(main)):
    np.testing.assert_array_equal(a, b)
  # Exporting again replaces the earlier export; nothing else is left in the parent directory.
  assert export.call([f'--workdir={workdir}', f'--output={out}']) == 0
  assert os.listdir(tmp_path) == ['flax'] and sorted(os.listdir(out)) == ['config.json', 'variables']
  capsys.readouterr()
  assert predict.call([f'--checkpoint={out}', image]) == 0
  check_predict_output(capsys.readouterr().out, config, module, main, image)


def test_demo_workdir_timm_export_records_preprocessing(demo, image, tmp_path, capsys):
  workdir, variables = demo
  path = tmp_path / 'demo.safetensors'
  assert export.call([f'--workdir={workdir}', '--format=timm', f'--output={path}']) == 0
  config = export.run_config(workdir)
  module = export.inference_model(config)
  state = convert.load_state_dict(str(path))
  names = {e.name for e in convert.timm_mapping(module)}
  assert {k for k in state if not k.endswith('num_batches_tracked')} == names
  metadata = convert.safetensors_metadata(str(path))
  assert json.loads(metadata['mean']) == [0.5] * 3 and json.loads(metadata['std']) == [0.5] * 3
  assert json.loads(metadata['input_size']) == [3, 32, 32] and float(metadata['crop_pct']) == 1.0
  assert json.loads(metadata[export.TIMM_CONFIG_KEY])['model_overrides']['width'] == 0.25
  assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())
  # predict needs no --model and uses the run's 32 px, not the model's native 224.
  capsys.readouterr()
  assert predict.call([f'--checkpoint={path}', image]) == 0
  check_predict_output(capsys.readouterr().out, config, module,
                       convert.main_distribution(variables, ('clean', 'adv')), image)


def _umask():
  umask = os.umask(0o22)
  os.umask(umask)
  return umask


def _savedmodel_uint8_probabilities(workdir, tmp_path, *, seed, size):
  """Exports `workdir` as a SavedModel (CPU): 2 random uint8 images and their probabilities from the
  loaded model's serving_uint8 signature."""
  import tensorflow as tf
  out = tmp_path / 'sm'
  assert export.call([f'--workdir={workdir}', '--format=savedmodel', f'--output={out}',
                      '--platforms=cpu']) == 0
  loaded = tf.saved_model.load(str(out))
  pixels = np.random.RandomState(seed).randint(0, 256, (2, size, size, 3)).astype(np.uint8)
  probs8 = loaded.signatures['serving_uint8'](images=tf.constant(pixels))['probabilities'].numpy()
  return pixels, probs8


def test_demo_workdir_savedmodel_export(demo, tmp_path):
  workdir, variables = demo
  pixels, probs8 = _savedmodel_uint8_probabilities(workdir, tmp_path, seed=4, size=32)
  module = export.inference_model(export.run_config(workdir))
  main = convert.main_distribution(variables, ('clean', 'adv'))
  np.testing.assert_allclose(probs8, probabilities(module, main, pixels / 127.5 - 1.0), atol=2e-5)


def test_resnet_imagenet_normalisation_in_flax_export_and_predict(resnet, image, tmp_path, capsys):
  workdir, variables = resnet
  out = tmp_path / 'flax'
  assert export.call([f'--workdir={workdir}', f'--output={out}']) == 0
  config, module, _ = export.load_exported_flax(str(out))
  assert config['normalization'] == 'imagenet'
  np.testing.assert_allclose(config['pixel_mean'], MEAN_PIXELS)
  np.testing.assert_allclose(config['pixel_std'], STD_PIXELS)
  np.testing.assert_allclose(config['input_range'], [-MEAN_PIXELS / STD_PIXELS, (255 - MEAN_PIXELS) / STD_PIXELS],
                             rtol=1e-6)
  capsys.readouterr()
  assert predict.call([f'--checkpoint={out}', image]) == 0
  main = convert.main_distribution(variables, ('clean', 'adv'))
  probs = check_predict_output(capsys.readouterr().out, config, module, main, image)
  # The normalisation matters: [-1, 1] inputs give other probabilities.
  x = predict.preprocess(image, config['image_size'], config['crop_fraction'])[None]
  assert np.abs(probabilities(module, main, x)[0] - probs).max() > 1e-3


def test_resnet_timm_export_names_and_mean_std(resnet, image, tmp_path, capsys):
  workdir, variables = resnet
  path = tmp_path / 'r.safetensors'
  assert export.call([f'--workdir={workdir}', '--format=timm', f'--output={path}']) == 0
  state = convert.load_state_dict(str(path))
  assert state['conv1.weight'].shape == (4, 3, 7, 7) and state['fc.weight'].shape == (5, 32)
  assert state['layer2.0.downsample.0.weight'].shape == (32, 16, 1, 1)
  assert state['layer1.0.downsample.1.num_batches_tracked'].shape == ()
  metadata = convert.safetensors_metadata(str(path))
  np.testing.assert_allclose(json.loads(metadata['mean']), IMAGENET_MEAN_01, atol=1e-6)
  np.testing.assert_allclose(json.loads(metadata['std']), IMAGENET_STD_01, atol=1e-6)
  config = export.run_config(workdir)
  back = convert.timm_to_flax(state, 'resnet50', distributions=('clean',), **config['model_overrides'])
  main = convert.main_distribution(variables, ('clean', 'adv'))
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(main)):
    np.testing.assert_array_equal(a, b)
  capsys.readouterr()
  assert predict.call([f'--checkpoint={path}', image]) == 0
  check_predict_output(capsys.readouterr().out, config, export.inference_model(config), main, image)


def test_resnet_savedmodel_uint8_signature_normalises_per_channel(resnet, tmp_path):
  workdir, variables = resnet
  pixels, probs8 = _savedmodel_uint8_probabilities(workdir, tmp_path, seed=5, size=33)
  x = (pixels - MEAN_PIXELS) / STD_PIXELS
  config = export.run_config(workdir)
  main = convert.main_distribution(variables, ('clean', 'adv'))
  expected = probabilities(export.inference_model(config), main, x.astype(np.float32))
  np.testing.assert_allclose(probs8, expected, atol=2e-5)


# --------------------------------------------------------------------------------------------------------
# Mistakes: one stderr line naming the flag/path, exit status 2, nothing written
# --------------------------------------------------------------------------------------------------------
def _tree(root):
  return sorted(os.path.relpath(os.path.join(d, n), root)
                for d, dirs, files in os.walk(root) for n in dirs + files)


def _one_error_line(capsys, *needles):
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith('export: error: ') and 'Traceback' not in err, err
  for needle in needles:
    assert needle in err, (needle, err)
  return err


@pytest.mark.parametrize('case', ['no_workdir', 'workdir_missing', 'no_config', 'bad_json', 'unknown_model',
                                  'no_checkpoint', 'timm_output_is_dir', 'timm_suffix', 'output_under_file',
                                  'output_not_an_export', 'unknown_format', 'unknown_flag', 'not_fitting',
                                  'corrupt_checkpoint'])
def test_export_mistakes_are_one_line(case, demo, tmp_path, capsys):
  work = tmp_path / 'run'
  shutil.copytree(demo[0], work)
  out = tmp_path / 'out'
  args = {'workdir': str(work), 'format': 'flax', 'output': str(out)}
  needles = ()
  if case == 'no_workdir':
    del args['workdir']
    needles = ('--workdir is required',)
  elif case == 'workdir_missing':
    args['workdir'] = str(tmp_path / 'nope')
    needles = (f'--workdir={tmp_path / "nope"} does not exist',)
  elif case == 'no_config':
    os.remove(work / 'config.json')
    needles = (str(work / 'config.json'), 'not found')
  elif case == 'bad_json':
    (work / 'config.json').write_text('{"model": ')
    needles = (str(work / 'config.json'), 'not valid JSON')
  elif case == 'unknown_model':
    full = json.loads((work / 'config.json').read_text())
    (work / 'config.json').write_text(json.dumps(dict(full, model='efficientnet-b9')))
    needles = (str(work / 'config.json'), "'efficientnet-b9'", 'efficientnet-b0')
  elif case == 'no_checkpoint':
    shutil.rmtree(work / 'checkpoints')
    needles = (f'--workdir={work}', 'checkpoint')
  elif case == 'timm_output_is_dir':
    out.mkdir()
    args.update(format='timm')
    needles = (f'--output={out} is a directory', 'model.safetensors')
  elif case == 'timm_suffix':
    args.update(format='timm', output=str(tmp_path / 'w.bin'))
    needles = ('.safetensors',)
  elif case == 'output_under_file':
    (tmp_path / 'file').write_text('x')
    args['output'] = str(tmp_path / 'file' / 'sub' / 'export')
    needles = (args['output'], 'not a writable directory')
  elif case == 'output_not_an_export':
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    needles = (f'--output={out} exists and is not a flax export',)
  elif case == 'unknown_format':
    args['format'] = 'onnx'
    needles = ('--format=onnx', 'flax|timm|savedmodel')
  elif case == 'unknown_flag':
    args['outptu'] = args.pop('output')
    needles = ('outptu',)
  elif case == 'not_fitting':  # config.json no longer describes the checkpoint's model
    full = json.loads((work / 'config.json').read_text())
    full['model_overrides']['width'] = 0.5
    (work / 'config.json').write_text(json.dumps(full))
    needles = (f'--workdir={work}', 'does not fit config.json', 'shape mismatch')
  elif case == 'corrupt_checkpoint':  # unreadable weights: the array data files overwritten
    for d, _, files in os.walk(work / 'checkpoints'):
      for name in files if os.path.basename(d) == 'd' else ():
        with open(os.path.join(d, name), 'wb') as f:
          f.write(b'\0' * 64)
    needles = (f'--workdir={work}: cannot read the newest checkpoint',)
  before = _tree(tmp_path)
  assert export.call([f'--{k}={v}' for k, v in args.items()]) == 2
  _one_error_line(capsys, *needles)
  assert _tree(tmp_path) == before  # nothing written, nothing half-written
  if case == 'output_not_an_export':
    assert (out / 'notes.txt').read_text() == 'mine'


def test_failed_write_leaves_nothing(demo, tmp_path, monkeypatch):
  def broken(*args, **kwargs):
    raise RuntimeError('disk full')
  monkeypatch.setattr(convert, 'save_timm_safetensors', broken)
  with pytest.raises(RuntimeError, match='disk full'):
    export.export(demo[0], 'timm', str(tmp_path / 'new' / 'dirs' / 'w.safetensors'))
  assert os.listdir(tmp_path) == []  # neither the temporary file nor the directories made for it


@pytest.mark.parametrize('module,flags_listed', [
    ('advprop_jax.export', ('--workdir', '--format', '--output', '--platforms')),
    ('advprop_jax.predict', ('--checkpoint', '--model', '--model_overrides', '--num_classes', '--image_size',
                             '--crop_fraction', '--normalization', '--top_k', '--batch_size')),
])
def test_cli_help_and_flag_errors_as_a_user_runs_them(module, flags_listed, tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', module, '--help'], capture_output=True, text=True, env=env,
                        cwd=tmp_path, timeout=120)
  assert proc.returncode == 0, proc.stderr
  for name in flags_listed:
    assert f'{name}:' in proc.stdout, (name, proc.stdout)
  proc = subprocess.run([sys.executable, '-m', module, '--top_k=x', '--format=x'], capture_output=True,
                        text=True, env=env, cwd=tmp_path, timeout=120)
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
