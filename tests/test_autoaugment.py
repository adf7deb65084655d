"""AutoAugment v0 / RandAugment ops on known images (reference semantics; PIL where PIL defines them)."""
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from advprop_jax.data import autoaugment as aa

H, W = 16, 20  # non-square, so height/width mix-ups show


@pytest.fixture(scope='module')
def image():
  return np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def run(fn, *args):
  return np.asarray(fn(tf.constant(args[0]), *args[1:]))


NEUTRAL = {  # op -> argument at which the op must be the identity
    'Rotate': 0.0, 'ShearX': 0.0, 'ShearY': 0.0, 'TranslateX': 0.0, 'TranslateY': 0.0,
    'Brightness': 1.0, 'Color': 1.0, 'Contrast': 1.0, 'Sharpness': 1.0,
    'SolarizeAdd': 0, 'Posterize': 8, 'Cutout': 0,
}  # Solarize has none under the reference's semantics (256 inverts everything, see below)


@pytest.mark.parametrize('name', sorted(NEUTRAL))
def test_identity_at_neutral_argument(image, name):
  out = aa.apply_op(tf.constant(image), name, (NEUTRAL[name],), tf.constant([0.3, 0.5, 0.5]))
  np.testing.assert_array_equal(out.numpy(), image)


@pytest.mark.parametrize('name,level', [('Rotate', 0), ('ShearX', 0), ('ShearY', 0),
                                        ('TranslateX', 0), ('TranslateY', 0), ('Brightness', 5),
                                        ('Color', 5), ('Contrast', 5), ('Sharpness', 5),
                                        ('SolarizeAdd', 0), ('Cutout', 0)])
def test_identity_at_neutral_level(image, name, level):
  # Through the reference level mapping: e.g. enhance level 5 must give factor exactly 1.0.
  args = aa.level_to_arg(name, level, aa.AUTOAUGMENT_HPARAMS)
  for sign in (0.2, 0.8):
    out = aa.apply_op(tf.constant(image), name, args, tf.constant([sign, 0.5, 0.5]))
    np.testing.assert_array_equal(out.numpy(), image)


def test_level_to_arg_matches_reference():
  aah, rah = aa.AUTOAUGMENT_HPARAMS, aa.RANDAUGMENT_HPARAMS
  assert aa.level_to_arg('Rotate', 10, aah) == (30.0,)
  assert aa.level_to_arg('Posterize', 6, aah) == (2,)
  assert aa.level_to_arg('Posterize', 2, aah) == (0,)
  assert aa.level_to_arg('Solarize', 3, aah) == (76,)
  assert aa.level_to_arg('SolarizeAdd', 3, aah) == (33,)
  assert aa.level_to_arg('Color', 9, aah)[0] == pytest.approx(1.72)
  assert aa.level_to_arg('ShearY', 4, aah)[0] == pytest.approx(0.12)
  assert aa.level_to_arg('TranslateY', 9, aah) == (225.0,)  # translate_const 250
  assert aa.level_to_arg('TranslateX', 10, rah) == (100.0,)  # RandAugment: 100
  assert aa.level_to_arg('Cutout', 10, aah) == (100,)  # cutout_const 100
  assert aa.level_to_arg('Cutout', 10, rah) == (40,)
  assert aa.level_to_arg('Equalize', 7, aah) == ()
  with pytest.raises(ValueError, match='Bogus'):
    aa.level_to_arg('Bogus', 1, aah)


