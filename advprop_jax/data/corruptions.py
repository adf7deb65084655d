"""ImageNet-C-style corruptions in TensorFlow ops, applied on the fly to uint8 images (offline datasets).

For ImageNet the evaluator reads TFDS `imagenet2012_corrupted/<type>_<severity>` (the real ImageNet-C);
this module exists for datasets with no prebuilt corrupted copy (the offline `sklearn_digits`, image
folders such as CIFAR-10). Two tables of severity constants, from Hendrycks & Dietterich's scripts:
`imagenet_c` (`make_imagenet_c.py`, made for 224x224 images) and `cifar10_c` (`make_cifar_c.py`, the
same corruptions made milder for 32x32 images: ImageNet-C's noise and blur wipe out a 32 px image).
The implementations are tf.image / tf.random approximations of theirs:

  corruption        operation                               imagenet_c            cifar10_c
  gaussian_noise    x/255 + N(0, c)                         .08 .12 .18 .26 .38   .04 .06 .08 .09 .10
  shot_noise        Poisson(x/255 * c) / c                  60 25 12 5 3          500 250 100 75 50
  impulse_noise     salt & pepper on a fraction c           .03 .06 .09 .17 .27   .01 .02 .03 .05 .07
  gaussian_blur     separable Gaussian, sigma c (reflect)   1 2 3 4 6 (*)         .4 .6 .7 .8 1
  contrast          (x - per-channel mean) * c + mean       .4 .3 .2 .1 .05       .75 .5 .4 .3 .15
  brightness        HSV value + c                           .1 .2 .3 .4 .5        .05 .1 .15 .2 .3
  pixelate          area-resize to c*size, nearest back     .6 .5 .4 .3 .25       .95 .9 .85 .75 .65
  jpeg_compression  JPEG at quality c                       25 18 15 10 7         80 65 58 50 40

(*) ImageNet-C has no Gaussian blur in its 15 (it stands in for defocus blur there); its constants are
those of ImageNet-C's extra `gaussian_blur`. Randomness is stateless: the same (image, name, severity,
seed) always gives the same output.
"""
import math

import tensorflow as tf

SEVERITIES = (1, 2, 3, 4, 5)
SEVERITY_CONSTANTS = {
    'imagenet_c': {
        'gaussian_noise': (.08, .12, 0.18, 0.26, 0.38),
        'shot_noise': (60, 25, 12, 5, 3),
        'impulse_noise': (.03, .06, .09, 0.17, 0.27),
        'gaussian_blur': (1, 2, 3, 4, 6),
        'contrast': (0.4, .3, .2, .1, .05),
        'brightness': (.1, .2, .3, .4, .5),
        'pixelate': (0.6, 0.5, 0.4, 0.3, 0.25),
        'jpeg_compression': (25, 18, 15, 10, 7),
    },
    'cifar10_c': {
        'gaussian_noise': (0.04, 0.06, .08, .09, .10),
        'shot_noise': (500, 250, 100, 75, 50),
        'impulse_noise': (.01, .02, .03, .05, .07),
        'gaussian_blur': (.4, .6, 0.7, .8, 1),
        'contrast': (.75, .5, .4, .3, 0.15),
        'brightness': (.05, .1, .15, .2, .3),
        'pixelate': (0.95, 0.9, 0.85, 0.75, 0.65),
        'jpeg_compression': (80, 65, 58, 50, 40),
    },
}
PARAMS = SEVERITY_CONSTANTS['imagenet_c']
CORRUPTIONS = tuple(PARAMS)


def _gaussian_blur(x, sigma):
  """x float [H, W, C]; separable Gaussian with reflect padding (radius capped by the image size)."""
  h, w = x.shape[0], x.shape[1]
  radius = int(math.ceil(3 * sigma))
  if h is not None and w is not None:
    radius = min(radius, h - 1, w - 1)
  taps = tf.range(-radius, radius + 1, dtype=tf.float32)
  k = tf.exp(-0.5 * tf.square(taps / sigma))
  k = k / tf.reduce_sum(k)
  c = tf.shape(x)[-1]
  x = tf.pad(x[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode='REFLECT')
  kh = tf.tile(tf.reshape(k, [-1, 1, 1, 1]), [1, 1, c, 1])
  kw = tf.tile(tf.reshape(k, [1, -1, 1, 1]), [1, 1, c, 1])
  x = tf.nn.depthwise_conv2d(x, kh, [1, 1, 1, 1], 'VALID')
  x = tf.nn.depthwise_conv2d(x, kw, [1, 1, 1, 1], 'VALID')
  return x[0]


def corrupt(image, name: str, severity: int, seed, constants: str = 'imagenet_c'):
  """uint8 [H, W, 3] -> uint8 [H, W, 3]: corruption `name` at `severity` (1..5), [2] int `seed`,
  with the severity `constants` of 'imagenet_c' or 'cifar10_c' (the module docstring's table)."""
  if constants not in SEVERITY_CONSTANTS:
    raise ValueError(f'Unknown severity constants {constants!r}; available: '
                     f'{tuple(SEVERITY_CONSTANTS)}')
  if name not in PARAMS:
    raise ValueError(f'Unknown corruption {name!r}; available: {CORRUPTIONS}')
  if severity not in SEVERITIES:
    raise ValueError(f'severity must be in {SEVERITIES}, got {severity}')
  c = SEVERITY_CONSTANTS[constants][name][severity - 1]
  seed = tf.cast(seed, tf.int64)
  shape = tf.shape(image)
  x = tf.cast(image, tf.float32) / 255.0
  if name == 'gaussian_noise':
    x = x + tf.random.stateless_normal(shape, seed, stddev=c)
  elif name == 'shot_noise':
    x = tf.random.stateless_poisson(shape, seed, lam=x * c, dtype=tf.float32) / c
  elif name == 'impulse_noise':
    u = tf.random.stateless_uniform(shape, seed)
    x = tf.where(u < c / 2, 0.0, tf.where(u > 1 - c / 2, 1.0, x))
  elif name == 'gaussian_blur':
    x = _gaussian_blur(x, float(c))
  elif name == 'contrast':
    mean = tf.reduce_mean(x, axis=[0, 1], keepdims=True)
    x = (x - mean) * c + mean
  elif name == 'brightness':
    hsv = tf.image.rgb_to_hsv(x)
    hsv = tf.concat([hsv[..., :2], tf.clip_by_value(hsv[..., 2:] + c, 0.0, 1.0)], -1)
    x = tf.image.hsv_to_rgb(hsv)
  elif name == 'pixelate':
    size = shape[:2]
    small = tf.maximum(tf.cast(tf.cast(size, tf.float32) * c, tf.int32), 1)
    x = tf.image.resize(x, small, method='area')
    x = tf.image.resize(x, size, method='nearest')
  elif name == 'jpeg_compression':
    out = tf.image.adjust_jpeg_quality(tf.cast(image, tf.uint8), int(c))
    return tf.ensure_shape(out, image.shape)
  out = tf.cast(tf.round(tf.clip_by_value(x, 0.0, 1.0) * 255.0), tf.uint8)
  return tf.ensure_shape(out, image.shape)


def corruption_seed(base_seed: int, name: str, severity: int, index):
  """[2] int64 stateless seed for one image: a function of (base_seed, corruption, severity, index)."""
  key = base_seed * 1000 + CORRUPTIONS.index(name) * 10 + severity
  return tf.stack([tf.constant(key, tf.int64), tf.cast(index, tf.int64)])
