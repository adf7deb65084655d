"""The host yields pixels; the device normalises them and applies a flip the pipeline deferred.

Whatever moved to the device must give the model the inputs the host-only order gives: reference
preprocessing (pixels), then the flip, then (p - mean) / std.
"""
import jax
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from advprop_jax import config as config_lib
from advprop_jax.data import input_pipeline as ip
from advprop_jax.data import normalization
from advprop_jax.data import preprocessing


def test_flip_decision_is_the_draw_of_tf_stateless_flip():
  image = tf.reshape(tf.range(2 * 5 * 3, dtype=tf.float32), [2, 5, 3])
  decisions = []
  for i in range(32):
    seed = tf.constant([7, i], tf.int64)
    flipped = tf.image.stateless_random_flip_left_right(image, seed).numpy()
    mirrored = np.array_equal(flipped, image.numpy()[:, ::-1])
    assert mirrored == bool(preprocessing.flip_decision(seed)), i
    decisions.append(mirrored)
  assert 0 < sum(decisions) < 32


def test_deferred_flip_equals_the_host_flip():
  rng = np.random.default_rng(3)
  png = tf.io.encode_png(rng.integers(0, 256, (29, 41, 3), dtype=np.uint8))
  kwargs = dict(image_size=24, augment='none', random_flip=True)
  for i in range(8):
    seed = tf.constant([5, i], tf.int64)
    host = preprocessing.preprocess_for_train(png, seed, **kwargs).numpy()
    pixels, flip = preprocessing.preprocess_for_train(png, seed, defer_flip=True, **kwargs)
    device = normalization.normalize(pixels.numpy()[None], 'minus_one_one', np.array([bool(flip)]))
    np.testing.assert_allclose(np.asarray(device)[0], (host - 127.5) / 127.5, rtol=0, atol=3e-7)
  with pytest.raises(ValueError, match='defer_flip'):
    preprocessing.preprocess_for_train(png, seed, image_size=24, augment='autoaugment',
                                       defer_flip=True)


def test_pipeline_defers_the_flip_only_when_it_is_last(tmp_path):
  c = config_lib.data_config()
  c.update(dataset='sklearn_digits', data_dir=str(tmp_path), image_size=32, eval_split='test',
           train_crop='resize', augment='none', random_flip=True, shuffle_buffer=64)
  ds = ip.train_dataset(c, per_process_batch_size=16, seed=0)
  host = next(ds.as_numpy_iterator())
  assert host['image'].dtype == np.float32 and 0 < host['flip'].sum() < 16
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ('data',)), P('data'))
  glob = next(ip.global_batches(ds.take(1), sharding, 'imagenet'))
  assert set(glob) == {'image', 'label'} and glob['image'].sharding == sharding
  flipped = np.where(host['flip'][:, None, None, None], host['image'][:, :, ::-1], host['image'])
  mean, std = (np.asarray(v, np.float32) for v in normalization.mean_std_pixels('imagenet'))
  np.testing.assert_allclose(np.asarray(glob['image']), (flipped - mean) / std, rtol=1e-6, atol=1e-6)
  c.augment = 'randaugment'  # the flip comes before the policy: stays on the host, uint8 out
  batch = next(ip.train_dataset(c, per_process_batch_size=4, seed=0).as_numpy_iterator())
  assert set(batch) == {'image', 'label'} and batch['image'].dtype == np.uint8
