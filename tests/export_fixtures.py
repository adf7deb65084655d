"""Training workdirs as the trainer writes them, for the export / predict tests (no training step is run).

config.json is a real config file's get_config() written exactly as the trainer writes it
(`config.to_json_best_effort(indent=2, sort_keys=True)`, None placeholders included); the checkpoint is written
by checkpoints.Checkpointer with the state fields that checkpoints.load_inference_variables reads
(ema_params, ema_model_state) next to raw ones that differ, and auxiliary BNs that differ from the main ones,
so exporting the wrong weights shows.
"""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from PIL import Image

from advprop_jax import checkpoints
from advprop_jax.models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg=None):
  """get_config(arg) of configs/<name>.py, the way --config=configs/<name>.py[:arg] loads it."""
  spec = importlib.util.spec_from_file_location(f'config_{name}', os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def random_variables(module, seed: int, size: int = 32) -> dict:
  """Random numpy variables of module.init's shapes (jax.eval_shape: no init compute), of sane scale."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  rng = np.random.RandomState(seed)
  flat = {}
  for path, s in traverse_util.flatten_dict(dict(shapes)).items():
    leaf = path[-1]
    if leaf == 'kernel':
      value = rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    elif leaf == 'var':
      value = 0.5 + rng.uniform(size=s.shape)
    elif leaf.startswith('scale'):
      value = 1.0 + 0.2 * rng.normal(size=s.shape)
    else:
      value = 0.2 * rng.normal(size=s.shape)
    flat[path] = value.astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def write_workdir(directory, config, variables, step: int = 10) -> str:
  """A workdir holding config.json (as the trainer writes it) and one checkpoint with EMA = `variables`."""
  directory = str(directory)
  os.makedirs(directory, exist_ok=True)
  ema_params = variables['params']
  ema_model_state = {k: v for k, v in variables.items() if k != 'params'}
  state = dict(step=np.int32(step), params=jax.tree.map(lambda a: a + 1.0, ema_params),
               model_state=jax.tree.map(lambda a: a * 2.0, ema_model_state), opt_state={},
               ema_params=ema_params, ema_model_state=ema_model_state)
  checkpointer = checkpoints.Checkpointer(directory, every_steps=1, keep=1, config_fingerprint={},
                                          async_save=False)
  checkpointer.save(step, state, {})
  checkpointer.close()
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  return directory


def demo_workdir(directory):
  """(workdir, EMA variables) of configs/demo.py's run (tiny B0, digits, 32 px, advprop: clean + adv BNs),
  config unchanged."""
  config = load_config('demo')
  model = create_model(config.model, num_classes=config.num_classes, distributions=('clean', 'adv'),
                       **{k: v for k, v in config.model_overrides.to_dict().items() if v is not None})
  variables = random_variables(model, seed=1)
  return write_workdir(directory, config, variables), variables


RESNET_OVERRIDES = dict(stage_sizes=(1, 1), base_width=4)


def resnet_workdir(directory):
  """(workdir, EMA variables) of configs/resnet.py:50 (ImageNet mean/std normalisation), shrunk to a 2-stage
  width-4 ResNet with 5 classes at 33 px."""
  config = load_config('resnet', '50')
  config.model_overrides.stage_sizes = RESNET_OVERRIDES['stage_sizes']
  config.model_overrides.base_width = RESNET_OVERRIDES['base_width']
  config.num_classes = 5
  config.data.image_size = 33
  model = create_model(config.model, num_classes=5, distributions=('clean', 'adv'), **RESNET_OVERRIDES)
  variables = random_variables(model, seed=2)
  return write_workdir(directory, config, variables), variables


def save_image(path, seed: int = 0, size=(41, 50), **kwargs) -> str:
  pixels = np.random.RandomState(seed).randint(0, 256, size + (3,)).astype(np.uint8)
  Image.fromarray(pixels).save(path, **kwargs)
  return str(path)


def stdout_blocks(text: str):
  """predict's stdout -> (first line, {image path: [(index, probability)]})."""
  lines = text.strip().splitlines()
  blocks, current = {}, None
  for line in lines[1:]:
    if line.startswith('  '):
      p, index = line.split()[:2]
      blocks[current].append((int(index), float(p)))
    else:
      current = line
      blocks[current] = []
  return lines[0], blocks
