"""AutoAugment (policy v0) and RandAugment on uint8 images, with stateless randomness.

The ops, level->argument mappings and the v0 policy follow the TF reference
(tensorflow/tpu models/official/efficientnet/autoaugment.py) that produced the published AdvProp
checkpoints; the code is ours. Differences from the reference, all deliberate:
  * randomness is stateless: every draw comes from one `seed` ([2] int tensor) per image, so an
    image's augmentation depends only on (run seed, element index), not on the iterator's history
    (exact resume, see input_pipeline.py);
  * rotate/shear/translate call tf.raw_ops.ImageProjectiveTransformV3 directly (the reference used
    tf.contrib.image, whose successor tensorflow_addons is unmaintained). NEAREST interpolation with a
    constant fill of 128 gives exactly the reference's wrap/unwrap result (alpha 0 -> 128);
  * nothing else: with semantics='tf_reference' (the default) every op computes what the reference's
    op computed under TF, including three quirks of its uint8 arithmetic (AUGMENT_SEMANTICS below).
    semantics='pil' gives the definitions the reference meant to copy from PIL instead.
"""
import math

import tensorflow as tf

from advprop_jax.data.choices import AUGMENT_SEMANTICS

MAX_LEVEL = 10.0
REPLACE = 128  # grey fill for pixels uncovered by geometric ops and for cutout (reference value)
AUTOAUGMENT_HPARAMS = {'cutout_const': 100, 'translate_const': 250}  # reference, policy v0
RANDAUGMENT_HPARAMS = {'cutout_const': 40, 'translate_const': 100}  # reference, RandAugment
# The op semantics a data config selects (augment_semantics): data/choices.py.

# (op, probability, level) pairs; one sub-policy of 25 is drawn per image and its two ops are applied
# in order, each with its own probability. Copied from the reference policy_v0.
POLICY_V0 = (
    (('Equalize', 0.8, 1), ('ShearY', 0.8, 4)),
    (('Color', 0.4, 9), ('Equalize', 0.6, 3)),
    (('Color', 0.4, 1), ('Rotate', 0.6, 8)),
    (('Solarize', 0.8, 3), ('Equalize', 0.4, 7)),
    (('Solarize', 0.4, 2), ('Solarize', 0.6, 2)),
    (('Color', 0.2, 0), ('Equalize', 0.8, 8)),
    (('Equalize', 0.4, 8), ('SolarizeAdd', 0.8, 3)),
    (('ShearX', 0.2, 9), ('Rotate', 0.6, 8)),
    (('Color', 0.6, 1), ('Equalize', 1.0, 2)),
    (('Invert', 0.4, 9), ('Rotate', 0.6, 0)),
    (('Equalize', 1.0, 9), ('ShearY', 0.6, 3)),
    (('Color', 0.4, 7), ('Equalize', 0.6, 0)),
    (('Posterize', 0.4, 6), ('AutoContrast', 0.4, 7)),
    (('Solarize', 0.6, 8), ('Color', 0.6, 9)),
    (('Solarize', 0.2, 4), ('Rotate', 0.8, 9)),
    (('Rotate', 1.0, 7), ('TranslateY', 0.8, 9)),
    (('ShearX', 0.0, 0), ('Solarize', 0.8, 4)),
    (('ShearY', 0.8, 0), ('Color', 0.6, 4)),
    (('Color', 1.0, 0), ('Rotate', 0.6, 2)),
    (('Equalize', 0.8, 4), ('Equalize', 0.0, 8)),
    (('Equalize', 1.0, 4), ('AutoContrast', 0.6, 2)),
    (('ShearY', 0.4, 7), ('SolarizeAdd', 0.6, 7)),
    (('Posterize', 0.8, 2), ('Solarize', 0.6, 10)),
    (('Solarize', 0.6, 8), ('Equalize', 0.6, 1)),
    (('Color', 0.8, 6), ('Rotate', 0.4, 5)),
)

# RandAugment draws uniformly from these 16 ops (reference order).
RANDAUGMENT_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'Color',
                   'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX',
                   'TranslateY', 'Cutout', 'SolarizeAdd')


# ----------------------------------------------------------------------------------------- ops
def blend(image1, image2, factor):
  """image1 + factor*(image2-image1), clipped and truncated to uint8 (PIL ImageEnhance semantics)."""
  image1 = tf.cast(image1, tf.float32)
  image2 = tf.cast(image2, tf.float32)
  return tf.cast(tf.clip_by_value(image1 + factor * (image2 - image1), 0.0, 255.0), tf.uint8)


