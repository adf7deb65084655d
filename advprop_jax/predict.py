"""Classify images with an exported or converted model; prints the top-k classes with probabilities.

  python -m advprop_jax.predict --checkpoint=EXPORT_DIR image.jpg ...           (export --format=flax output)
  python -m advprop_jax.predict --checkpoint=model.safetensors image.jpg ...    (export --format=timm output)
  python -m advprop_jax.predict --checkpoint=W.safetensors --model=efficientnet-b3 image.jpg ...
                                         (other timm weights, e.g. tf_efficientnet_b3.ap_in1k or resnet50)
  python -m advprop_jax.predict --checkpoint=WORKDIR --step=best|N image.jpg ...
                                         (a training run's checkpoint: EMA weights, as exported)
(or advprop-predict ...). Eval preprocessing: center crop of crop_fraction x the short side, bicubic resize
(PIL) to image_size x image_size, per channel (pixels - pixel_mean) / pixel_std. Exports record all of it;
other weight files get the model's native resolution and crop (models.default_image_size,
default_crop_fraction) and normalization 'minus_one_one' (EfficientNet, AdvProp weights) or 'imagenet'
(ResNet). --image_size, --crop_fraction and --normalization override them; the first output line says what
was used. 16-bit images (PIL modes I;16 and I) are scaled to 0..255. Class names: those an export
records (runs on an image folder), else ImageNet's for 1000-class models
(advprop_jax/imagenet_classes.txt, shipped with the package); otherwise class indices only.
Exit status 2 when a flag, the checkpoint or an image is unusable: one stderr line each, naming it; the
other images are still classified.
"""
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
from absl import flags
from PIL import Image, UnidentifiedImageError

from advprop_jax import best_checkpoint
from advprop_jax import cli
from advprop_jax import config as config_lib
from advprop_jax import convert
from advprop_jax import export
from advprop_jax.cli import UserError, one_line
from advprop_jax.data import normalization as normalization_lib
from advprop_jax.models import default_crop_fraction, default_image_size, model_names

CLASSES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'imagenet_classes.txt')
SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')  # 'I' (int32): how PIL decodes 16-bit PNG/TIFF
MINUS_ONE_ONE = normalization_lib.mean_std_pixels('minus_one_one')


def imagenet_class_names() -> List[str]:
  with open(CLASSES_FILE, encoding='utf-8') as f:
    names = [line.rstrip('\n') for line in f]
  assert len(names) == 1000, f'{CLASSES_FILE} has {len(names)} lines'
  return names


def class_names(config) -> Optional[List[str]]:
  """Names printed beside the class indices: recorded ones, ImageNet's for 1000 classes, or None."""
  recorded = config.get(export.CLASS_NAMES_KEY)
  if recorded and len(recorded) == int(config['num_classes']):
    return [str(name) for name in recorded]
  return imagenet_class_names() if int(config['num_classes']) == 1000 else None


def default_normalization(model: str) -> str:
  """What published weights of `model` expect: AdvProp EfficientNets [-1, 1], ResNets ImageNet mean/std."""
  return 'imagenet' if model.startswith('resnet') else 'minus_one_one'


def to_rgb(image: Image.Image) -> Image.Image:
  """8-bit RGB. 16-bit images are scaled (65535 -> 255): PIL's own convert would clip them to 0/255."""
  if image.mode in SIXTEEN_BIT_MODES:
    pixels = np.asarray(image, np.float64) / 257.0
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), 'L')
  return image.convert('RGB')


def load_image(path: str) -> Image.Image:
  """The decoded 8-bit RGB image at `path`; one UserError naming the path if it cannot be read."""
  try:
    with Image.open(path) as f:
      f.load()  # decodes now: a truncated file fails here, not later
      return to_rgb(f)
  except FileNotFoundError:
    raise UserError(f'{path}: no such file') from None
  except IsADirectoryError:
    raise UserError(f'{path}: is a directory, not an image') from None
  except UnidentifiedImageError:
    raise UserError(f'{path}: not an image format PIL can read') from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise UserError(f'{path}: cannot read the image ({getattr(e, "strerror", None) or e})') from None


