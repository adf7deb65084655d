"""Pixels (0..255) <-> model inputs, for each input normalisation. TF-free: configs, attacks and export use it.

'minus_one_one' is AdvProp's convention (x = p * 2/255 - 1); 'imagenet' the torchvision/timm mean/std one
(x = (p - mean) / std per channel), used by the ResNet recipe and timm ResNet weights.

The input pipeline yields pixels; `normalize` turns them into model inputs on the device, as the TF
reference did in its model_fn (data/input_pipeline.global_batches): the host does not spend two passes
over every image on it, and augmented (integer-valued) batches travel as uint8, a quarter of the bytes.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

NORMALIZATIONS = ('minus_one_one', 'imagenet')
# Per-channel ImageNet mean/std in pixels (0..255), for normalization='imagenet'.
IMAGENET_MEAN_PIXELS = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_PIXELS = (0.229 * 255, 0.224 * 255, 0.225 * 255)
DEFAULT_INPUT_RANGE = (-1.0, 1.0)  # what exports older than per-channel statistics mean


def _check(normalization: str):
  if normalization not in NORMALIZATIONS:
    raise ValueError(f'normalization={normalization!r}; allowed: {NORMALIZATIONS}')


def pixels_to_input_units(pixels, normalization: str = 'minus_one_one'):
  """A perturbation of `pixels` (0..255 scale) in model-input units (per channel for 'imagenet').

  The one place where attack sizes given in pixels (configs) become input units."""
  _check(normalization)
  if normalization == 'minus_one_one':
    return pixels * 2.0 / 255.0
  return pixels / np.asarray(IMAGENET_STD_PIXELS, np.float32)


def input_range(normalization: str = 'minus_one_one'):
  """(min, max) of valid model inputs: the images of pixel values 0 and 255 (per channel for 'imagenet')."""
  _check(normalization)
  if normalization == 'minus_one_one':
    return -1.0, 1.0
  mean, std = np.asarray(IMAGENET_MEAN_PIXELS, np.float32), np.asarray(IMAGENET_STD_PIXELS, np.float32)
  return -mean / std, (255.0 - mean) / std


def mean_std_pixels(normalization: str = 'minus_one_one'):
  """(mean, std) in pixels with x = (p - mean) / std: the timm/torchvision form of the normalisation."""
  _check(normalization)
  if normalization == 'minus_one_one':
    return (127.5,) * 3, (127.5,) * 3
  return IMAGENET_MEAN_PIXELS, IMAGENET_STD_PIXELS


@functools.partial(jax.jit, static_argnames='normalization')
def normalize(pixels, normalization: str = 'minus_one_one', flip=None):
  """Pixels [b, h, w, c] (uint8 or float, 0..255; bicubic overshoot passes through) -> float32 model
  inputs, (p - mean) / std as the reference main.py writes it. XLA rewrites the division by a constant
  and may fuse a multiply-add, so results can differ from a host computation by an ulp (2e-7 on
  [-1, 1]). flip: [b] bool, images to mirror left-right first (a flip the input pipeline deferred)."""
  _check(normalization)
  mean, std = (np.asarray(v, np.float32) for v in mean_std_pixels(normalization))
  x = pixels.astype(jnp.float32)
  if flip is not None:
    x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
  return (x - mean) / std


# What an export records of the normalisation (export.py's config.json, timm metadata; predict).
def normalization_config(normalization: str) -> dict:
  """normalization, pixel_mean, pixel_std (per channel, pixels) and input_range (images of pixels 0,
  255). ValueError for an unknown name."""
  if normalization not in NORMALIZATIONS:
    raise ValueError(f'normalization={normalization!r}; allowed: {", ".join(NORMALIZATIONS)}')
  mean, std = mean_std_pixels(normalization)
  low, high = input_range(normalization)
  as_list = lambda v: [float(x) for x in np.ravel(v)] if np.ndim(v) else float(v)
  return dict(normalization=normalization, pixel_mean=[float(m) for m in mean],
              pixel_std=[float(s) for s in std], input_range=[as_list(low), as_list(high)])


def pixel_stats(config: dict):
  """Per-channel (mean, std) in pixels of a recorded config; exports older than per-channel support
  give a scalar input_range."""
  if 'pixel_mean' in config and 'pixel_std' in config:
    return np.asarray(config['pixel_mean'], np.float32), np.asarray(config['pixel_std'], np.float32)
  low, high = (float(v) for v in config.get('input_range', DEFAULT_INPUT_RANGE))
  std = 255.0 / (high - low)
  return np.full(3, -low * std, np.float32), np.full(3, std, np.float32)
