"""Adversarial examples as TensorBoard pictures (config.log_images_every_steps, #27 item 4)."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advprop_jax import config as config_lib
from advprop_jax import image_summaries
from advprop_jax import methods
from advprop_jax import parallel
from advprop_jax.data import normalization
from conftest import tiny_efficientnet
from test_train_step import make_config as train_step_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, BATCH, N = 16, 16, image_summaries.NUM_IMAGES
PREFIX = image_summaries.PREFIX


def make_config(**fields):
  """test_train_step's config (eps 4 px, 2 PGD steps of 2 px), fine-grained epsilons 1 and 3 px."""
  return train_step_config(**dict(dict(fine_grained_epsilons_pixels=(1.0, 3.0), afan__num_steps=2),
                                  **fields))


def images_of(config):
  """(pixels of the batch, the images written for it) with a tiny model of config.method."""
  model = tiny_efficientnet(distributions=methods.get(config.method).distributions(config))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))
  params = variables.pop('params')
  mesh = parallel.create_mesh(-1)
  pixels = np.random.RandomState(0).randint(0, 256, (BATCH, SIZE, SIZE, 3)).astype(np.uint8)
  batch = jax.device_put({'image': pixels, 'label': np.arange(BATCH) % 10},
                         parallel.batch_sharding(mesh))
  batch['image'] = normalization.normalize(batch['image'], config.data.normalization)
  images = image_summaries.make_images_fn(model, config, mesh)(params, variables, batch,
                                                               jax.random.PRNGKey(1))
  return pixels, images


def check_attack(images, clean, name, eps):
  tag = f'{PREFIX}/{name}_eps{eps:g}px'
  adv, perturbation = images[tag], images[f'{tag}_perturbation']
  assert adv.shape == perturbation.shape == (N, SIZE, SIZE, 3)
  assert adv.dtype == perturbation.dtype == np.uint8
  change = adv.astype(int) - clean.astype(int)
  assert np.abs(change).max() <= eps + 1  # (+1: both rounded to whole pixels)
  assert np.abs(change).max() >= eps - 1  # the attack moved pixels by about epsilon
  assert perturbation.min() == 0 and perturbation.max() == 255  # -eps and +eps, amplified
  # Grey is unchanged, the extremes are +-eps: the amplified perturbation is the change / eps.
  expected = 127.5 + change * 127.5 / eps
  assert np.abs(perturbation - expected).max() <= 127.5 / eps + 1


@pytest.mark.parametrize('method,norm', [('advprop', 'minus_one_one'), ('advprop', 'imagenet'),
                                         ('fine_grained_advprop', 'minus_one_one'),
                                         ('fast_advprop', 'minus_one_one'),
                                         ('adv_train', 'minus_one_one')])
def test_pixel_attacks_shown_with_their_epsilon(method, norm):
  config = make_config(method=method, data__normalization=norm)
  pixels, images = images_of(config)
  clean = images[f'{PREFIX}/clean']
  np.testing.assert_array_equal(clean, pixels[:N])  # un-normalised back to the loader's pixels
  inputs = methods.get(method).auxiliary_inputs(None, config)
  expected_tags = {f'{PREFIX}/clean'}
  for aux in inputs:
    check_attack(images, clean, aux.name, aux.epsilon_pixels)
    tag = f'{PREFIX}/{aux.name}_eps{aux.epsilon_pixels:g}px'
    expected_tags |= {tag, f'{tag}_perturbation'}
  assert set(images) == expected_tags
  if method == 'fine_grained_advprop':  # one pair per auxiliary BN, each labelled with its epsilon
    assert {f'{PREFIX}/adv1_eps1px', f'{PREFIX}/adv2_eps3px'} <= set(images)
  else:
    assert f'{PREFIX}/adv_eps4px' in images


def test_afan_shows_where_the_feature_moved():
  config = make_config(method='afan')
  _, images = images_of(config)
  assert set(images) == {f'{PREFIX}/clean', f'{PREFIX}/feature_stage1_perturbation'}
  heat = images[f'{PREFIX}/feature_stage1_perturbation']
  assert heat.dtype == np.uint8 and heat.shape[0] == N and heat.shape[-1] == 1
  assert heat.shape[1] < SIZE  # the stage's resolution
  assert (heat.max(axis=(1, 2, 3)) == 255).all()  # scaled to each image's largest change


