"""Per-image preprocessing against reference values: the TF reference's eval crop windows, its TF1 bicubic
resize and failed-crop fallback, the random flip, and timm's eval transform against Pillow."""
import math
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf

from advprop_jax.data import autoaugment
from advprop_jax.data import preprocessing


# Crop fractions of the released checkpoints (timm crop_pct), B0..B8.
MODEL_SIZES = [224, 240, 260, 300, 380, 456, 528, 600, 672]
CROP_FRACTIONS = [.875, .882, .890, .904, .922, .934, .942, .949, .954]
# (S, short side) -> the reference's eval crop side int(S / (S + 32) * short side), written out by
# hand (exact rational floor; TF's float32 product agrees for these). Where timm's rounded crop_pct
# gives another side it is the comment.
REFERENCE_CROP_SIDES = {
    (224, 375): 328, (224, 333): 291, (240, 340): 300,  # timm 299
    (260, 375): 333, (300, 333): 300,  # timm 301
    (300, 375): 338,  # timm 339
    (300, 500): 451,  # timm 452
    (380, 333): 307, (456, 640): 598,  # timm 597
    (528, 640): 603,  # timm 602
    (600, 375): 356,  # timm 355
    (672, 500): 477, (800, 375): 360}


@pytest.mark.parametrize('size,fraction', zip(MODEL_SIZES, CROP_FRACTIONS))
def test_eval_crop_window_per_model(size, fraction):
  assert preprocessing.eval_crop_fraction(size) == pytest.approx(fraction, abs=1e-3)
  for h, w in ((375, 500), (500, 333), (size, size)):
    side = (size * min(h, w)) // (size + 32)
    window = preprocessing.center_crop_window(h, w, size).numpy().tolist()
    assert window == [(h - side + 1) // 2, (w - side + 1) // 2, side, side]
  window = preprocessing.center_crop_window(375, 500, size, crop_fraction=0.5).numpy().tolist()
  assert window[2:] == [187, 187]


@pytest.mark.parametrize('size,short', sorted(REFERENCE_CROP_SIDES))
def test_reference_crop_side_table(size, short):
  side = REFERENCE_CROP_SIDES[size, short]
  for h, w in ((short, 2 * short), (short + 125, short)):
    assert preprocessing.center_crop_window(h, w, size).numpy().tolist() == [
        (h - side + 1) // 2, (w - side + 1) // 2, side, side]


# tf.compat.v1.image.resize_bicubic of two small fixed arrays, computed once under TF 2.21 and written
# out (4 decimals): an upscale 3x4 -> 4x6 and a downscale 6x6 -> 4x4. Values outside [0, 255] are the
# kernel's overshoot, which the reference keeps.
RESIZE_UP_IN = [[0, 255, 0, 255], [255, 0, 255, 0], [10, 200, 30, 90]]
RESIZE_UP_OUT = [[0.0, 203.1455, 188.9995, 0.0, 160.6662, 283.3334],
                 [223.0664, 74.816, 83.4974, 220.957, 112.8039, 29.0951],
                 [156.4062, 91.3143, 103.6311, 166.4062, 71.799, 4.9479],
                 [-15.8398, 170.4564, 174.6941, 6.2695, 58.26, 109.8502]]
RESIZE_DOWN_IN = [[0, 13, 26, 39, 52, 65], [7, 20, 33, 46, 59, 72], [14, 27, 40, 255, 66, 79],
                  [21, 34, 47, 0, 73, 86], [28, 41, 54, 67, 80, 93], [35, 48, 61, 74, 87, 100]]
RESIZE_DOWN_OUT = [[0.0, 19.5, 39.0, 59.7188], [10.5, 18.2285, 175.0625, 58.4473],
                   [21.0, 46.125, 0.0, 86.3438], [32.1562, 51.1289, 76.7812, 91.3477]]


@pytest.mark.parametrize('pixels,size,expected', [(RESIZE_UP_IN, (4, 6), RESIZE_UP_OUT),
                                                  (RESIZE_DOWN_IN, (4, 4), RESIZE_DOWN_OUT)])
def test_tf1_bicubic_resize_matches_reference_values(pixels, size, expected):
  image = np.array(pixels, np.uint8)
  image = tf.constant(np.stack([image, 255 - image, image], axis=-1))
  ours = preprocessing.resize(image, size, 'tf1_bicubic', clip=False).numpy()
  np.testing.assert_allclose(ours[..., 0], expected, atol=2e-3)
  np.testing.assert_allclose(ours[..., 1], 255 - np.array(expected), atol=2e-3)
  live = tf.compat.v1.image.resize_bicubic(image[None], size)[0].numpy()  # TF's own op, here
  np.testing.assert_array_equal(ours, live)
  assert preprocessing.resize(image, size).numpy().max() <= 255  # clip=True for uint8 callers
  tf2 = preprocessing.resize(image, size, 'tf2_bicubic', clip=False).numpy()
  assert np.abs(tf2 - live).max() > 30  # the kernel this project used before issue #17
  with pytest.raises(ValueError, match="'tf1_bicubic', 'tf2_bicubic'"):
    preprocessing.resize(image, size, 'bicubic')


def test_random_flip_and_resize_mode():
  image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  png = tf.io.encode_png(image)
  expected = image.astype(np.float32)  # 8 -> 8 resize is exact
  # augment='none' flips the float image; with augmentation the uint8 image is flipped (before the
  # policy, replaced here by the identity), which must be the same.
  no_policy = lambda image, seed, semantics: image
  for augment in ('none', 'autoaugment'):
    with mock.patch.object(autoaugment, 'distort_image_with_autoaugment', no_policy):
      outs = [preprocessing.preprocess_for_train(
          png, tf.constant([0, i], tf.int64), image_size=8, train_crop='resize',
          augment=augment).numpy() for i in range(8)]
    flipped = [np.allclose(o, expected[:, ::-1], atol=1e-5) for o in outs]
    kept = [np.allclose(o, expected, atol=1e-5) for o in outs]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept), augment


def test_train_resize_path_is_the_reference_and_unclipped():
  # train_crop='resize', no flip, no augmentation: TF1 bicubic of the whole image, overshoot kept
  # (the reference clips only before its uint8 cast for AutoAugment).
  image = np.random.default_rng(1).integers(0, 256, (19, 27, 3), dtype=np.uint8)
  out = preprocessing.preprocess_for_train(
      tf.io.encode_png(image), tf.constant([0, 0], tf.int64), image_size=24, train_crop='resize',
      random_flip=False, augment='none').numpy()
  expected = tf.compat.v1.image.resize_bicubic(image[None], [24, 24])[0].numpy()
  np.testing.assert_array_equal(out, expected)
  assert out.min() < 0.0 and out.max() > 255.0
  clipped = preprocessing.preprocess_for_train(
      tf.io.encode_png(image), tf.constant([0, 0], tf.int64), image_size=24, train_crop='resize',
      random_flip=False, augment='autoaugment').numpy()
  assert clipped.dtype == np.uint8  # clipped and truncated before AutoAugment, as the reference


@pytest.mark.parametrize('channels', [1, 3])
def test_failed_crop_fallback_as_the_reference(channels):
  # 10 x 200: no box with aspect 3/4..4/3 covers 8 % of it, so all 10 attempts fail. The reference
  # then compares [h, w, c] of the JPEG with the decoded crop's [h, w, 3]: an RGB JPEG falls back to
  # the center crop, a grayscale one (c = 1) does not and is resized whole.
  rng = np.random.default_rng(2)
  pixels = rng.integers(0, 256, (10, 200, channels), dtype=np.uint8)
  jpeg = tf.io.encode_jpeg(pixels)
  size = 16
  out = preprocessing.preprocess_for_train(jpeg, tf.constant([3, 4], tf.int64), image_size=size,
                                           random_flip=False, augment='none').numpy()
  window = [0, 0, 10, 200]
  if channels == 3:
    side = int(np.float32(size / (size + 32)) * np.float32(10))  # 3
    window = [(10 - side + 1) // 2, (200 - side + 1) // 2, side, side]
  decoded = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3).numpy()
  expected = tf.compat.v1.image.resize_bicubic(decoded[None], [size, size])[0].numpy()
  np.testing.assert_array_equal(out, expected)


def _timm_eval_with_pil(image, size, crop_pct):
  """timm's eval transform spelled with Pillow and torchvision's size/offset arithmetic."""
  from PIL import Image
  scale = math.floor(size / crop_pct)
  h, w = image.shape[:2]
  new_w, new_h = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
  resized = Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC)
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  return np.asarray(resized.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize('shape,size,crop_pct', [((47, 61), 32, .882), ((47, 70), 32, .882),
                                                 ((90, 41), 32, .875), ((300, 451), 224, .875)])
def test_timm_eval_matches_pillow(shape, size, crop_pct):
  rng = np.random.default_rng(shape[0])
  image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
  out = preprocessing.preprocess_for_eval(
      tf.io.encode_png(image), image_size=size, crop_fraction=crop_pct,
      eval_preprocessing='timm').numpy()
  np.testing.assert_array_equal(out, _timm_eval_with_pil(image, size, crop_pct))
