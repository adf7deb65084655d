"""MEASURED PEER — not used by advprop_jax. The TF reference's EfficientNet preprocessing, for timing.

What benchmarks/input_pipeline.py times next to ours: the train / eval preprocessing of tensorflow/tpu
models/official/efficientnet (preprocessing.py + autoaugment.py as released with AdvProp, commit
f1a5906, Feb 2020), re-written here in our own words with the same TF ops, in the same order, with
the same control flow: stateful random ops, a tf.cond per AutoAugment sub-policy (25) and per op, the
sign draws of every geometric op instance evaluated up front, geometric ops on a "wrapped" image
(a 4th all-ones channel marking uncovered pixels). The one substitution: tf.contrib.image.transform
(TF1 only) becomes the raw ImageProjectiveTransformV2 op it called (NEAREST, fill 0). Only policy v0's
11 ops are here. Outputs are float32 in [0, 255] before normalisation (the reference normalised on
the TPU).

`Draws` holds the randomness; input_pipeline.py swaps in stateless draws that equal ours to check
that, with the same draws, the reference's pixels and ours are identical.
"""
import math

import tensorflow as tf

from advprop_jax.data import autoaugment as ours_aa  # only the policy table (checked equal, #17)

CROP_PADDING = 32
REPLACE = [128, 128, 128]
TRANSLATE_CONST = 250.0  # AutoAugment hparams of the reference
MAX_LEVEL = 10.0


class Draws:
  """The reference's stateful random ops (what it ran)."""

  def box(self, shape, **kwargs):
    return tf.image.sample_distorted_bounding_box(shape, **kwargs)

  def flip(self, image):
    return tf.image.random_flip_left_right(image)

  def uniform(self, **kwargs):
    return tf.random.uniform([], **kwargs)


# ----------------------------------------------------------------------------- crops and resize
def _resize(image, size):
  return tf.compat.v1.image.resize_bicubic([image], [size, size])[0]


def _center_crop_and_resize(image_bytes, size):
  shape = tf.image.extract_jpeg_shape(image_bytes)
  h, w = shape[0], shape[1]
  side = tf.cast((size / (size + CROP_PADDING)) * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
  window = tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])
  return _resize(tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3), size)


def _random_crop_and_resize(image_bytes, size, draws):
  shape = tf.image.extract_jpeg_shape(image_bytes)
  begin, extent, _ = draws.box(
      shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
      min_object_covered=0.1, aspect_ratio_range=(3. / 4, 4. / 3.), area_range=(0.08, 1.0),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], extent[0], extent[1]])
  image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
  # The sampler returns the whole image after 10 failed attempts; the reference recognises that by
  # three equal dims of [h, w, c] (JPEG) vs the decoded crop and then takes the eval crop instead.
  same = tf.equal(tf.image.extract_jpeg_shape(image_bytes), tf.shape(image))
  failed = tf.reduce_sum(tf.cast(same, tf.int32)) >= 3
  return tf.cond(failed, lambda: _center_crop_and_resize(image_bytes, size),
                 lambda: _resize(image, size))


def preprocess_train(image_bytes, size, augment=False, draws=None):
  draws = draws or Draws()
  image = _random_crop_and_resize(image_bytes, size, draws)
  image = draws.flip(image)
  image = tf.reshape(image, [size, size, 3])
  image = tf.image.convert_image_dtype(image, tf.float32)
  if augment:
    image = tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8)
    image = autoaugment_v0(image, draws)
    image = tf.cast(image, tf.float32)
  return image


def preprocess_eval(image_bytes, size):
  image = tf.reshape(_center_crop_and_resize(image_bytes, size), [size, size, 3])
  return tf.image.convert_image_dtype(image, tf.float32)


# ------------------------------------------------------------------------------- v0's 11 ops
def _blend(a, b, factor):
  if factor == 0.0:
    return tf.convert_to_tensor(a)
  if factor == 1.0:
    return tf.convert_to_tensor(b)
  a, b = tf.cast(a, tf.float32), tf.cast(b, tf.float32)
  mixed = a + factor * (b - a)
  if 0.0 < factor < 1.0:
    return tf.cast(mixed, tf.uint8)
  return tf.cast(tf.clip_by_value(mixed, 0.0, 255.0), tf.uint8)


def color(image, factor):
  return _blend(tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image)), image, factor)


def solarize(image, threshold=128):
  return tf.where(image < threshold, image, 255 - image)  # uint8 compare: 256 becomes 0


def solarize_add(image, addition=0, threshold=128):
  added = tf.cast(tf.clip_by_value(tf.cast(image, tf.int64) + addition, 0, 255), tf.uint8)
  return tf.where(image < threshold, added, image)


def posterize(image, bits):
  shift = 8 - bits
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def invert(image):
  return 255 - tf.convert_to_tensor(image)


def _wrap(image):
  shape = tf.shape(image)
  return tf.concat([image, tf.ones([shape[0], shape[1], 1], image.dtype)], 2)


