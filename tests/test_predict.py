"""predict: eval preprocessing, 16-bit and broken images, several paths, resolution of timm weights, errors.

Weights: the tiny timm fixture (tests/fixtures, see test_convert.py), loaded as a timm weight file.
"""
import functools
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from advprop_jax import predict
from export_fixtures import demo_workdir, save_image, stdout_blocks

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
WEIGHTS = os.path.join(FIXTURES, 'tiny_timm.safetensors')
with open(os.path.join(FIXTURES, 'tiny_timm.json')) as _f:
  TINY = json.load(_f)
OVERRIDES = dict(width=TINY['width'], depth=TINY['depth'])
WEIGHT_FLAGS = [f'--checkpoint={WEIGHTS}', '--model=efficientnet-b0',
                f'--model_overrides={json.dumps(OVERRIDES)}']


@functools.lru_cache()
def tiny_model():
  """(module, variables) of the fixture, as predict loads them."""
  _, module, variables = predict.load_predictor(WEIGHTS, 'efficientnet-b0', OVERRIDES)
  return module, variables


def reference_top5(image, size, crop):
  module, variables = tiny_model()
  x = predict.preprocess(image, size, crop)[None]
  probs = np.asarray(jax.jit(lambda v, x: jax.nn.softmax(module.apply(v, x, train=False)))(variables, x))[0]
  return np.argsort(-probs)[:5].tolist(), probs


def test_eval_preprocessing_and_class_names():
  pixels = np.random.RandomState(7).randint(0, 256, (40, 60, 3)).astype(np.uint8)  # h=40, w=60
  x = predict.preprocess(Image.fromarray(pixels), 10, 0.5)
  crop = pixels[10:30, 20:40]  # 0.5 * short side = 20, centred
  resized = np.asarray(Image.fromarray(crop).resize((10, 10), Image.BICUBIC), np.float32)
  np.testing.assert_allclose(x, resized / 127.5 - 1, atol=1e-6)
  assert x.min() >= -1 and x.max() <= 1
  mean, std = np.multiply([0.485, 0.456, 0.406], 255), np.multiply([0.229, 0.224, 0.225], 255)
  x = predict.preprocess(Image.fromarray(pixels), 10, 0.5, mean, std)  # per channel
  np.testing.assert_allclose(x, (resized - mean) / std, atol=1e-5)
  names = predict.imagenet_class_names()
  assert len(names) == 1000 and names[0].startswith('tench') and names[999].startswith('toilet tissue')
  assert names[207].startswith('golden retriever') and all(names)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
  rng = np.random.RandomState(11)
  deep = rng.randint(0, 65536, (30, 30)).astype(np.uint16)
  eight = np.round(deep / 257.0).astype(np.uint8)
  Image.fromarray(deep).save(tmp_path / 'deep.png')  # a 16-bit grayscale PNG
  Image.fromarray(eight).save(tmp_path / 'eight.png')
  with Image.open(tmp_path / 'deep.png') as f:
    assert f.mode.startswith('I')
  x16 = predict.preprocess(str(tmp_path / 'deep.png'), 16, 1.0)
  x8 = predict.preprocess(str(tmp_path / 'eight.png'), 16, 1.0)
  np.testing.assert_allclose(x16, x8, atol=1e-6)
  assert -0.5 < x16.mean() < 0.5  # clipping to 0/255 gave a mean near +1
  as_int32 = Image.fromarray(deep.astype(np.int32), 'I')  # how older PIL versions decode 16-bit PNGs
  np.testing.assert_allclose(predict.preprocess(as_int32, 16, 1.0), x8, atol=1e-6)


