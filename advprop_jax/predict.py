"""Classify images with an exported or converted model; prints the top-5 classes with probabilities.

  python -m advprop_jax.predict --checkpoint=EXPORT_DIR image.jpg ...          (export --format=flax output)
  python -m advprop_jax.predict --checkpoint=W.safetensors --model=efficientnet-b0 image.jpg ...
                                                                        (timm weights, e.g. tf_efficientnet_b0.ap_in1k)

Eval preprocessing of the model (RECIPE §2): center crop of crop_fraction * the short side, bicubic resize
(PIL) to image_size, pixels scaled to the input range ([-1, 1] for AdvProp weights). 1000-class models print
ImageNet names (advprop_jax/imagenet_classes.txt, shipped with the package); others print class indices.
"""
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

CLASSES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'imagenet_classes.txt')


def imagenet_class_names() -> List[str]:
  with open(CLASSES_FILE, encoding='utf-8') as f:
    names = [line.rstrip('\n') for line in f]
  assert len(names) == 1000, f'{CLASSES_FILE} has {len(names)} lines'
  return names


def preprocess(image, image_size: int, crop_fraction: float,
               input_range: Sequence[float] = (-1.0, 1.0)) -> np.ndarray:
  """PIL image or path -> float32 [image_size, image_size, 3] in input_range (the eval transform)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not isinstance(image, Image.Image):
    with Image.open(image) as f:
      image = f.convert('RGB')
  image = image.convert('RGB')
  w, h = image.size
  crop = max(1, int(crop_fraction * min(h, w)))
  top, left = (h - crop + 1) // 2, (w - crop + 1) // 2  # TF reference offsets
  image = image.crop((left, top, left + crop, top + crop))
  image = image.resize((image_size, image_size), Image.BICUBIC)
  x = np.asarray(image, np.float32) / 255.0
  low, high = input_range
  return x * (high - low) + low


def load_predictor(checkpoint: str, model: Optional[str] = None, model_overrides: Optional[Dict] = None,
                   num_classes: Optional[int] = None):
  """(config, module, variables) from an exported flax directory or a timm weight file (+ model name)."""
  from advprop_jax import convert, export  # pylint: disable=g-import-not-at-top
  from advprop_jax.models import default_crop_fraction, default_image_size  # pylint: disable=g-import-not-at-top
  if os.path.isdir(checkpoint):
    return export.load_exported_flax(checkpoint)
  if not model:
    raise ValueError(f'--model is required with a weight file ({checkpoint})')
  overrides = dict(model_overrides or {}, distributions=('clean',))
  variables = convert.load_timm_checkpoint(checkpoint, model, num_classes=num_classes, **overrides)
  num_classes = int(variables['params']['classifier']['kernel'].shape[1])
  config = dict(model=model, model_overrides=dict(model_overrides or {}), num_classes=num_classes,
                image_size=default_image_size(model), crop_fraction=default_crop_fraction(model),
                input_range=list(export.DEFAULT_INPUT_RANGE))
  return config, export.inference_model(config), variables


def predict(config, module, variables, images: Sequence, top_k: int = 5) -> List[List[Tuple[int, float]]]:
  """For each image (path or PIL image): [(class index, probability)] * top_k, best first."""
  import jax  # pylint: disable=g-import-not-at-top
  x = np.stack([preprocess(im, int(config['image_size']), float(config['crop_fraction']),
                           config.get('input_range', (-1.0, 1.0))) for im in images])
  probs = np.asarray(jax.jit(lambda v, x: jax.nn.softmax(module.apply(v, x, train=False)))(variables, x))
  order = np.argsort(-probs, axis=-1)[:, :top_k]
  return [[(int(i), float(p[i])) for i in row] for row, p in zip(order, probs)]


def main(argv=None) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog='python -m advprop_jax.predict', description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', required=True,
                      help='Exported flax directory, or a .safetensors (or torch .pth) timm weight file.')
  parser.add_argument('--model', help='Model name (create_model) for a weight file, e.g. efficientnet-b0.')
  parser.add_argument('--model_overrides', default='{}', help='JSON create_model overrides for a weight file.')
  parser.add_argument('--num_classes', type=int, help='Classes of a weight file (default: from the classifier).')
  parser.add_argument('--top_k', type=int, default=5, help='Classes printed per image.')
  parser.add_argument('images', nargs='+')
  args = parser.parse_args(argv)
  config, module, variables = load_predictor(args.checkpoint, args.model, json.loads(args.model_overrides),
                                             args.num_classes)
  names = imagenet_class_names() if config['num_classes'] == 1000 else None
  for path, top in zip(args.images, predict(config, module, variables, args.images, args.top_k)):
    print(path)
    for index, p in top:
      print(f'  {p:7.4f}  {index:4d}  {names[index] if names else ""}'.rstrip())


if __name__ == '__main__':
  main()