def _unwrap(image, replace):
  shape = tf.shape(image)
  flat = tf.reshape(image, [-1, shape[2]])
  fill = tf.concat([replace, tf.ones([1], image.dtype)], 0)
  flat = tf.where(tf.equal(flat[:, 3], 0)[:, None], tf.ones_like(flat) * fill, flat)
  return tf.slice(tf.reshape(flat, shape), [0, 0, 0], [shape[0], shape[1], 3])


def _transform(image, matrix, replace):
  """contrib.image.transform of the wrapped image: NEAREST, zeros outside, then unwrap."""
  wrapped = _wrap(image)
  out = tf.raw_ops.ImageProjectiveTransformV2(
      images=wrapped[None], transforms=tf.reshape(tf.cast(matrix, tf.float32), [1, 8]),
      output_shape=tf.shape(wrapped)[:2], interpolation='NEAREST')[0]
  return _unwrap(out, replace)


def rotate(image, degrees, replace):
  radians = degrees * (math.pi / 180.0)
  h = tf.cast(tf.shape(image)[0], tf.float32) - 1.0
  w = tf.cast(tf.shape(image)[1], tf.float32) - 1.0
  cos, sin = tf.cos(radians), tf.sin(radians)
  x_offset = (w - (cos * w - sin * h)) / 2.0
  y_offset = (h - (sin * w + cos * h)) / 2.0
  return _transform(image, [cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0], replace)


def translate_y(image, pixels, replace):  # contrib translate by (0, -pixels)
  return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels, 0.0, 0.0], replace)


def shear_x(image, level, replace):
  return _transform(image, [1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0], replace)


def shear_y(image, level, replace):
  return _transform(image, [1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0], replace)


def autocontrast(image):
  def channel(im):
    lo = tf.cast(tf.reduce_min(im), tf.float32)
    hi = tf.cast(tf.reduce_max(im), tf.float32)

    def stretch():
      scale = 255.0 / (hi - lo)
      return tf.cast(tf.clip_by_value(tf.cast(im, tf.float32) * scale - lo * scale, 0.0, 255.0),
                     tf.uint8)
    return tf.cond(hi > lo, stretch, lambda: im)
  return tf.stack([channel(image[:, :, c]) for c in range(3)], 2)


def equalize(image):
  def channel(c):
    im = tf.cast(image[:, :, c], tf.int32)
    histo = tf.histogram_fixed_width(im, [0, 255], nbins=256)
    nonzero = tf.reshape(tf.gather(histo, tf.where(tf.not_equal(histo, 0))), [-1])
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255

    def lut():
      table = (tf.cumsum(histo) + step // 2) // step
      return tf.clip_by_value(tf.concat([[0], table[:-1]], 0), 0, 255)
    out = tf.cond(tf.equal(step, 0), lambda: im, lambda: tf.gather(lut(), im))
    return tf.cast(out, tf.uint8)
  return tf.stack([channel(c) for c in range(3)], 2)


OPS = {'AutoContrast': autocontrast, 'Equalize': equalize, 'Invert': invert, 'Rotate': rotate,
       'Posterize': posterize, 'Solarize': solarize, 'SolarizeAdd': solarize_add, 'Color': color,
       'ShearX': shear_x, 'ShearY': shear_y, 'TranslateY': translate_y}
_GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateY')  # take `replace`, random sign


# ------------------------------------------------------------------------------------ policy
def _negate_half_the_time(value, draws):
  keep = tf.cast(tf.floor(draws.uniform() + 0.5), tf.bool)
  return tf.cond(keep, lambda: tf.convert_to_tensor(value), lambda: -value)


def level_args(name, level, draws):
  """The reference's level -> arguments (signs drawn here, when the policy is built)."""
  frac = level / MAX_LEVEL
  if name in ('AutoContrast', 'Equalize', 'Invert'):
    return ()
  if name == 'Posterize':
    return (int(frac * 4),)
  if name == 'Solarize':
    return (int(frac * 256),)
  if name == 'SolarizeAdd':
    return (int(frac * 110),)
  if name == 'Color':
    return (frac * 1.8 + 0.1,)
  magnitude = {'Rotate': 30.0, 'ShearX': 0.3, 'ShearY': 0.3, 'TranslateY': TRANSLATE_CONST}[name]
  return (_negate_half_the_time(frac * magnitude, draws), REPLACE)


def autoaugment_v0(image, draws=None, policy=ours_aa.POLICY_V0):
  draws = draws or Draws()
  # Every op instance's arguments (and sign draws) are built for all 25 sub-policies, as in the
  # reference's build_and_apply_nas_policy, before one sub-policy is selected.
  built = [[(OPS[name], prob, level_args(name, level, draws)) for name, prob, level in sub]
           for sub in policy]

  def run_subpolicy(sub, im):
    for func, prob, args in sub:
      apply = tf.cast(tf.floor(draws.uniform() + prob), tf.bool)
      im = tf.cond(apply, lambda im=im, func=func, args=args: func(im, *args), lambda im=im: im)
    return im

  selected = draws.uniform(maxval=len(policy), dtype=tf.int32)
  for i, sub in enumerate(built):
    image = tf.cond(tf.equal(i, selected), lambda sub=sub, im=image: run_subpolicy(sub, im),
                    lambda im=image: im)
  return image