def preprocess(image, image_size: int, crop_fraction: float, pixel_mean: Sequence[float] = MINUS_ONE_ONE[0],
               pixel_std: Sequence[float] = MINUS_ONE_ONE[1]) -> np.ndarray:
  """PIL image or path -> float32 [image_size, image_size, 3] = (pixels - pixel_mean) / pixel_std (eval)."""
  image = to_rgb(image) if isinstance(image, Image.Image) else load_image(image)
  w, h = image.size
  crop = max(1, int(crop_fraction * min(h, w)))
  top, left = (h - crop + 1) // 2, (w - crop + 1) // 2  # TF reference offsets
  image = image.crop((left, top, left + crop, top + crop))
  image = image.resize((image_size, image_size), Image.BICUBIC)
  x = np.asarray(image, np.float32)
  return (x - np.asarray(pixel_mean, np.float32)) / np.asarray(pixel_std, np.float32)


def _weight_file_config(path: str, model: Optional[str], model_overrides: Optional[Dict]) -> Dict:
  """What a weight file's metadata records (export --format=timm), completed by --model/--model_overrides."""
  recorded = {}
  if path.endswith('.safetensors'):
    try:
      metadata = convert.safetensors_metadata(path)
    except ValueError as e:
      raise UserError(f'--checkpoint={path}: {one_line(e)}') from None
    if export.TIMM_CONFIG_KEY in metadata:
      recorded = json.loads(metadata[export.TIMM_CONFIG_KEY])
  model = model or recorded.get('model')
  if not model:
    raise UserError(f'--checkpoint={path} records no model: pass --model (one of {", ".join(model_names())})')
  if model not in model_names():
    raise UserError(f'--model={model} is not a known model; names: {", ".join(model_names())}')
  if recorded.get('model') != model:
    recorded = {}  # the file's preprocessing belongs to another model
  overrides = recorded.get('model_overrides', {}) if model_overrides is None else model_overrides
  config = dict(model=model, model_overrides=config_lib.without_unset(overrides),
                image_size=recorded.get('image_size', default_image_size(model)),
                crop_fraction=recorded.get('crop_fraction', default_crop_fraction(model)))
  if export.CLASS_NAMES_KEY in recorded:
    config[export.CLASS_NAMES_KEY] = recorded[export.CLASS_NAMES_KEY]
  if 'pixel_mean' in recorded:
    config.update({k: recorded[k] for k in export.NORMALIZATION_KEYS if k in recorded})
  else:
    config.update(export.normalization_config(default_normalization(model)))
  return config


