"""Robustness metrics and inputs: ImageNet-C mCE, on-the-fly corrupted eval sets, image folders,
class-subset eval steps (ImageNet-A / -R).

mCE form used (documented in the report): AlexNet's published errors are taken as per-corruption
averages over the 5 severities (Hendrycks & Dietterich 2019), so
    CE_c     = mean_s err(c, s) / AlexNet_avg(c)
    relCE_c  = (mean_s err(c, s) - clean_err) / (AlexNet_avg(c) - AlexNet_clean_err)
    mCE      = mean_c CE_c,   relative mCE = mean_c relCE_c.
With all 5 severities this equals the paper's sum_s / sum_s form exactly (same denominators).
"""
import math
import os
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax import lax
from jax.sharding import PartitionSpec as P

from advprop_jax import objectives
from advprop_jax import parallel
from advprop_jax.data import corruptions
from advprop_jax.data import input_pipeline
from advprop_jax.data import preprocessing

# AlexNet top-1 error (fraction), averaged over severities 1..5; Hendrycks & Dietterich 2019.
ALEXNET_ERR = {
    'gaussian_noise': .886, 'shot_noise': .894, 'impulse_noise': .923, 'defocus_blur': .820,
    'glass_blur': .826, 'motion_blur': .786, 'zoom_blur': .798, 'snow': .867, 'frost': .827,
    'fog': .819, 'brightness': .565, 'contrast': .853, 'elastic_transform': .646, 'pixelate': .718,
    'jpeg_compression': .607,
}
ALEXNET_CLEAN_ERR = .4348
IMAGENET_C_TYPES = tuple(ALEXNET_ERR)


def mce(errors: Dict[str, Dict[int, float]], clean_err: float,
        reference: Optional[Dict[str, float]] = None,
        reference_clean_err: float = ALEXNET_CLEAN_ERR) -> dict:
  """errors[c][s] (fractions) -> per-corruption mean error, CE, relative CE and their means.

  Without `reference` (no AlexNet numbers, e.g. the digits suite) only the mean corruption error and
  its difference to clean are reported.
  """
  out = {'clean_error': clean_err, 'per_corruption': {}}
  means = {c: float(np.mean(list(by_s.values()))) for c, by_s in errors.items()}
  out['mean_corruption_error'] = float(np.mean(list(means.values()))) if means else float('nan')
  out['mean_corruption_error_minus_clean'] = out['mean_corruption_error'] - clean_err
  for c, m in means.items():
    row = {'mean_error': m}
    if reference is not None:
      row['ce'] = m / reference[c]
      row['relative_ce'] = (m - clean_err) / (reference[c] - reference_clean_err)
    out['per_corruption'][c] = row
  if reference is not None and means:
    out['mce'] = float(np.mean([r['ce'] for r in out['per_corruption'].values()]))
    out['relative_mce'] = float(np.mean([r['relative_ce'] for r in out['per_corruption'].values()]))
  return out


