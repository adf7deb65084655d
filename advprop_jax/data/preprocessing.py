"""EfficientNet image preprocessing: the TF reference's preprocessing.py (tensorflow/tpu
models/official/efficientnet as released with AdvProp, CROP_PADDING = 32), with stateless randomness.

Train: Inception-style random crop (sample_distorted_bounding_box, center-crop fallback) fused with JPEG
decoding, TF1 bicubic resize of the crop to S, random flip, optional AutoAugment/RandAugment on uint8
(the reference clips to [0, 255] and truncates to uint8 first, and so do we). train_crop='resize'
replaces the crop by the whole image; 'pad_crop' then pads S/8 and crops S at random (CIFAR's).
Eval ('tf_reference'): center crop of side int(S/(S+32) * min(h, w)) (or crop_fraction * min(h, w)),
TF1 bicubic resize to S, NO clipping (bicubic overshoot reaches the model, as in the reference).
Eval 'timm': timm's transform (resize the short side, center crop, PIL bicubic), see timm_eval.py.
Outputs are pixels, as the reference's were: the device normalises them (data/normalization.normalize,
applied by input_pipeline.global_batches), as the reference did in its model_fn.

Every function takes either encoded bytes (tf.string; JPEG is decoded only inside the crop window with
decode_and_crop_jpeg, other formats are decoded whole and sliced) or an already decoded uint8 [H, W, 3]
image (the cached path of small datasets). Randomness comes from a [2] int `seed` per image.
"""
import math

import tensorflow as tf

from advprop_jax.data import autoaugment
from advprop_jax.data import timm_eval
from advprop_jax.data.choices import EVAL_PREPROCESSINGS, RESIZE_METHODS

# The resize kernels and eval transforms a data config selects by name: data/choices.py.
CROP_PADDING = 32  # eval crop side = S / (S + CROP_PADDING) * min(h, w)   (reference constant)
# Signatures of the formats tf.io.decode_image reads; anything else is reported by record id.
_IMAGE_MAGIC = (b'\xff\xd8\xff', b'\x89PNG', b'GIF8', b'BM', b'RIFF')


def eval_crop_fraction(image_size, crop_fraction=None):
  """The reference's exact S/(S+32) unless `crop_fraction` overrides it.

  timm's crop_pct (.875 .882 .890 .904 .922 .934 .942 .949 .954 for B0-B8, models.efficientnet.SCALING)
  are these fractions rounded: their crop side is 1 px off the reference's for 20-53 % of short sides
  200-1000 (B1-B8; B0's .875 is exact).
  """
  if crop_fraction is None:
    return image_size / (image_size + CROP_PADDING)
  return float(crop_fraction)


def center_crop_window(height, width, image_size, crop_fraction=None):
  """[offset_h, offset_w, side, side] (int32) of the eval center crop, exactly as the reference:
  side = int(fraction * min(h, w)) in float32 arithmetic, offsets (h - side + 1) // 2."""
  return _center_window(tf.stack([tf.cast(height, tf.int32), tf.cast(width, tf.int32)]), image_size,
                        crop_fraction)