def load_predictor(checkpoint: str, model: Optional[str] = None, model_overrides: Optional[Dict] = None,
                   num_classes: Optional[int] = None, image_size: Optional[int] = None,
                   crop_fraction: Optional[float] = None, normalization: Optional[str] = None,
                   step=None):
  """(config, module, variables) from an exported flax directory or a timm weight file, or with
  `step` (a number or 'best') a training run's checkpoint (its EMA weights, main BN).

  image_size / crop_fraction / normalization override the recorded (or default) preprocessing."""
  if not checkpoint:
    raise UserError('--checkpoint is required: an export --format=flax directory or a weight file')
  if not os.path.exists(checkpoint):
    raise UserError(f'--checkpoint={checkpoint}: no such file or directory')
  if step is not None and not os.path.isdir(os.path.join(checkpoint, 'checkpoints')):
    raise UserError(f'--step={step}: only for a training run (--checkpoint=WORKDIR); '
                    f'--checkpoint={checkpoint} is not one')
  if os.path.isdir(checkpoint):
    given = [f for f, v in (('--model', model), ('--model_overrides', model_overrides),
                            ('--num_classes', num_classes)) if v is not None]
    if given:
      raise UserError(f'{", ".join(given)}: only for weight files; --checkpoint={checkpoint} is an export '
                      'directory, whose config.json names the model')
    run = os.path.isdir(os.path.join(checkpoint, 'checkpoints')) and not os.path.isdir(
        os.path.join(checkpoint, export.VARIABLES_DIR))
    if run and step is None:
      raise UserError(f'--checkpoint={checkpoint} is a training run: export it first '
                      f'(advprop-export --workdir={checkpoint} --format=flax --output=DIR), or '
                      'pass --step=best or --step=N')
    if run:
      config, variables = export.load_inference_variables(checkpoint, step)
      try:
        module = export.inference_model(config)
        variables = export.inference_variables(config, variables)
      except ValueError as e:  # the checkpoint's variables do not fit the model of its config.json
        raise UserError(f'--checkpoint={checkpoint}: step {config["checkpoint_step"]} does not fit '
                        f'config.json ({one_line(e)})') from None
    else:
      config, module, variables = export.load_exported_flax(checkpoint)
  else:
    config = _weight_file_config(checkpoint, model, model_overrides)
    overrides = dict(config['model_overrides'], distributions=('clean',))
    try:
      variables = convert.load_timm_checkpoint(checkpoint, config['model'], num_classes=num_classes,
                                               **overrides)
    except (ValueError, ImportError, OSError) as e:
      raise UserError(f'--checkpoint={checkpoint} (as {config["model"]} {config["model_overrides"] or ""}): '
                      f'{one_line(e)}') from None
    config['num_classes'] = convert.num_classes_of(variables)
    module = export.inference_model(config)
  if image_size is not None:
    config['image_size'] = image_size
  if crop_fraction is not None:
    config['crop_fraction'] = crop_fraction
  if normalization is not None:
    config.update(export.normalization_config(normalization))
  return config, module, variables


def describe(config) -> str:
  """The first output line: model and the preprocessing used."""
  size, overrides = int(config['image_size']), config['model_overrides']
  crop = float(config['crop_fraction'])
  return (f'model {config["model"]}{" " + json.dumps(overrides) if overrides else ""}, '
          f'{config["num_classes"]} classes; input {size}x{size} px: center crop {crop:g} of the short side, '
          f'bicubic resize, normalization {config.get("normalization", "minus_one_one")}')


def classify(config, module, variables, inputs: np.ndarray, top_k: int = 5,
             batch_size: int = 32) -> List[List[Tuple[int, float]]]:
  """inputs [n, S, S, 3] (preprocessed) -> [(class index, probability)] * top_k per image, best first."""
  forward = jax.jit(lambda v, x: jax.nn.softmax(module.apply(v, x, train=False), axis=-1))
  batch = max(1, min(batch_size, len(inputs)))
  probs = []
  for start in range(0, len(inputs), batch):  # every batch padded to the same shape: one compilation
    chunk = inputs[start:start + batch]
    padded = np.concatenate([chunk, np.zeros((batch - len(chunk),) + chunk.shape[1:], chunk.dtype)])
    probs.append(np.asarray(forward(variables, padded))[:len(chunk)])
  probs = np.concatenate(probs) if probs else np.zeros((0, int(config['num_classes'])))
  order = np.argsort(-probs, axis=-1)[:, :top_k]
  return [[(int(i), float(p[i])) for i in row] for row, p in zip(order, probs)]


def predict(config, module, variables, images: Sequence, top_k: int = 5,
            batch_size: int = 32) -> List[List[Tuple[int, float]]]:
  """For each image (path or PIL image): [(class index, probability)] * top_k, best first."""
  mean, std = export.pixel_stats(config)
  inputs = np.stack([preprocess(im, int(config['image_size']), float(config['crop_fraction']), mean, std)
                     for im in images])
  return classify(config, module, variables, inputs, top_k, batch_size)