def test_vanilla_shows_the_clean_images_and_nothing_is_built_when_off():
  _, images = images_of(make_config(method='vanilla'))
  assert set(images) == {f'{PREFIX}/clean'}
  assert image_summaries.make_logger(None, make_config(), None) is None  # the default K = 0


@pytest.mark.parametrize('value', [-1, True])
def test_bad_value_is_a_config_error_naming_the_field(value):
  config = make_config()
  config.log_images_every_steps = value
  with pytest.raises(config_lib.ConfigError, match='config.log_images_every_steps'):
    config_lib.validate(config, num_devices=1)
  with pytest.raises(TypeError):  # ml_collections itself keeps the field an integer
    make_config().log_images_every_steps = 1.5


def run_main(workdir, *overrides):
  return subprocess.run(
      [sys.executable, '-m', 'advprop_jax.main', '--config=configs/demo.py', f'--workdir={workdir}',
       *overrides], cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))


@pytest.mark.slow  # (a process start, ~15 s; test_bad_value_is_a_config_error... is the fast check)
def test_bad_value_on_the_command_line_exits_2_before_anything(tmp_path):
  workdir = tmp_path / 'run'
  result = run_main(workdir, '--config.log_images_every_steps=-3')
  assert result.returncode == 2, result.stderr[-2000:]
  problems = [line for line in result.stderr.strip().splitlines() if not re.match(r'I\d{4} ', line)]
  assert len(problems) == 1 and 'config.log_images_every_steps=-3' in problems[0], result.stderr
  assert not workdir.exists()


def read_images(workdir):
  """{tag: {step: uint8 [n, h, w, c]}} of the image summaries in the run's event files."""
  import tensorflow as tf
  found = {}
  for name in sorted(os.listdir(workdir)):
    if not name.startswith('events.out.tfevents'):
      continue
    for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name != 'images':
          continue
        encoded = tf.make_ndarray(value.tensor)  # [width, height, png, png, ...]
        width, height = int(encoded[0]), int(encoded[1])
        pictures = np.stack([tf.io.decode_png(png).numpy() for png in encoded[2:]])
        assert pictures.shape[1:3] == (height, width)
        found.setdefault(value.tag, {})[event.step] = pictures
  return found


@pytest.mark.slow
def test_training_run_writes_the_pictures_to_tensorboard(tmp_path):
  """Acceptance (#27): the demo's tiny AdvProp run with K = 4 over 8 steps: the clean images, the
  PGD images and the amplified perturbation at steps 4 and 8, read back from the event file."""
  workdir = tmp_path / 'run'
  result = run_main(
      workdir, '--config.model_overrides.stages=((1,3,1,1,16),(1,3,2,6,24))',
      '--config.model_overrides.head_features=64',
      '--config.model_overrides.depthwise_impl=grouped',
      '--config.data.image_size=16', '--config.global_batch_size=32', '--config.max_steps=8',
      '--config.log_every_steps=4', '--config.eval_every_epochs=100',
      '--config.eval_pgd_epsilons_pixels=()', '--config.log_images_every_steps=4',
      f'--config.data.data_dir={tmp_path / "tfds"}')
  assert result.returncode == 0, result.stderr[-3000:]
  images = read_images(workdir)
  tag = f'{PREFIX}/adv_eps4px'  # configs/demo.py: one PGD step of 4 pixels
  assert set(images) == {f'{PREFIX}/clean', tag, f'{tag}_perturbation'}
  for by_step in images.values():
    assert sorted(by_step) == [4, 8]
    for pictures in by_step.values():
      assert pictures.shape == (N, SIZE, SIZE, 3) and pictures.dtype == np.uint8
  for step in (4, 8):
    clean, adv = (images[t][step].astype(int) for t in (f'{PREFIX}/clean', tag))
    assert 0 < np.abs(adv - clean).max() <= 4 + 1  # within epsilon (+1: rounding of both)
    perturbation = images[f'{tag}_perturbation'][step]
    assert perturbation.min() == 0 and perturbation.max() == 255  # the full range
  assert not np.array_equal(images[f'{PREFIX}/clean'][4], images[f'{PREFIX}/clean'][8])
