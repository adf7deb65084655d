"""Robustness eval sets: the eval split with corruptions applied on the fly, and image-folder datasets
(Stylized-ImageNet). Same padded, masked batches as input_pipeline.eval_dataset."""
import os
from typing import Dict, Optional, Sequence

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from advprop_jax.data import corruptions
from advprop_jax.data import imagenet_subsets
from advprop_jax.data import input_pipeline
from advprop_jax.data import preprocessing


def corrupted_eval_dataset(data_config, *, corruption: str, severity: int, seed: int,
                           per_process_batch_size: int, split: Optional[str] = None,
                           max_examples: Optional[int] = None,
                           constants: str = 'imagenet_c') -> tf.data.Dataset:
  """The eval split with `corruption` applied on the fly: eval crop + resize -> uint8 -> corrupt
  (ImageNet-C corrupts the 224 center crop) with the severity `constants` (corruptions.py). Same
  padded/masked batches of pixels as eval_dataset."""
  split = split or data_config.eval_split
  if max_examples:
    split = f'{split}[:{int(max_examples)}]'
  builder = input_pipeline.prepared_builder(data_config)
  total = builder.info.splits[split].num_examples
  shard = tfds.split_for_jax_process(split)
  size = data_config.image_size
  offset = jax.process_index() * 1_000_000_000

  def prepare(index, ex):
    image = preprocessing.decode_and_crop(ex['image'], lambda s: preprocessing.center_crop_window(
        s[0], s[1], size, data_config.crop_fraction))
    image = tf.cast(tf.round(preprocessing.resize(image, size, data_config.resize_method)), tf.uint8)
    image = corruptions.corrupt(
        image, corruption, severity,
        corruptions.corruption_seed(seed, corruption, severity, index + offset), constants)
    return {'image': tf.ensure_shape(tf.cast(image, tf.float32), [size, size, 3]),
            'label': tf.cast(ex['label'], tf.int32), 'mask': tf.constant(1.0)}

  ds = builder.as_dataset(split=shard, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  ds = ds.enumerate().map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return input_pipeline.pad_and_batch(ds, total, per_process_batch_size, size)


def folder_labels(class_dirs: Sequence[str], num_classes: int) -> Dict[str, int]:
  """ImageFolder class sub-directory -> label: WordNet ids map to TFDS ImageNet order, integers to
  themselves (non-ImageNet models)."""
  wnid_index = {w: i for i, w in enumerate(imagenet_subsets.imagenet_wnids())}
  out = {}
  for d in class_dirs:
    if d in wnid_index and num_classes == 1000:
      out[d] = wnid_index[d]
    elif d.isdigit() and int(d) < num_classes:
      out[d] = int(d)
    else:
      raise ValueError(f'Class folder {d!r} is neither an ImageNet WordNet id (1000-class model) nor a '
                       f'class index < {num_classes}')
  return out


def folder_eval_dataset(directory: str, data_config, *, num_classes: int,
                        per_process_batch_size: int) -> tf.data.Dataset:
  """An ImageFolder tree (directory/<wnid>/*.{jpg,png}) through the standard eval preprocessing."""
  if not directory:
    raise FileNotFoundError('no image folder given')
  if not tf.io.gfile.isdir(directory):
    raise FileNotFoundError(f'image folder {directory!r} does not exist')
  class_dirs = sorted(d.rstrip('/') for d in tf.io.gfile.listdir(directory)
                      if tf.io.gfile.isdir(os.path.join(directory, d)))
  labels = folder_labels(class_dirs, num_classes)
  files, ys = [], []
  for d in class_dirs:
    for f in sorted(tf.io.gfile.listdir(os.path.join(directory, d))):
      if os.path.splitext(f)[1].lower() in ('.jpg', '.jpeg', '.png', '.bmp', '.gif'):
        files.append(os.path.join(directory, d, f))
        ys.append(labels[d])
  if not files:
    raise FileNotFoundError(f'No images under {directory!r}')
  pi, pc = jax.process_index(), jax.process_count()
  ds = tf.data.Dataset.from_tensor_slices((files[pi::pc], np.asarray(ys[pi::pc], np.int32)))
  size = data_config.image_size

  def prepare(path, label):
    image = preprocessing.preprocess_for_eval(
        tf.io.read_file(path), image_size=size, crop_fraction=data_config.crop_fraction,
        resize_method=data_config.resize_method, eval_preprocessing=data_config.eval_preprocessing)
    return {'image': image, 'label': label, 'mask': tf.constant(1.0)}

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return input_pipeline.pad_and_batch(ds, len(files), per_process_batch_size, size)
