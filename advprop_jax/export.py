"""Inference export of a training run's EMA weights (main BNs only).

  python -m advprop_jax.export --workdir=DIR --format=flax|timm|savedmodel --output=PATH

* flax:        PATH/ is a directory: `config.json` (model, model_overrides, num_classes, image_size, crop_fraction,
               input_range) + `variables/`, an Orbax StandardCheckpointer checkpoint of {'params', 'batch_stats'}
               for create_model(model, num_classes=..., distributions=('clean',), **model_overrides).
               Read it back with `load_exported_flax(PATH)`; `python -m advprop_jax.predict` reads it too.
* timm:        PATH is a safetensors file for timm's `tf_efficientnet_bX` (load_state_dict(strict=True)).
* savedmodel:  PATH/ is a TF SavedModel (jax2tf, native serialization for cpu, cuda and tpu). Signatures:
               'serving_default': images float32 [batch, S, S, 3] NHWC in the model's input range ([-1, 1] by
               default), already resized/cropped to S = image_size -> {'probabilities': float32 [batch, classes]};
               'serving_uint8': the same with uint8 pixels 0..255 (scaled to the input range inside).

What a training workdir must hold is defined in ONE place, `load_inference_variables` and the constants above it.
"""
import json
import os
from typing import Any, Dict, Tuple

import jax
import numpy as np
from flax import traverse_util

from advprop_jax import convert
from advprop_jax.models import create_model

# Keys of an exported directory's config.json (written by export_flax, read by predict).
CONFIG_FILE = 'config.json'
CONFIG_KEYS = ('model', 'model_overrides', 'num_classes', 'image_size', 'crop_fraction')
DEFAULT_INPUT_RANGE = (-1.0, 1.0)
FORMATS = ('flax', 'timm', 'savedmodel')


def read_config(directory: str) -> Dict[str, Any]:
  """The flat config.json of an exported directory."""
  with open(os.path.join(directory, CONFIG_FILE)) as f:
    config = json.load(f)
  missing = [k for k in CONFIG_KEYS if k not in config]
  if missing:
    raise ValueError(f'{os.path.join(directory, CONFIG_FILE)} lacks {missing}')
  config.setdefault('input_range', list(DEFAULT_INPUT_RANGE))
  return config


def run_config(workdir: str) -> Dict[str, Any]:
  """The export view (CONFIG_KEYS + input_range) of a training workdir's full config.json."""
  from advprop_jax.data import normalization  # pylint: disable=g-import-not-at-top
  from advprop_jax.data import preprocessing  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir} a training --workdir?')
  with open(path) as f:
    full = json.load(f)
  data = full['data']
  low, high = normalization.input_range(data['normalization'])
  if np.ndim(low):
    raise ValueError('export supports scalar input ranges only (data.normalization=minus_one_one)')
  return dict(model=full['model'], model_overrides=dict(full.get('model_overrides') or {}),
              num_classes=full['num_classes'], image_size=data['image_size'],
              crop_fraction=float(preprocessing.eval_crop_fraction(data['image_size'],
                                                                  data.get('crop_fraction'))),
              input_range=[float(low), float(high)])


def load_inference_variables(workdir: str) -> Tuple[Dict[str, Any], dict]:
  """(config, variables) of a training workdir: the newest checkpoint's EMA weights, all distributions."""
  from advprop_jax import checkpoints  # pylint: disable=g-import-not-at-top
  config = run_config(workdir)
  variables, _ = checkpoints.load_inference_variables(workdir, ema=True)
  return config, variables


def inference_model(config: Dict[str, Any]):
  """The model with the main distribution only (what the exported variables fit)."""
  overrides = {k: v for k, v in config['model_overrides'].items() if k != 'distributions'}
  return create_model(config['model'], num_classes=config['num_classes'], distributions=('clean',),
                      **overrides)


