"""EfficientNet image preprocessing (the TF reference's preprocessing.py, with stateless randomness).

Train: Inception-style random crop (sample_distorted_bounding_box, center-crop fallback) fused with JPEG
decoding, bicubic resize to S, random flip, optional AutoAugment/RandAugment on uint8, normalisation.
Eval: center crop of side S/(S+32)*min(h, w) (or crop_fraction*min(h, w)), bicubic resize, normalisation.

Every function takes either encoded bytes (tf.string; JPEG is decoded only inside the crop window with
decode_and_crop_jpeg, other formats are decoded whole and sliced) or an already decoded uint8 [H, W, 3]
image (the cached path of small datasets). Randomness comes from a [2] int `seed` per image.
"""
import tensorflow as tf

from advprop_jax.data import autoaugment

CROP_PADDING = 32  # eval crop side = S / (S + CROP_PADDING) * min(h, w)   (reference constant)
# ImageNet statistics in 0..255 units, for normalization='imagenet' (non-AdvProp checkpoints).
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def eval_crop_fraction(image_size, crop_fraction=None):
  """The reference's S/(S+32) unless `crop_fraction` overrides it (.875 for B0 ... .954 for B8)."""
  if crop_fraction is None:
    return image_size / (image_size + CROP_PADDING)
  return float(crop_fraction)


def center_crop_window(height, width, image_size, crop_fraction=None):
  """[offset_h, offset_w, side, side] (int32) of the eval center crop, exactly as the reference."""
  fraction = eval_crop_fraction(image_size, crop_fraction)
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  side = tf.cast(fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
  side = tf.maximum(side, 1)
  return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])


def random_crop_window(shape, seed, image_size, crop_fraction=None):
  """Inception crop window; falls back to the eval center crop when no valid box was found.

  sample_distorted_bounding_box returns the whole image when its 10 attempts fail; the reference
  detects that (all three dims equal) and uses the center crop instead, and so do we.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.cast(shape, tf.int32), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=0.1, aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0), area_range=(0.08, 1.0),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  failed = tf.reduce_all(tf.equal(tf.cast(shape, tf.int32)[:2], size[:2]))
  return tf.where(failed, center_crop_window(shape[0], shape[1], image_size, crop_fraction), window)


def _crop(image, window):
  return tf.slice(image, tf.stack([window[0], window[1], 0]), tf.stack([window[2], window[3], 3]))


def _decode(image):
  return tf.io.decode_image(image, channels=3, expand_animations=False)


def decode_and_crop(image, window_fn):
  """Decodes (if bytes) the region window_fn(shape) of `image`; uint8 [h, w, 3]."""
  if image.dtype != tf.string:
    return _crop(image, window_fn(tf.shape(image)))

  def jpeg():  # decode only the pixels inside the window (the expensive part of ImageNet input)
    window = window_fn(tf.image.extract_jpeg_shape(image))
    return tf.image.decode_and_crop_jpeg(image, window, channels=3)

  def other():
    decoded = _decode(image)
    return _crop(decoded, window_fn(tf.shape(decoded)))

  out = tf.cond(tf.io.is_jpeg(image), jpeg, other)
  out.set_shape([None, None, 3])
  return out


def decode_full(image):
  """Decodes bytes (any format tf.io.decode_image reads) to uint8 [H, W, 3]; passes uint8 through."""
  if image.dtype != tf.string:
    return image
  out = tf.cond(tf.io.is_jpeg(image), lambda: tf.io.decode_jpeg(image, channels=3),
                lambda: _decode(image))
  out.set_shape([None, None, 3])
  return out


def resize(image, image_size, method='bicubic'):
  """Resizes to [S, S] in float32 and clips to [0, 255]: bicubic overshoots, and the checkpoints were
  trained/evaluated on uint8-range pixels, so normalised inputs stay inside [-1, 1]."""
  out = tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size], method=method)
  return tf.clip_by_value(out, 0.0, 255.0)


def normalize(image, normalization='minus_one_one'):
  """float [.., 3] in 0..255 -> model inputs."""
  if normalization == 'minus_one_one':  # AdvProp checkpoints: x * 2/255 - 1
    return image * (2.0 / 255.0) - 1.0
  if normalization == 'imagenet':
    return (image - tf.constant(MEAN_RGB)) / tf.constant(STDDEV_RGB)
  raise ValueError(f"normalization must be 'minus_one_one' or 'imagenet', got {normalization!r}")


def preprocess_for_train(image, seed, *, image_size, train_crop='inception', random_flip=True,
                         augment='autoaugment', randaugment_layers=2, randaugment_magnitude=10,
                         normalization='minus_one_one', resize_method='bicubic', crop_fraction=None):
  """bytes or uint8 image, [2] int seed -> float32 [S, S, 3] model input."""
  crop_seed, flip_seed, aug_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  if train_crop == 'inception':
    image = decode_and_crop(
        image, lambda shape: random_crop_window(shape, crop_seed, image_size, crop_fraction))
  elif train_crop == 'resize':
    image = decode_full(image)
  else:
    raise ValueError(f"train_crop must be 'inception' or 'resize', got {train_crop!r}")
  image = resize(image, image_size, resize_method)
  if random_flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  if augment != 'none':
    # The reference augments uint8 pixels: clip (done in resize) and truncate, as it does.
    image = tf.cast(image, tf.uint8)
    if augment == 'autoaugment':
      image = autoaugment.distort_image_with_autoaugment(image, aug_seed)
    elif augment == 'randaugment':
      image = autoaugment.distort_image_with_randaugment(
          image, randaugment_layers, randaugment_magnitude, aug_seed)
    else:
      raise ValueError(f"augment must be 'autoaugment', 'randaugment' or 'none', got {augment!r}")
    image = tf.cast(image, tf.float32)
  image = tf.ensure_shape(image, [image_size, image_size, 3])
  return normalize(image, normalization)


def preprocess_for_eval(image, *, image_size, crop_fraction=None, normalization='minus_one_one',
                        resize_method='bicubic'):
  """bytes or uint8 image -> float32 [S, S, 3]: center crop, resize, normalise (deterministic)."""
  image = decode_and_crop(
      image, lambda shape: center_crop_window(shape[0], shape[1], image_size, crop_fraction))
  image = resize(image, image_size, resize_method)
  image = tf.ensure_shape(image, [image_size, image_size, 3])
  return normalize(image, normalization)