# --------------------------------------------------------------------------------------------------------
# Command line (absl flags)
# --------------------------------------------------------------------------------------------------------
def define_flags(flag_values: flags.FlagValues) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string('checkpoint', None, 'An export --format=flax directory, or a .safetensors (or torch '
                      '.pth) timm weight file.', **fv)
  flags.DEFINE_string('model', None, 'Model of a weight file without advprop_jax metadata: '
                      f'{", ".join(model_names())}.', **fv)
  flags.DEFINE_string('model_overrides', None, 'JSON object of create_model overrides for a weight file, '
                      'e.g. \'{"width": 0.25}\' (default: as recorded in the file, else none).', **fv)
  flags.DEFINE_integer('num_classes', None, 'Classes of a weight file (default: from its classifier).', **fv)
  flags.DEFINE_integer('image_size', None, 'Input resolution in pixels (default: recorded, else the model\'s '
                       'native one, e.g. 300 for efficientnet-b3).', lower_bound=1, **fv)
  flags.DEFINE_float('crop_fraction', None, 'Center crop, fraction of the short side (default: recorded, '
                     'else the model\'s).', lower_bound=0.0, upper_bound=1.0, **fv)
  flags.DEFINE_enum('normalization', None, normalization_lib.NORMALIZATIONS, 'Input normalisation (default: recorded, else '
                    'minus_one_one for EfficientNet, imagenet for ResNet).', **fv)
  flags.DEFINE_integer('top_k', 5, 'Classes printed per image.', lower_bound=1, **fv)
  flags.DEFINE_integer('batch_size', 32, 'Images per forward pass.', lower_bound=1, **fv)
  flags.DEFINE_string('step', None, "With --checkpoint=WORKDIR (a training run): the checkpoint, a "
                      "step number or 'best' (the run's config.keep_best_by).", **fv)


def _overrides(value: Optional[str]) -> Optional[Dict]:
  if value is None:
    return None
  try:
    overrides = json.loads(value)
  except json.JSONDecodeError as e:
    raise UserError(f'--model_overrides={value}: not valid JSON ({e})') from None
  if not isinstance(overrides, dict):
    raise UserError(f'--model_overrides={value}: expected a JSON object, e.g. \'{{"width": 0.25}}\'')
  return overrides


def _step(value):
  try:
    return best_checkpoint.parse_step(value)
  except ValueError as e:
    raise UserError(str(e)) from None


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> int:
  status = [0]
  with cli.user_errors('predict', status):
    paths = list(argv[1:])
    if not paths:
      raise UserError('no images given: predict --checkpoint=PATH IMAGE [IMAGE ...]')
    if flag_values.crop_fraction is not None and flag_values.crop_fraction <= 0:
      raise UserError(f'--crop_fraction={flag_values.crop_fraction}: must be in (0, 1]')
    config, module, variables = load_predictor(
        flag_values.checkpoint, flag_values.model, _overrides(flag_values.model_overrides),
        flag_values.num_classes, flag_values.image_size, flag_values.crop_fraction,
        flag_values.normalization, _step(flag_values.step))
    print(describe(config), flush=True)
    mean, std = export.pixel_stats(config)
    good, inputs = [], []
    for path in paths:
      try:
        inputs.append(preprocess(path, int(config['image_size']), float(config['crop_fraction']), mean, std))
        good.append(path)
      except UserError as e:
        cli.error('predict', e)
        status[0] = 2
    if not good:
      return status[0]
    names = class_names(config)
    top = classify(config, module, variables, np.stack(inputs), flag_values.top_k, flag_values.batch_size)
    for path, classes in zip(good, top):
      print(path)
      for index, p in classes:
        print(f'  {p:7.4f}  {index:4d}  {names[index] if names else ""}'.rstrip())
  return status[0]


def call(argv: Sequence[str]) -> int:
  """`advprop-predict ARGS` in-process; returns the exit status."""
  return cli.call(define_flags, main, 'predict', argv)


def run() -> None:
  """Console script `advprop-predict`."""
  cli.run(main, 'predict', __doc__, define_flags)


if __name__ == '__main__':
  run()