def inference_variables(config: Dict[str, Any], variables: dict) -> dict:
  """Main-distribution variables, checked against the inference model (one ValueError if they do not fit)."""
  # Without an explicit list every batch_stats_<d> collection and BN scale_<d>/bias_<d> param is auxiliary.
  main = convert.main_distribution(variables, config['model_overrides'].get('distributions'))
  expected = {p: tuple(s.shape) for p, s in convert.abstract_variables(inference_model(config)).items()}
  got = {p: tuple(np.shape(v)) for p, v in traverse_util.flatten_dict(main).items()}
  problems = [f'missing {"/".join(p)}' for p in expected if p not in got]
  problems += [f'shape mismatch {"/".join(p)}: got {got[p]}, expected {s}'
               for p, s in expected.items() if p in got and got[p] != s]
  problems += [f'unexpected {"/".join(p)}' for p in got if p not in expected]
  convert.mapping.raise_problems(problems, f'checkpoint variables -> {config["model"]}')
  return jax.tree.map(lambda a: np.asarray(a, np.float32), main)


def _exported_config(config: Dict[str, Any]) -> Dict[str, Any]:
  keep = dict(config)
  keep['model_overrides'] = {k: v for k, v in config['model_overrides'].items() if k != 'distributions'}
  return {k: keep[k] for k in CONFIG_KEYS + ('input_range',)}


def export_flax(config, variables, output: str) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  output = os.path.abspath(output)
  os.makedirs(output, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(output, 'variables'), inference_variables(config, variables))
  checkpointer.wait_until_finished()
  with open(os.path.join(output, CONFIG_FILE), 'w') as f:
    json.dump(_exported_config(config), f, indent=1)


def load_exported_flax(path: str):
  """(config, module, variables) of a directory written by export_flax."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  config = read_config(path)
  variables = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), 'variables'))
  return config, inference_model(config), jax.tree.map(np.asarray, variables)


def export_timm(config, variables, output: str) -> None:
  convert.save_timm_safetensors(inference_variables(config, variables), inference_model(config), output)


def export_savedmodel(config, variables, output: str, platforms=('cpu', 'cuda', 'tpu'),
                      depthwise_impl=None) -> None:
  """platforms: where the SavedModel may run (jax2tf native serialization lowers once per platform).
  depthwise_impl: override the model's depthwise formulation (default 'auto' resolves on THIS machine's
  backend: 'shifted' when exporting on CPU, 'grouped' on GPU/TPU; both compute the same function)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  module = inference_model(config)
  if depthwise_impl:
    module = module.clone(depthwise_impl=depthwise_impl)
  size = int(config['image_size'])
  low, high = (float(v) for v in config['input_range'])

  def probabilities(v, images):
    return jax.nn.softmax(module.apply(v, images, train=False), axis=-1)

  converted = jax2tf.convert(probabilities, polymorphic_shapes=[None, '(b, ...)'], with_gradient=False,
                             native_serialization_platforms=tuple(platforms))
  holder = tf.Module()
  holder.weights = tf.nest.map_structure(lambda a: tf.Variable(a, trainable=False),
                                         inference_variables(config, variables))

  @tf.function(autograph=False, input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, 'images')])
  def serve(images):
    return {'probabilities': converted(holder.weights, images)}

  @tf.function(autograph=False, input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, 'images')])
  def serve_uint8(images):
    return serve(tf.cast(images, tf.float32) * ((high - low) / 255.0) + low)  # reuses serve's graph

  holder.serve, holder.serve_uint8 = serve, serve_uint8
  tf.saved_model.save(holder, output, signatures={'serving_default': serve, 'serving_uint8': serve_uint8})


def export(workdir: str, fmt: str, output: str) -> None:
  if fmt not in FORMATS:
    raise ValueError(f'--format must be one of {FORMATS}, got {fmt!r}')
  config, variables = load_inference_variables(workdir)
  {'flax': export_flax, 'timm': export_timm, 'savedmodel': export_savedmodel}[fmt](config, variables, output)


def main(argv=None) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog='python -m advprop_jax.export', description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='Training workdir (config.json + Orbax checkpoints).')
  parser.add_argument('--format', default='flax', choices=FORMATS)
  parser.add_argument('--output', required=True,
                      help='Output path (directory for flax/savedmodel, file for timm).')
  args = parser.parse_args(argv)
  export(args.workdir, args.format, args.output)
  print(f'Exported {args.workdir} as {args.format} to {args.output}')


if __name__ == '__main__':
  main()