# ----------------------------------------------------------------------------------- datasets
def _pad_and_batch(ds, total: int, batch_size: int, image_size: int):
  pc = jax.process_count()
  num_batches = math.ceil(math.ceil(total / pc) / batch_size)
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros([image_size, image_size, 3], tf.float32), 'label': tf.constant(0, tf.int64),
      'mask': tf.constant(0.0)}).repeat()
  ds = ds.concatenate(padding).take(num_batches * batch_size).batch(batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def corrupted_eval_dataset(data_config, *, corruption: str, severity: int, seed: int,
                           per_process_batch_size: int, split: Optional[str] = None,
                           max_examples: Optional[int] = None) -> tf.data.Dataset:
  """The eval split with `corruption` applied on the fly: eval crop + resize -> uint8 -> corrupt ->
  normalise (ImageNet-C corrupts the 224 center crop). Same padded/masked batches as eval_dataset."""
  split = split or data_config.eval_split
  if max_examples:
    split = f'{split}[:{int(max_examples)}]'
  builder = input_pipeline._builder(data_config)  # pylint: disable=protected-access
  total = builder.info.splits[split].num_examples
  shard = tfds.split_for_jax_process(split)
  size = data_config.image_size
  offset = jax.process_index() * 1_000_000_000

  def prepare(index, ex):
    image = preprocessing.decode_and_crop(ex['image'], lambda s: preprocessing.center_crop_window(
        s[0], s[1], size, data_config.crop_fraction))
    image = tf.cast(tf.round(preprocessing.resize(image, size, data_config.resize_method)), tf.uint8)
    image = corruptions.corrupt(image, corruption, severity,
                                corruptions.corruption_seed(seed, corruption, severity, index + offset))
    image = preprocessing.normalize(tf.cast(image, tf.float32), data_config.normalization)
    return {'image': tf.ensure_shape(image, [size, size, 3]),
            'label': tf.cast(ex['label'], tf.int64), 'mask': tf.constant(1.0)}

  ds = builder.as_dataset(split=shard, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  ds = ds.enumerate().map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _pad_and_batch(ds, total, per_process_batch_size, size)


def folder_labels(class_dirs: Sequence[str], num_classes: int) -> Dict[str, int]:
  """ImageFolder class sub-directory -> label: WordNet ids map to TFDS ImageNet order, integers to
  themselves (non-ImageNet models)."""
  from advprop_jax.data import imagenet_subsets
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
  ds = tf.data.Dataset.from_tensor_slices((files[pi::pc], np.asarray(ys[pi::pc], np.int64)))
  size = data_config.image_size

  def prepare(path, label):
    image = preprocessing.preprocess_for_eval(
        tf.io.read_file(path), image_size=size, crop_fraction=data_config.crop_fraction,
        normalization=data_config.normalization, resize_method=data_config.resize_method)
    return {'image': image, 'label': label, 'mask': tf.constant(1.0)}

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _pad_and_batch(ds, len(files), per_process_batch_size, size)


# --------------------------------------------------------------------------------- eval steps
def make_subset_eval_step(model, mesh, *, num_classes: int, class_indices):
  """Like train.make_eval_step (clean BN, eval mode) with the logits restricted to `class_indices`
  (ImageNet-A/-R: argmax over their 200 classes). Labels outside the subset count as errors."""
  axes = parallel.DATA_AXES
  passes = objectives.Passes(model)
  subset = jnp.asarray(np.asarray(class_indices, np.int32))
  position = np.full([num_classes], -1, np.int32)
  position[np.asarray(class_indices)] = np.arange(len(class_indices))
  position = jnp.asarray(position)
  k = min(5, len(class_indices))

  def per_device(params, model_state, batch):
    mask = batch['mask'].astype(jnp.float32)
    logits = passes(params, model_state, batch['image'], distribution='clean', train=False)[0]
    logits = jnp.take(logits.astype(jnp.float32), subset, axis=-1)
    labels = jnp.take(position, batch['label'].astype(jnp.int32))
    top = lax.top_k(logits, k)[1]
    sums = dict(count=jnp.sum(mask), top1=jnp.sum((top[:, 0] == labels) * mask),
                top5=jnp.sum(jnp.any(top == labels[:, None], -1) * mask),
                loss=jnp.sum(objectives.cross_entropy(logits, jnp.maximum(labels, 0),
                                                      len(class_indices)) * mask))
    return lax.psum(sums, axes)

  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(axes)), out_specs=P(),
                               check_vma=False))


def run_eval_step(eval_step, params, model_state, dataset, mesh) -> dict:
  """Sums an eval step over a padded/masked dataset -> {'top1', 'top5', 'loss', 'count'}."""
  totals = None
  for batch in input_pipeline.global_batches(dataset, parallel.batch_sharding(mesh)):
    batch = dict(batch, label=batch['label'].astype(jnp.int32))
    sums = eval_step(params, model_state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.tree.map(float, totals)
  count = max(totals['count'], 1.0)
  return dict(top1=totals['top1'] / count, top5=totals['top5'] / count,
              loss=totals['loss'] / count, count=int(totals['count']))


# -------------------------------------------------------------------------------------- plots
def write_plots(results, output) -> list:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  written = []
  pgd = results.get('pgd', {})
  if pgd.get('status') == 'ok':
    eps = [float(e) for e in pgd['by_epsilon_pixels']]
    acc = [100 * r['top1'] for r in pgd['by_epsilon_pixels'].values()]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(eps, acc, 'o-')
    ax.set(xlabel='PGD epsilon (pixels)', ylabel='top-1 (%)', title='White-box PGD')
    ax.grid(True)
    fig.savefig(os.path.join(output, 'pgd_accuracy.png'), dpi=100, bbox_inches='tight')
    plt.close(fig)
    written.append('pgd_accuracy.png')
  cor = results.get('corruptions', {})
  if cor.get('status') == 'ok':
    fig, ax = plt.subplots(figsize=(7, 4))
    for c, by_s in cor['by_type_and_severity'].items():
      ax.plot([int(s) for s in by_s], [100 * (1 - r['top1']) for r in by_s.values()], 'o-', label=c)
    ax.axhline(100 * cor['clean_error'], color='k', ls='--', label='clean')
    ax.set(xlabel='severity', ylabel='top-1 error (%)', title='Error per corruption and severity')
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True)
    fig.savefig(os.path.join(output, 'corruption_error.png'), dpi=100, bbox_inches='tight')
    plt.close(fig)
    written.append('corruption_error.png')
  return written