def select(cond, a, b):
  """tf.where(cond, a, b) for uint8 tensors of one shape, as b ^ ((a ^ b) & mask): on CPU tf.where
  takes ~15 ns an element (2 ms for a 224 px image), about 10x these few bitwise passes."""
  mask = tf.cast(cond, tf.uint8) * 255
  return tf.bitwise.bitwise_xor(b, tf.bitwise.bitwise_and(tf.bitwise.bitwise_xor(a, b), mask))


def invert(image):
  return 255 - image


def solarize(image, threshold=128, semantics='tf_reference'):
  """x < threshold ? x : 255 - x, computed as x ^ 255 where inverted (255 - x == x ^ 255 in uint8)."""
  threshold = tf.cast(threshold, tf.int32)
  if semantics == 'tf_reference':  # uint8 threshold: wraps (256 -> 0: everything is inverted)
    inverted = image >= tf.cast(tf.math.floormod(threshold, 256), tf.uint8)
    flip = tf.constant(255, tf.uint8)
  else:  # PIL: a threshold above 255 inverts nothing
    inverted = image >= tf.cast(tf.minimum(threshold, 255), tf.uint8)
    flip = tf.cast(threshold <= 255, tf.uint8) * 255
  return tf.bitwise.bitwise_xor(image, tf.cast(inverted, tf.uint8) * flip)


def solarize_add(image, addition=0, threshold=128):
  added = tf.cast(image, tf.int32) + tf.cast(addition, tf.int32)
  added = tf.cast(tf.clip_by_value(added, 0, 255), tf.uint8)
  return select(image < tf.constant(threshold, tf.uint8), added, image)


def posterize(image, bits, semantics='tf_reference'):
  # TF clamps uint8 shift amounts to 7, so the reference's bits=0 (levels 0-2) keeps one bit; we make
  # that explicit instead of relying on it. Its shift 8 - bits is a uint8: bits > 8 wrap to >= 248,
  # clamped to 7 as well ('tf_reference'); 'pil' treats bits >= 8 as the identity.
  shift = 8 - tf.cast(bits, tf.int32)
  if semantics == 'tf_reference':
    shift = tf.math.floormod(shift, 256)
  shift = tf.cast(tf.clip_by_value(shift, 0, 7), tf.uint8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def color(image, factor):
  return blend(tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image)), image, factor)


def contrast(image, factor, semantics='tf_reference'):
  if semantics == 'tf_reference':  # the reference's histogram sum / 256 = pixel count / 256
    count = tf.cast(tf.shape(image)[0] * tf.shape(image)[1], tf.float32)
    mean = tf.minimum(count / 256.0, 255.0)
  else:
    mean = tf.reduce_mean(tf.cast(tf.image.rgb_to_grayscale(image), tf.float32))
  degenerate = tf.fill(tf.shape(image), tf.cast(mean, tf.uint8))
  return blend(degenerate, image, factor)


