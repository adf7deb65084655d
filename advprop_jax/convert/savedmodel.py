"""A TF SavedModel of a Flax classifier (jax2tf, native serialization): what `export --format=savedmodel` writes.

Signatures: 'serving_default' takes float32 images [batch, S, S, 3] NHWC already cropped, resized and normalised
(model inputs) and 'serving_uint8' uint8 pixels 0..255, normalised inside as (pixels - pixel_mean) / pixel_std
per channel; both return {'probabilities': float32 [batch, classes]} (softmax). The batch size is dynamic.
With class names (runs on an image folder) the model also holds `class_names`, a string variable in
label order: `tf.saved_model.load(path).class_names.numpy()`.
"""
from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np


def save_savedmodel(module: nn.Module, variables, path: str, *, image_size: int, pixel_mean: Sequence[float],
                    pixel_std: Sequence[float], platforms: Sequence[str] = ('cpu', 'cuda', 'tpu'),
                    class_names: Optional[Sequence[str]] = None) -> None:
  """Writes the SavedModel of `module.apply(variables, x, train=False)` + softmax to `path`.

  platforms: where the SavedModel may run (jax2tf native serialization lowers once per platform)."""
  # TensorFlow and jax2tf are needed by this format only, and take seconds to import.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  mean, std = np.asarray(pixel_mean, np.float32), np.asarray(pixel_std, np.float32)

  def probabilities(v, images):
    return jax.nn.softmax(module.apply(v, images, train=False), axis=-1)

  converted = jax2tf.convert(probabilities, polymorphic_shapes=[None, '(b, ...)'], with_gradient=False,
                             native_serialization_platforms=tuple(platforms))
  holder = tf.Module()
  holder.weights = tf.nest.map_structure(lambda a: tf.Variable(a, trainable=False), variables)
  spec = lambda dtype: [tf.TensorSpec([None, image_size, image_size, 3], dtype, 'images')]

  @tf.function(autograph=False, input_signature=spec(tf.float32))
  def serve(images):
    return {'probabilities': converted(holder.weights, images)}

  @tf.function(autograph=False, input_signature=spec(tf.uint8))
  def serve_uint8(images):
    return serve((tf.cast(images, tf.float32) - tf.constant(mean)) / tf.constant(std))  # reuses serve's graph

  holder.serve, holder.serve_uint8 = serve, serve_uint8
  if class_names is not None:  # a tracked variable: saved with the model, read back by name
    holder.class_names = tf.Variable(list(class_names), dtype=tf.string, trainable=False)
  tf.saved_model.save(holder, path, signatures={'serving_default': serve, 'serving_uint8': serve_uint8})