def test_bad_images_are_named_and_the_others_predicted(tmp_path, capsys):
  good = save_image(tmp_path / 'good.png', seed=1)
  other = save_image(tmp_path / 'other.jpg', seed=2, quality=95)
  truncated = tmp_path / 'truncated.jpg'
  data = open(other, 'rb').read()
  truncated.write_bytes(data[:len(data) // 2])
  text = tmp_path / 'notes.png'
  text.write_text('not an image')
  missing = tmp_path / 'missing.png'
  assert predict.call(WEIGHT_FLAGS + [good, str(truncated), str(missing), str(text), other]) == 2
  captured = capsys.readouterr()
  errors = captured.err.strip().splitlines()
  assert len(errors) == 3 and 'Traceback' not in captured.err, captured.err
  assert errors[0].startswith(f'predict: error: {truncated}: ') and 'truncated' in errors[0]
  assert errors[1] == f'predict: error: {missing}: no such file'
  assert errors[2].startswith(f'predict: error: {text}: ')
  first, blocks = stdout_blocks(captured.out)
  assert list(blocks) == [good, other]
  for path in (good, other):
    top5, probs = reference_top5(path, 224, 0.875)
    assert [i for i, _ in blocks[path]] == top5
    np.testing.assert_allclose([p for _, p in blocks[path]], probs[top5], atol=6e-5)


def test_weight_file_uses_the_models_native_resolution_or_image_size(tmp_path, capsys):
  image = save_image(tmp_path / 'image.png', seed=4, size=(70, 90))
  b3 = ['--model=efficientnet-b3', f'--model_overrides={json.dumps(OVERRIDES)}']  # b3 at the fixture's width
  assert predict.call([f'--checkpoint={WEIGHTS}', *b3, image]) == 0
  first, blocks = stdout_blocks(capsys.readouterr().out)
  assert 'model efficientnet-b3' in first and 'input 300x300 px' in first and 'center crop 0.904' in first
  top5, _ = reference_top5(image, 300, 0.904)  # same weights: b3 with width/depth overridden is the tiny B0
  assert [i for i, _ in blocks[image]] == top5
  assert predict.call([f'--checkpoint={WEIGHTS}', *b3, '--image_size=48', '--crop_fraction=0.5', '--top_k=3',
                       image]) == 0
  first, blocks = stdout_blocks(capsys.readouterr().out)
  assert 'input 48x48 px' in first and 'center crop 0.5 ' in first
  assert [i for i, _ in blocks[image]] == reference_top5(image, 48, 0.5)[0][:3]
  assert predict.call(WEIGHT_FLAGS + ['--normalization=imagenet', image]) == 0
  assert 'input 224x224 px' in capsys.readouterr().out


def test_predict_cli_prints_top5_for_an_image(tmp_path, capsys):
  image = save_image(tmp_path / 'image.png', seed=8)
  assert predict.call(WEIGHT_FLAGS + [image]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith('model efficientnet-b0') and lines[1] == image and len(lines) == 7
  probs = [float(line.split()[0]) for line in lines[2:]]
  assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
  assert [int(line.split()[1]) for line in lines[2:]] == reference_top5(image, 224, 0.875)[0]


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  return demo_workdir(tmp_path_factory.mktemp('run'))[0]


@pytest.mark.parametrize('case', [
    'no_checkpoint_flag', 'missing_checkpoint', 'garbage_weights', 'unknown_model', 'no_model', 'bad_json',
    'json_not_object', 'unknown_override', 'wrong_model', 'training_run', 'model_with_export_dir', 'no_images',
    'bad_top_k'])
def test_predict_mistakes_are_one_line(case, tmp_path, capsys, run_dir):
  image = save_image(tmp_path / 'image.png')
  garbage = tmp_path / 'w.safetensors'
  garbage.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": broken}xxxxx')
  export_dir = tmp_path / 'export'
  export_dir.mkdir()
  (export_dir / 'config.json').write_text('{}')
  args, needles = {
      'no_checkpoint_flag': ([image], ['--checkpoint is required']),
      'missing_checkpoint': ([f'--checkpoint={tmp_path / "nope"}', image],
                             [f'--checkpoint={tmp_path / "nope"}']),
      'garbage_weights': ([f'--checkpoint={garbage}', '--model=efficientnet-b0', image],
                          [f'--checkpoint={garbage}', 'safetensors']),
      'unknown_model': ([f'--checkpoint={WEIGHTS}', '--model=efficientnet-b9', image],
                        ['--model=efficientnet-b9', 'efficientnet-b0, ']),
      'no_model': ([f'--checkpoint={WEIGHTS}', image], [f'--checkpoint={WEIGHTS}', '--model']),
      'bad_json': (WEIGHT_FLAGS[:2] + ['--model_overrides={width: 0.25}', image],
                   ['--model_overrides=', 'JSON']),
      'json_not_object': (WEIGHT_FLAGS[:2] + ['--model_overrides=[1]', image], ['--model_overrides=[1]']),
      'unknown_override': (WEIGHT_FLAGS[:2] + ['--model_overrides={"widht": 0.25}', image], ['widht']),
      'wrong_model': ([f'--checkpoint={WEIGHTS}', '--model=efficientnet-b2', image],
                      [f'--checkpoint={WEIGHTS}', 'efficientnet-b2', 'mismatch']),
      'training_run': ([f'--checkpoint={run_dir}', image], [f'--checkpoint={run_dir} is a training run']),
      'model_with_export_dir': ([f'--checkpoint={export_dir}', '--model=efficientnet-b0', image],
                                ['--model']),
      'no_images': (WEIGHT_FLAGS, ['no images']),
      'bad_top_k': (WEIGHT_FLAGS + ['--top_k=0', image], ['--top_k']),
  }[case]
  assert predict.call(args) == 2
  captured = capsys.readouterr()
  err = captured.err.strip()
  assert len(err.splitlines()) == 1 and err.startswith('predict: error: ') and 'Traceback' not in err, err
  for needle in needles:
    assert needle in err, (needle, err)
  assert not captured.out.strip()  # nothing predicted