def brightness(image, factor):
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """PIL Sharpness: blend with a 3x3 smoothed copy whose 1-pixel border is the original image."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32, shape=[3, 3, 1, 1]) / 13.0
  kernel = tf.tile(kernel, [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel, [1, 1, 1, 1], 'VALID')
  smooth = tf.cast(tf.clip_by_value(smooth[0], 0.0, 255.0), tf.uint8)
  mask = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]])
  degenerate = select(mask == 1, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
  return blend(degenerate, image, factor)


def autocontrast(image):
  """Per channel, stretch [min, max] to [0, 255] (unchanged where the channel is constant)."""
  def channel(im):
    lo = tf.cast(tf.reduce_min(im), tf.float32)
    hi = tf.cast(tf.reduce_max(im), tf.float32)
    def stretch():
      scale = 255.0 / (hi - lo)
      return tf.cast(tf.clip_by_value(tf.cast(im, tf.float32) * scale - lo * scale, 0., 255.),
                     tf.uint8)
    return tf.cond(hi > lo, stretch, lambda: im)  # a scalar choice: cond, not an image-sized where
  return tf.stack([channel(image[:, :, c]) for c in range(3)], axis=2)


def equalize(image):
  """PIL ImageOps.equalize, per channel, with PIL's integer rounding.

  The three channel tables are concatenated and applied with ONE gather on value + 256 * channel:
  per-channel gathers restacked on the last axis cost about twice as much on CPU.
  """
  pixels = tf.cast(image, tf.int32)
  tables = []
  for c in range(3):
    histo = tf.histogram_fixed_width(pixels[:, :, c], [0, 255], nbins=256)
    nonzero = tf.boolean_mask(histo, histo != 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    safe_step = tf.maximum(step, 1)
    lut = (tf.cumsum(histo) + safe_step // 2) // safe_step
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    tables.append(tf.where(step == 0, tf.range(256), lut))  # step 0: channel unchanged
  table = tf.cast(tf.concat(tables, 0), tf.uint8)
  offsets = tf.reshape(tf.tile(tf.constant([0, 256, 512]), [tf.size(pixels) // 3]), tf.shape(pixels))
  return tf.gather(table, pixels + offsets)


def _transform(image, matrix):
  """Projective transform (output pixel (x, y) samples input at matrix @ (x, y, 1)), fill 128."""
  shape = tf.shape(image)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.reshape(tf.cast(matrix, tf.float32), [1, 8]),
      output_shape=shape[:2], fill_value=float(REPLACE), interpolation='NEAREST',
      fill_mode='CONSTANT')
  return out[0]


def rotate(image, degrees):
  """Rotate about the image centre (tf.contrib.image.rotate's matrix)."""
  radians = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  h = tf.cast(tf.shape(image)[0], tf.float32) - 1.0
  w = tf.cast(tf.shape(image)[1], tf.float32) - 1.0
  cos, sin = tf.cos(radians), tf.sin(radians)
  x_offset = (w - (cos * w - sin * h)) / 2.0
  y_offset = (h - (sin * w + cos * h)) / 2.0
  return _transform(image, [cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])


def translate_x(image, pixels):
  return _transform(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(image, pixels):
  return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels, 0.0, 0.0])


