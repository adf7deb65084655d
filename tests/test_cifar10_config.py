"""configs/cifar10.py (issue #26 item 3): every method's config loads, validates and builds the
32 px model it documents; the model options it uses (EfficientNet stem_stride, ResNet's CIFAR
stem) and the pad-4 random crop. Shapes only (jax.eval_shape): no training, no compilation.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from advprop_jax import config as config_lib
from advprop_jax import factories
from advprop_jax import methods
from advprop_jax import models

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                      'cifar10.py')
# EfficientNet-B0, width 0.5, depth 0.5, 10 classes, main BNs only (the stem stride adds nothing).
PARAMS = 663_530


def _abstract(model, size=32):
  x = jnp.zeros((2, size, size, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  return variables, x


def _clean_count(params, distributions):
  aux = tuple(f'_{d}' for d in distributions if d != 'clean')
  flat = traverse_util.flatten_dict(params)
  return sum(int(np.prod(v.shape)) for k, v in flat.items() if not aux or not k[-1].endswith(aux))


@pytest.mark.parametrize('method', sorted(methods.METHODS))
def test_config_builds_the_32px_model_for_every_method(method):
  c = config_lib.load_file(CONFIG, method)
  config_lib.validate(c, num_devices=2)
  assert (c.method, c.data.dataset, c.data.image_size, c.num_classes) == (
      method, 'image_folder', 32, 10)
  model = factories.build_model(c)
  variables, x = _abstract(model)
  assert jax.eval_shape(lambda v: model.apply(v, x), variables).shape == (2, 10)
  assert _clean_count(variables['params'], model.distributions) == PARAMS
  # The stride-1 stem: the last stage still sees 2x2 features at 32 px (1x1 with B0's stem).
  last = jax.eval_shape(lambda v: model.apply(v, x, to_stage=7), variables)
  assert last.shape == (2, 2, 2, 160)


def test_fast_advprop_is_budget_matched_and_unknown_method_is_one_error():
  vanilla = config_lib.load_file(CONFIG, 'vanilla')
  assert config_lib.load_file(CONFIG, 'fast_advprop').num_epochs == pytest.approx(
      vanilla.num_epochs * 87 / 105)
  with pytest.raises(ValueError, match='unknown method'):
    config_lib.load_file(CONFIG, 'sgd')


def test_efficientnet_stem_stride_default_unchanged():
  b0 = models.create_model('efficientnet-b0', width=0.5, depth=0.5, num_classes=10)
  variables, x = _abstract(b0)
  assert jax.eval_shape(lambda v: b0.apply(v, x, to_stage=7), variables).shape == (2, 1, 1, 160)
  assert _clean_count(variables['params'], b0.distributions) == PARAMS


def test_resnet_cifar_stem_keeps_32px_and_parameter_names():
  kwargs = dict(num_classes=10, stage_sizes=(1, 1, 1, 1), base_width=16)
  cifar = models.create_model('resnet50', stem='cifar', **kwargs)
  imagenet = models.create_model('resnet50', **kwargs)
  cv, x = _abstract(cifar)
  iv, _ = _abstract(imagenet)
  assert jax.eval_shape(lambda v: cifar.apply(v, x, to_stage=1), cv).shape == (2, 32, 32, 64)
  assert jax.eval_shape(lambda v: imagenet.apply(v, x, to_stage=1), iv).shape == (2, 8, 8, 64)
  assert cv['params']['conv1']['kernel'].shape == (3, 3, 3, 16)
  assert jax.tree_util.tree_structure(cv) == jax.tree_util.tree_structure(iv)
  with pytest.raises(ValueError, match='stem'):
    models.create_model('resnet50', stem='cifar10', **kwargs)
  with pytest.raises(ValueError, match='stem_stride'):
    models.create_model('efficientnet-b0', stem_stride=0)


def test_pad_crop_is_a_shift_with_a_black_border():
  tf = pytest.importorskip('tensorflow')
  from advprop_jax.data import preprocessing  # pylint: disable=import-outside-toplevel
  image = np.random.default_rng(0).integers(1, 256, (32, 32, 3)).astype(np.uint8)
  png = tf.io.encode_png(image)
  shifts = set()
  for i in range(8):
    out = preprocessing.preprocess_for_train(
        png, tf.constant([0, i], tf.int64), image_size=32, train_crop='pad_crop',
        random_flip=False, augment='none').numpy()
    assert out.shape == (32, 32, 3)
    padded = np.pad(image.astype(np.float32), ((4, 4), (4, 4), (0, 0)))
    match = [(dy, dx) for dy in range(9) for dx in range(9)
             if np.array_equal(padded[dy:dy + 32, dx:dx + 32], out)]
    assert len(match) == 1
    shifts.add(match[0])
  assert len(shifts) > 1  # the crop depends on the seed
