"""The 200-class subsets of ImageNet-A and ImageNet-R, as indices into the 1000 TFDS ImageNet classes.

The published lists (Hendrycks et al., natural-adv-examples / imagenet-r) are NOT shipped here: no
installed package carries them (TFDS' imagenet_a / imagenet_r builders label with the full 1000-class
imagenet2012 ClassLabel and include no subset file), and a list typed from memory could not be
checked. Instead the subset is derived at run time from the dataset itself: the classes that occur
among its labels. Both datasets contain images of exactly their 200 classes, so this is the published
subset by construction; `derive_class_subset` refuses anything but `expected` classes.
"""
import os
from typing import List

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

NUM_SUBSET_CLASSES = 200


def imagenet_wnids() -> List[str]:
  """The 1000 ImageNet WordNet ids in TFDS imagenet2012 label order (from the installed package)."""
  path = os.path.join(os.path.dirname(tfds.__file__), 'datasets', 'imagenet2012', 'labels.txt')
  with tf.io.gfile.GFile(path) as f:
    wnids = [line.strip() for line in f if line.strip()]
  if len(wnids) != 1000:
    raise ValueError(f'{path} has {len(wnids)} wnids, expected 1000')
  return wnids


def class_subset_from_labels(labels, expected: int = NUM_SUBSET_CLASSES) -> np.ndarray:
  """Sorted unique class indices among `labels`; ValueError unless there are exactly `expected`."""
  subset = np.unique(np.asarray(list(labels), np.int64))
  if expected is not None and len(subset) != expected:
    raise ValueError(f'Found {len(subset)} distinct classes among the labels, expected {expected}: '
                     'the dataset is incomplete or not the published one.')
  return subset


def derive_class_subset(builder, split: str = 'test', expected: int = NUM_SUBSET_CLASSES) -> np.ndarray:
  """The classes present in `builder`'s `split` (labels only: images are not decoded)."""
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  labels = ds.map(lambda ex: ex['label'], num_parallel_calls=tf.data.AUTOTUNE).batch(4096)
  return class_subset_from_labels(
      np.concatenate([b for b in labels.as_numpy_iterator()] or [np.zeros([0], np.int64)]), expected)