def shear_x(image, level):
  return _transform(image, [1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image, level):
  return _transform(image, [1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0])


def cutout(image, pad_size, center_h, center_w, replace=REPLACE):
  """Fill the (2*pad_size)^2 square centred at (center_h, center_w), clipped to the image."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  pad_size = tf.cast(pad_size, tf.int32)
  rows = tf.range(h)[:, None]
  cols = tf.range(w)[None, :]
  inside = ((rows >= center_h - pad_size) & (rows < center_h + pad_size) &
            (cols >= center_w - pad_size) & (cols < center_w + pad_size))
  inside = tf.tile(inside[:, :, None], [1, 1, 3])
  return select(inside, tf.fill(tf.shape(image), tf.cast(replace, image.dtype)), image)


# ------------------------------------------------------------------------ levels -> arguments
def level_to_arg(name, level, hparams):
  """The reference's magnitude mapping; returns a Python tuple (signs are drawn in apply_op)."""
  frac = level / MAX_LEVEL
  if name in ('AutoContrast', 'Equalize', 'Invert'):
    return ()
  if name == 'Rotate':
    return (frac * 30.0,)
  if name == 'Posterize':
    return (int(frac * 4),)
  if name == 'Solarize':
    return (int(frac * 256),)
  if name == 'SolarizeAdd':
    return (int(frac * 110),)
  if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    return (frac * 1.8 + 0.1,)
  if name in ('ShearX', 'ShearY'):
    return (frac * 0.3,)
  if name in ('TranslateX', 'TranslateY'):
    return (frac * float(hparams['translate_const']),)
  if name == 'Cutout':
    return (int(frac * hparams['cutout_const']),)
  raise ValueError(f'Unknown augmentation op {name!r}')


NAME_TO_FUNC = {
    'AutoContrast': autocontrast, 'Equalize': equalize, 'Invert': invert, 'Rotate': rotate,
    'Posterize': posterize, 'Solarize': solarize, 'SolarizeAdd': solarize_add, 'Color': color,
    'Contrast': contrast, 'Brightness': brightness, 'Sharpness': sharpness, 'ShearX': shear_x,
    'ShearY': shear_y, 'TranslateX': translate_x, 'TranslateY': translate_y, 'Cutout': cutout,
}
_NO_ARG = ('AutoContrast', 'Equalize', 'Invert')
_SIGNED = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')  # sign flipped w.p. 1/2
_SEMANTICS_DEPENDENT = ('Solarize', 'Contrast', 'Posterize')


def apply_op(image, name, args, uniforms, semantics='tf_reference'):
  """Applies op `name` with level_to_arg's `args` (Python or tensors); `uniforms` is a float [3] in
  [0, 1): the sign draw (geometric ops) and the cutout centre (row, column)."""
  if semantics not in AUGMENT_SEMANTICS:
    raise ValueError(f'augment_semantics={semantics!r}; allowed: {AUGMENT_SEMANTICS}')
  if name in _SIGNED:
    args = (tf.where(uniforms[0] < 0.5, -args[0], args[0]),)
  if name == 'Cutout':
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    center_h = tf.minimum(tf.cast(uniforms[1] * tf.cast(h, tf.float32), tf.int32), h - 1)
    center_w = tf.minimum(tf.cast(uniforms[2] * tf.cast(w, tf.float32), tf.int32), w - 1)
    args = tuple(args) + (center_h, center_w)
  if name in _SEMANTICS_DEPENDENT:
    return NAME_TO_FUNC[name](image, *args, semantics=semantics)
  return NAME_TO_FUNC[name](image, *args)


# ---------------------------------------------------------------------------------- policies
def policy_index(uniform, num_policies=len(POLICY_V0)):
  """Maps a U[0,1) draw to a sub-policy index in [0, num_policies)."""
  return tf.minimum(tf.cast(uniform * num_policies, tf.int32), num_policies - 1)


def _policy_tables(policy, hparams):
  """Per (sub-policy, slot): op index into the policy's op list, probability, and numeric argument
  (computed in Python by level_to_arg, so the values are exactly the reference's)."""
  ops = sorted({name for sub in policy for name, _, _ in sub})
  op_idx = [[ops.index(name) for name, _, _ in sub] for sub in policy]
  probs = [[prob for _, prob, _ in sub] for sub in policy]
  args = [[float((level_to_arg(name, level, hparams) or (0,))[0]) for name, _, level in sub]
          for sub in policy]
  return ops, tf.constant(op_idx, tf.int32), tf.constant(probs, tf.float32), tf.constant(args)


def distort_image_with_autoaugment(image, seed, policy=POLICY_V0, hparams=None,
                                   semantics='tf_reference'):
  """AutoAugment on a uint8 [H, W, 3] image; `seed` is a [2] int tensor (stateless).

  One sub-policy is drawn uniformly; each of its ops is applied with its probability. Built as one
  switch over the policy's distinct ops per slot (plus an identity branch) rather than 25 nested
  branches with two nested conds each: the same distribution, but 22 op instances instead of 50,
  which cut tracing from ~9 s to ~2.5 s (tf.data re-traces it for every dataset built).
  """
  hparams = hparams or AUTOAUGMENT_HPARAMS
  ops, op_table, prob_table, arg_table = _policy_tables(policy, hparams)
  num_slots = len(policy[0])
  u = tf.random.stateless_uniform([1 + 4 * num_slots], seed=seed)
  chosen = policy_index(u[0], len(policy))
  out = image
  for slot in range(num_slots):
    su = u[1 + 4 * slot: 5 + 4 * slot]  # [apply, sign, cutout row, cutout col]
    arg = arg_table[chosen, slot]
    apply = su[0] < prob_table[chosen, slot]
    index = tf.where(apply, op_table[chosen, slot], len(ops))  # len(ops) = identity
    branches = [lambda out=out, name=name: apply_op(
        out, name, () if name in _NO_ARG else (arg,), su[1:], semantics) for name in ops]
    branches.append(lambda out=out: out)
    out = tf.ensure_shape(tf.switch_case(index, branches), image.shape)
  return out


def distort_image_with_randaugment(image, num_layers, magnitude, seed, hparams=None,
                                   semantics='tf_reference'):
  """RandAugment: `num_layers` ops drawn uniformly from RANDAUGMENT_OPS, all at `magnitude`.

  As in the reference, a chosen op is always applied (its drawn probability is unused there).
  """
  hparams = hparams or RANDAUGMENT_HPARAMS
  u = tf.random.stateless_uniform([max(num_layers, 1) * 4], seed=seed)
  out = image
  for layer in range(num_layers):
    lu = u[4 * layer: 4 * layer + 4]  # [op choice, sign, cutout row, cutout col]
    branches = [
        lambda out=out, name=name: apply_op(
            out, name, level_to_arg(name, float(magnitude), hparams), lu[1:], semantics)
        for name in RANDAUGMENT_OPS]
    out = tf.switch_case(policy_index(lu[0], len(RANDAUGMENT_OPS)), branches)
    out = tf.ensure_shape(out, image.shape)
  return out