def _center_window(height_width, image_size, crop_fraction=None):
  # Vectorised over (h, w): in tf.data each op costs microseconds, as much as its work on scalars.
  fraction = eval_crop_fraction(image_size, crop_fraction)
  side = tf.cast(fraction * tf.cast(tf.reduce_min(height_width), tf.float32), tf.int32)
  side = tf.maximum(side, 1)
  return tf.concat([(height_width - side + 1) // 2, tf.stack([side, side])], 0)


def random_crop_window(shape, seed, image_size, crop_fraction=None):
  """Inception crop window; falls back to the eval center crop when no valid box was found.

  sample_distorted_bounding_box returns the whole image when its 10 attempts fail; the reference
  detects that by comparing the JPEG's [h, w, channels] with the decoded crop's [h, w, 3] (all three
  equal), and so do we: a grayscale JPEG (1 channel) therefore never falls back and is resized whole.
  """
  shape = tf.cast(shape, tf.int32)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=0.1, aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0), area_range=(0.08, 1.0),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  window = tf.gather(tf.concat([begin, size], 0), [0, 1, 3, 4])
  failed = tf.reduce_all(tf.equal(shape, size * [1, 1, -3]))  # size is [h', w', -1]: vs [h', w', 3]
  # A cond, not a select: the center window's dozen scalar ops then run only for the rare fallback.
  return tf.cond(failed, lambda: _center_window(shape[:2], image_size, crop_fraction),
                 lambda: window)


def _crop(image, window):
  return tf.slice(image, tf.stack([window[0], window[1], 0]), tf.stack([window[2], window[3], 3]))


def _decode(image, record_id):
  """Any format tf.io.decode_image reads; other bytes fail naming `record_id` (checked here, on the
  non-JPEG path only, so that ImageNet's JPEGs pay nothing for it)."""
  known = tf.reduce_any(tf.stack(
      [tf.equal(tf.strings.substr(image, 0, len(m)), m) for m in _IMAGE_MAGIC]))
  with tf.control_dependencies([tf.debugging.Assert(known, ['Undecodable image in record', record_id])]):
    return tf.io.decode_image(image, channels=3, expand_animations=False)


def decode_and_crop(image, window_fn, record_id='', all_jpeg=False):
  """Decodes (if bytes) the region window_fn(shape) of `image`; uint8 [h, w, 3].

  window_fn gets [h, w, channels] of the stored image (channels of the JPEG itself: 1 for grayscale).
  all_jpeg: the dataset declares JPEG encoding (TFDS ImageNet does), so no per-image format branch: a
  tf.cond costs a function call per image in tf.data (15-35 us measured, ~1 % of a 224 px image's work).
  """
  if image.dtype != tf.string:
    return _crop(image, window_fn(tf.shape(image)))

  def jpeg():  # decode only the pixels inside the window (the expensive part of ImageNet input)
    window = window_fn(tf.image.extract_jpeg_shape(image))
    return tf.image.decode_and_crop_jpeg(image, window, channels=3)

  if all_jpeg:  # the raw op: tf.debugging.Assert wraps itself in a cond
    with tf.control_dependencies([tf.raw_ops.Assert(
        condition=tf.io.is_jpeg(image), data=['Undecodable image (not a JPEG) in record', record_id])]):
      return jpeg()

  def other():
    decoded = _decode(image, record_id)
    return _crop(decoded, window_fn(tf.shape(decoded)))

  out = tf.cond(tf.io.is_jpeg(image), jpeg, other)
  out.set_shape([None, None, 3])
  return out


def decode_full(image, record_id=''):
  """Decodes bytes (any format tf.io.decode_image reads) to uint8 [H, W, 3]; passes uint8 through."""
  if image.dtype != tf.string:
    return image
  out = tf.cond(tf.io.is_jpeg(image), lambda: tf.io.decode_jpeg(image, channels=3),
                lambda: _decode(image, record_id))
  out.set_shape([None, None, 3])
  return out


def resize(image, image_size, kernel='tf1_bicubic', clip=True):
  """uint8 or float [h, w, c] -> float32 [S, S, c] (image_size S, or an (h, w) pair) with the kernel
  named `kernel`, one of RESIZE_METHODS.

  Bicubic overshoots [0, 255]. clip=True (the default, for callers that round to uint8 next) clips;
  the model-input paths pass clip=False: the reference feeds the overshoot to the model, and clips
  only right before its uint8 cast for AutoAugment.
  """
  size = [image_size, image_size] if isinstance(image_size, int) else list(image_size)
  if kernel == 'tf1_bicubic':
    # The raw op is what tf.compat.v1.image.resize_bicubic runs; fed uint8 directly (it converts
    # internally, so a separate cast of the whole crop to float32 would only cost time).
    out = tf.raw_ops.ResizeBicubic(images=image[None], size=size, align_corners=False,
                                   half_pixel_centers=False)[0]
  elif kernel == 'tf2_bicubic':
    out = tf.image.resize(tf.cast(image, tf.float32), size, method='bicubic')
  else:
    raise ValueError(f'resize_method={kernel!r}; allowed: {RESIZE_METHODS}')
  return tf.clip_by_value(out, 0.0, 255.0) if clip else out


def _with_shape(image, image_size):
  """[S, S, 3], checked at run time only where the static shape is not known already (the resize
  makes it known; an op per image costs microseconds in tf.data)."""
  if image.shape.is_fully_defined():
    image.shape.assert_is_compatible_with([image_size, image_size, 3])
    return image
  return tf.ensure_shape(image, [image_size, image_size, 3])


def flip_decision(flip_seed):
  """The draw tf.image.stateless_random_flip_left_right(image, flip_seed) makes: mirror when True.
  (Its stateless_uniform in [0, 1) is the raw draw times 1 plus 0; the raw ops spare those two.)"""
  key, counter, alg = tf.raw_ops.StatelessRandomGetKeyCounterAlg(seed=flip_seed)
  return tf.raw_ops.StatelessRandomUniformV2(shape=[], key=key, counter=counter, alg=alg) < 0.5


def pad_and_random_crop(image, image_size, seed):
  """Zero-pads image_size // 8 pixels on each side and takes a random image_size square (CIFAR's
  4 px at 32 px; torchvision RandomCrop(32, padding=4)); zero is black before normalisation."""
  pad = image_size // 8
  image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  return tf.image.stateless_random_crop(image, [image_size, image_size, 3], seed)


def preprocess_for_train(image, seed, *, image_size, train_crop='inception', random_flip=True,
                         augment='autoaugment', randaugment_layers=2, randaugment_magnitude=10,
                         resize_method='tf1_bicubic', crop_fraction=None,
                         augment_semantics='tf_reference', record_id='', all_jpeg=False,
                         defer_flip=False):
  """bytes or uint8 image, [2] int seed -> [S, S, 3] pixels in the reference's op order: float32
  (unclipped bicubic output) without augmentation, uint8 after AutoAugment/RandAugment (the
  reference's float32 cast of those integers happens on the device). Bytes that are no image fail
  naming `record_id`; all_jpeg: see decode_and_crop.

  defer_flip (random_flip and no augmentation only; the flip is then the last step): returns
  (pixels, flip) unflipped, flip a bool to apply later; the input pipeline leaves it to the device,
  where it fuses into the normalisation, instead of a tf.cond and a copy of every image here.
  """
  crop_seed, flip_seed, aug_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  if defer_flip and (not random_flip or augment != 'none'):
    raise ValueError('defer_flip needs random_flip=True and augment="none" (the flip must be last)')
  if train_crop == 'inception':
    image = decode_and_crop(
        image, lambda shape: random_crop_window(shape, crop_seed, image_size, crop_fraction),
        record_id, all_jpeg)
  elif train_crop in ('resize', 'pad_crop'):
    image = decode_full(image, record_id)
  else:
    raise ValueError(f"train_crop must be 'inception', 'resize' or 'pad_crop', got {train_crop!r}")
  image = resize(image, image_size, resize_method, clip=False)
  if train_crop == 'pad_crop':
    image = pad_and_random_crop(image, image_size, crop_seed)
  if augment != 'none':
    # The reference augments uint8 pixels: clip and truncate, as it does. (It flips before this;
    # clipping and casting are per pixel, so flipping the uint8 image after is the same, 4x cheaper.)
    image = tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8)
  if defer_flip:
    return _with_shape(image, image_size), flip_decision(flip_seed)
  if random_flip:  # after the resize, as the reference (TF1 bicubic is not mirror-symmetric)
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  if augment != 'none':
    if augment == 'autoaugment':
      image = autoaugment.distort_image_with_autoaugment(image, aug_seed,
                                                         semantics=augment_semantics)
    elif augment == 'randaugment':
      image = autoaugment.distort_image_with_randaugment(
          image, randaugment_layers, randaugment_magnitude, aug_seed, semantics=augment_semantics)
    else:
      raise ValueError(f"augment must be 'autoaugment', 'randaugment' or 'none', got {augment!r}")
  return _with_shape(image, image_size)