def test_pointwise_ops_known_outputs(image):
  np.testing.assert_array_equal(run(aa.invert, image), 255 - image)
  np.testing.assert_array_equal(run(aa.solarize, image, 128),
                                np.where(image < 128, image, 255 - image))
  np.testing.assert_array_equal(run(aa.posterize, image, 2), image & 0b11000000)
  np.testing.assert_array_equal(run(aa.posterize, image, 0), image & 0b10000000)  # TF shift clamp
  added = np.clip(image.astype(int) + 33, 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(run(aa.solarize_add, image, 33), np.where(image < 128, added, image))
  np.testing.assert_array_equal(run(aa.brightness, image, 0.0), np.zeros_like(image))
  grey = run(aa.color, image, 0.0)
  assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_solarize_256_inverts_every_pixel_as_the_reference(image):
  # Level 10 -> threshold int(10 / 10 * 256) = 256. The reference compares uint8 pixels with it; TF
  # converts 256 to uint8 0, so every pixel becomes 255 - x (shown here by that very expression).
  assert aa.level_to_arg('Solarize', 10, aa.AUTOAUGMENT_HPARAMS) == (256,)
  reference_expression = tf.function(lambda im: tf.where(im < 256, im, 255 - im))
  np.testing.assert_array_equal(reference_expression(tf.constant(image)).numpy(), 255 - image)
  np.testing.assert_array_equal(run(aa.solarize, image, 256), 255 - image)
  for sign in (0.2, 0.8):
    out = aa.apply_op(tf.constant(image), 'Solarize', (256,), tf.constant([sign, 0.5, 0.5]))
    np.testing.assert_array_equal(out.numpy(), 255 - image)
  # semantics='pil' keeps PIL's definition: nothing is >= 256, the image is unchanged.
  out = aa.apply_op(tf.constant(image), 'Solarize', (256,), tf.constant([0.3, 0.5, 0.5]), 'pil')
  np.testing.assert_array_equal(out.numpy(), image)
  # The v0 sub-policy (Posterize 0.8 2, Solarize 0.6 10), both applied: posterize to 2 bits, invert.
  policy = ((('Posterize', 1.0, 2), ('Solarize', 1.0, 10)),)
  for semantics, expected in (('tf_reference', 255 - (image & 0x80)), ('pil', image & 0x80)):
    out = aa.distort_image_with_autoaugment(tf.constant(image), tf.constant([1, 2], tf.int64),
                                            policy=policy, semantics=semantics)
    np.testing.assert_array_equal(out.numpy(), expected)


def test_randaugment_reference_quirks(image):
  # Contrast: the reference blends towards (histogram sum) / 256 = pixel count / 256, truncated.
  degenerate = np.float32(int(H * W / 256))  # 320 / 256 -> 1
  expected = np.clip(degenerate + np.float32(1.5) * (image.astype(np.float32) - degenerate), 0, 255)
  np.testing.assert_array_equal(run(aa.contrast, image, 1.5), expected.astype(np.uint8))
  grey_mean = run(aa.contrast, image, 0.0, 'pil')
  assert (grey_mean == grey_mean[0, 0, 0]).all() and 100 < grey_mean[0, 0, 0] < 155
  # Posterize at RandAugment magnitude >= 22.5 (bits > 8): the uint8 shift wraps, TF clamps it to 7.
  bits = aa.level_to_arg('Posterize', 28, aa.RANDAUGMENT_HPARAMS)[0]
  assert bits == 11
  np.testing.assert_array_equal(run(aa.posterize, image, bits), image & 0x80)
  np.testing.assert_array_equal(run(aa.posterize, image, bits, 'pil'), image)
  # Solarize at magnitude 17: threshold int(1.7 * 256) = 435 wraps to 179.
  np.testing.assert_array_equal(run(aa.solarize, image, 435), np.where(image < 179, image, 255 - image))
  with pytest.raises(ValueError, match="augment_semantics='fixed'"):
    aa.apply_op(tf.constant(image), 'Invert', (), tf.constant([0.3, 0.5, 0.5]), 'fixed')


def test_histogram_ops_match_pil(image):
  pil = Image.fromarray(image)
  np.testing.assert_array_equal(run(aa.equalize, image), np.asarray(ImageOps.equalize(pil)))
  np.testing.assert_array_equal(run(aa.autocontrast, image), np.asarray(ImageOps.autocontrast(pil)))
  np.testing.assert_array_equal(run(aa.solarize, image, 100), np.asarray(ImageOps.solarize(pil, 100)))
  np.testing.assert_array_equal(run(aa.posterize, image, 3), np.asarray(ImageOps.posterize(pil, 3)))
  constant = np.full((H, W, 3), 77, np.uint8)
  np.testing.assert_array_equal(run(aa.equalize, constant), constant)
  np.testing.assert_array_equal(run(aa.autocontrast, constant), constant)


def test_cutout_fills_square_with_128(image):
  out = run(aa.cutout, image, 2, 5, 7)
  expected = image.copy()
  expected[3:7, 5:9] = 128
  np.testing.assert_array_equal(out, expected)
  out = run(aa.cutout, image, 3, 0, 0)  # clipped at the corner
  expected = image.copy()
  expected[0:3, 0:3] = 128
  np.testing.assert_array_equal(out, expected)


def test_geometric_ops_known_outputs(image):
  out = run(aa.translate_x, image, 3.0)  # content moves left, uncovered columns are grey
  np.testing.assert_array_equal(out[:, :W - 3], image[:, 3:])
  assert (out[:, W - 3:] == 128).all()
  out = run(aa.translate_y, image, -2.0)  # content moves down
  np.testing.assert_array_equal(out[2:], image[:H - 2])
  assert (out[:2] == 128).all()
  out = run(aa.shear_x, image, 1.0)  # out[y, x] = in[y, x + y]
  for y in range(H):
    np.testing.assert_array_equal(out[y, :max(W - y, 0)], image[y, y:])
    assert (out[y, max(W - y, 0):] == 128).all()
  np.testing.assert_array_equal(run(aa.rotate, image, 180.0), image[::-1, ::-1])
  square = image[:, :H]
  np.testing.assert_array_equal(run(aa.rotate, square, 90.0), np.rot90(square))


def test_policy_v0_table():
  policy = aa.POLICY_V0
  assert len(policy) == 25 and all(len(sub) == 2 for sub in policy)
  ops = {name for sub in policy for name, _, _ in sub}
  assert ops == {'Equalize', 'ShearY', 'Color', 'Rotate', 'Solarize', 'SolarizeAdd', 'ShearX',
                 'Invert', 'Posterize', 'AutoContrast', 'TranslateY'}
  for sub in policy:
    for name, prob, level in sub:
      assert 0.0 <= prob <= 1.0 and isinstance(level, int) and 0 <= level <= 10
  assert policy[0] == (('Equalize', 0.8, 1), ('ShearY', 0.8, 4))
  assert policy[15] == (('Rotate', 1.0, 7), ('TranslateY', 0.8, 9))
  assert policy[24] == (('Color', 0.8, 6), ('Rotate', 0.4, 5))
  # The selector reaches every sub-policy and nothing else.
  idx = aa.policy_index(tf.linspace(0.0, 0.999999, 1000)).numpy()
  assert set(idx.tolist()) == set(range(25))


def test_policy_machinery(image):
  seed = tf.constant([1, 2], tf.int64)
  always_never = ((('Invert', 1.0, 0), ('Solarize', 0.0, 0)),)
  out = aa.distort_image_with_autoaugment(tf.constant(image), seed, policy=always_never)
  np.testing.assert_array_equal(out.numpy(), 255 - image)
  neutral = ((('Rotate', 1.0, 0), ('TranslateY', 1.0, 0)),)
  out = aa.distort_image_with_autoaugment(tf.constant(image), seed, policy=neutral)
  np.testing.assert_array_equal(out.numpy(), image)


def test_autoaugment_and_randaugment_deterministic(image):
  f_aa = tf.function(aa.distort_image_with_autoaugment)
  f_ra = tf.function(lambda im, s: aa.distort_image_with_randaugment(im, 2, 10, s))
  changed = 0
  for f in (f_aa, f_ra):
    for i in range(4):
      s = tf.constant([7, i], tf.int64)
      a, b = f(tf.constant(image), s).numpy(), f(tf.constant(image), s).numpy()
      assert a.dtype == np.uint8 and a.shape == image.shape
      np.testing.assert_array_equal(a, b)
      changed += int((a != image).any())
  assert changed >= 4  # the policies do change images