def preprocess_for_eval(image, *, image_size, crop_fraction=None, resize_method='tf1_bicubic',
                        eval_preprocessing='tf_reference', record_id='', all_jpeg=False):
  """bytes or uint8 image -> float32 [S, S, 3] pixels (deterministic).

  'tf_reference': center crop, `resize_method` resize, no clipping. 'timm': timm's eval transform
  with crop_pct = crop_fraction (None: S/(S+32)); `resize_method` is not used (PIL bicubic).
  """
  if eval_preprocessing == 'tf_reference':
    image = decode_and_crop(
        image, lambda shape: _center_window(shape[:2], image_size, crop_fraction), record_id,
        all_jpeg)
    image = resize(image, image_size, resize_method, clip=False)
  elif eval_preprocessing == 'timm':
    # timm: short side -> floor(S / crop_pct); S + 32 when no fraction is set (S / (S / (S + 32))
    # may round below S + 32 in floating point).
    scale_size = (image_size + CROP_PADDING if crop_fraction is None
                  else math.floor(image_size / crop_fraction))
    image = timm_eval.resize_shorter_and_center_crop(decode_full(image, record_id), image_size,
                                                     scale_size)
    image = tf.cast(image, tf.float32)
  else:
    raise ValueError(f'eval_preprocessing={eval_preprocessing!r}; allowed: {EVAL_PREPROCESSINGS}')
  return _with_shape(image, image_size)
