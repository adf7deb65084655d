"""TFDS input pipelines: per-process sharded, deterministic, exactly resumable train; exact eval.

Train order, per process: its shard (tfds.split_for_jax_process) is read with the image left encoded
(SkipDecoding); epoch e is the shard shuffled with a seed derived from (seed, process, e) and numbered
e*n .. e*n+n-1; epochs are concatenated (flat_map), so the element stream is a pure function of the
seed. Resuming at batch k = skipping k*batch elements of that stream: whole epochs are skipped by
starting the epoch counter later (free), the rest with .skip() on still-encoded records (no decoding).
Augmentation randomness is keyed on (seed, process, element number) with stateless ops, so an element
is augmented identically whether or not the run was interrupted.

Eval: every process reads its even share, appends fully-masked padding and yields the same number of
batches (ceil(ceil(N / processes) / batch)), so SPMD steps line up and each example counts once.

Both yield pixels (0..255); global_batches normalises them on the device (data/normalization.py).
"""
import collections
import fcntl
import logging
import math
import os
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from advprop_jax.data import choices
from advprop_jax.data import digits  # noqa: F401  (registers the sklearn_digits TFDS builder)
from advprop_jax.data import image_folder
from advprop_jax.data import image_folder_tfds
from advprop_jax.data import minival
from advprop_jax.data import normalization as normalization_lib
from advprop_jax.data import preprocessing

DIGITS = 'sklearn_digits'
# Decoded images are cached in host RAM only when a process' shard is at most this big: caching
# ImageNet exhausts host RAM (a known pain point), a 50k CIFAR-sized set does not.
MAX_CACHED_EXAMPLES = 100_000


def check_choices(data_config) -> None:
  """Raises ValueError naming the first config.data field whose value is not allowed (the pipelines check
  before building anything; config.validate has already checked a config the trainer runs)."""
  for field, allowed in choices.CHOICES.items():
    if data_config[field] not in allowed:
      raise ValueError(f'config.data.{field}={data_config[field]!r} is not allowed; choose one of '
                       f'{allowed}')


# ------------------------------------------------------------------------------ dataset lookup
def prepared_builder(config) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder for config.dataset, or a clear error saying what is missing."""
  name = config.dataset
  if name == image_folder.NAME:  # a user's tree: checked, then prepared once into a cache
    return image_folder_tfds.prepared_builder(config)
  try:
    builder = tfds.builder(name, data_dir=config.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'Unknown dataset {name!r}: it is neither a registered TFDS dataset nor '
                     f'{DIGITS!r} nor {image_folder.NAME!r} (with data_dir=ROOT).') from e
  features = builder.info.features
  keys = set(features.keys()) if hasattr(features, 'keys') else set()
  if not ({'image', 'label'} <= keys and isinstance(features['image'], tfds.features.Image)
          and isinstance(features['label'], tfds.features.ClassLabel)):
    raise ValueError(f'Dataset {name!r} is not an image-classification dataset: it needs an '
                     f"'image' (Image) and a 'label' (ClassLabel) feature, it has {sorted(keys)}.")
  if not builder.is_prepared():
    if name == DIGITS:  # ships inside scikit-learn: build it in place, nothing is downloaded
      builder = _prepare_once(builder, config.data_dir)
    else:
      raise FileNotFoundError(
          f'Dataset {name!r} (version {builder.version}) is not prepared in '
          f'data_dir={builder.data_dir_root!r}: looked for {os.fspath(builder.data_path)!r}. '
          f'Prepare it first, e.g. `tfds build {name} --data_dir={builder.data_dir_root}` (datasets '
          'with a manual download, like imagenet2012, need the archives in '
          '<data_dir>/downloads/manual first), or set config.data.data_dir to where it is.')
  return builder


def _prepare_once(builder, data_dir):
  """Builds an offline dataset in place. Processes of a multi-process run on one machine take turns on
  a lock file next to it, so one prepares it and the others then find it prepared (TFDS refuses two
  concurrent builds of one dataset)."""
  root = os.fspath(builder.data_dir_root)
  if '://' in root:
    builder.download_and_prepare()
    return builder
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, f'.{builder.name}.prepare.lock'), 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not builder.is_prepared():
      tfds.disable_progress_bar()  # a few seconds; the bars would fill the log
      builder.download_and_prepare()
      return builder
  return tfds.builder(builder.name, data_dir=data_dir)  # another process prepared it meanwhile


def _split_info(builder, split):
  try:
    return builder.info.splits[split]
  except (KeyError, ValueError) as e:
    raise ValueError(f'Unknown split {split!r} of dataset {builder.name!r} in '
                     f'{builder.data_dir_root!r}; available: {sorted(builder.info.splits)}') from e


def num_examples(data_config, split: str) -> int:
  return _split_info(prepared_builder(data_config), split).num_examples


def num_train_examples(data_config) -> int:
  """What training reads of the train split (without the minival); ValueError for a bad minival."""
  builder = prepared_builder(data_config)
  _split_info(builder, data_config.train_split)
  minival.check(data_config, builder)
  return _split_info(builder, minival.train_split(data_config, builder)).num_examples


def num_classes(data_config) -> int:
  return prepared_builder(data_config).info.features['label'].num_classes


def class_names(data_config):
  """The class names a run records (workdir, exports, predict): an image folder's sorted class
  folders; None for other datasets (TFDS ImageNet's names are WordNet ids; predict has readable
  ones)."""
  if data_config.dataset != image_folder.NAME:
    return None
  return list(prepared_builder(data_config).info.features['label'].names)


def _process(process_index, process_count):
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if not 0 <= pi < pc:
    raise ValueError(f'process_index={pi} is not in [0, process_count={pc})')
  return pi, pc


def keep_tf_off_accelerators() -> None:
  """TF is only the input pipeline here: it must not claim the GPU memory JAX needs."""
  tf.config.set_visible_devices([], 'GPU')


# ------------------------------------------------------------------------------------ reading
def _options() -> tf.data.Options:
  """Options for a TPU host: own thread pool, bounded autotune RAM, deterministic order."""
  opts = tf.data.Options()
  opts.deterministic = True  # resume and seeds rely on a fixed order
  opts.threading.private_threadpool_size = max(2, os.cpu_count() or 2)  # not the JAX host's pool
  opts.threading.max_intra_op_parallelism = 1  # parallelism comes from map, not inside ops
  try:  # a quarter of physical RAM for autotuned buffers
    opts.autotune.ram_budget = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 4
  except (ValueError, OSError, AttributeError):
    pass
  return opts


def _records(builder, split, config, num_records):
  """TFDS records {'image': bytes (or decoded uint8 when cached), 'label', 'tfds_id'}. Bytes that are no
  image fail naming the id when decoded (preprocessing.decode_and_crop). No map of its own: a tf.data
  stage costs microseconds per element, as much as the scalar work of a crop window."""
  read_config = tfds.ReadConfig(add_tfds_id=True, skip_prefetch=True, try_autocache=False)
  ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config,
                          decoders={'image': tfds.decode.SkipDecoding()})
  if _use_cache(config, num_records):
    ds = ds.map(lambda ex: {**ex, 'image': preprocessing.decode_full(ex['image'], ex['tfds_id'])},
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.cache()
  return ds


def declares_jpeg(builder) -> bool:
  """Whether the dataset's images are stored as JPEG (TFDS imagenet2012 re-encodes its PNG and CMYK
  files to JPEG when it is prepared); then the pipeline decodes without a per-image format branch."""
  return getattr(builder.info.features['image'], 'encoding_format', None) == 'jpeg'


def _use_cache(config, num_records):
  if not config.cache:
    return False
  if num_records > MAX_CACHED_EXAMPLES:
    logging.warning('data_config.cache ignored: %d examples per process > %d would exhaust host '
                    'RAM.', num_records, MAX_CACHED_EXAMPLES)
    return False
  return True


# -------------------------------------------------------------------------------------- train
def train_dataset(data_config, *, per_process_batch_size: int, seed: int, start_step: int = 0,
                  process_index: int | None = None,
                  process_count: int | None = None) -> tf.data.Dataset:
  """Infinite batches {'image': [b,S,S,3] pixels (uint8 when data.augment is set, else float32),
  'label': int32 [b], and 'flip': bool [b] when the random flip is left to the device (no augmentation,
  see train_example_fn; global_batches applies it)} of this process' shard.

  With start_step=k it yields exactly what a fresh iterator yields from its batch k on (unless
  skip_decode_errors dropped records, which shifts later batches).
  """
  check_choices(data_config)
  pi, pc = _process(process_index, process_count)
  builder = prepared_builder(data_config)
  shard = train_shard(data_config, builder, pi, pc)
  n = builder.info.splits[shard].num_examples
  if n == 0:
    raise ValueError(f'Process {pi} of {pc} gets no examples of {data_config.train_split!r}.')
  records = _records(builder, shard, data_config, n)
  buffer = max(1, min(int(data_config.shuffle_buffer), n))

  process_key = tf.random.experimental.stateless_fold_in(tf.constant([seed, pi], tf.int64), pc)
  shuffle_key = tf.random.experimental.stateless_fold_in(process_key, 0)
  augment_key = tf.random.experimental.stateless_fold_in(process_key, 1)

  def epoch(e):
    # Each epoch is its own shuffle of the (encoded) shard, seeded by the epoch number. (fold_in
    # returns [hash(key), e], so hash it once more to get a scalar seed that depends on e.)
    order_seed = tf.random.stateless_uniform(
        [], seed=tf.random.experimental.stateless_fold_in(shuffle_key, e), minval=None,
        maxval=None, dtype=tf.int64)
    ds = records.shuffle(buffer, seed=order_seed, reshuffle_each_iteration=False)
    return ds.enumerate(start=e * n)

  first = start_step * per_process_batch_size
  start_epoch, offset = divmod(first, n)
  ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch)
  ds = ds.skip(offset)  # before decoding: only encoded records pass through

  prepare = train_example_fn(data_config, augment_key, declares_jpeg(builder))
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if data_config.skip_decode_errors:
    ds = ds.ignore_errors(log_warning=True)  # each skipped record is logged with its error
  ds = ds.batch(per_process_batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def train_shard(data_config, builder, process_index: int, process_count: int):
  """The TFDS split process `process_index` trains on: its even share of the train split without
  the minival (data/minival.py)."""
  split = minival.train_split(data_config, builder)
  _split_info(builder, split)
  return tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count)


def train_example_fn(data_config, augment_key, all_jpeg: bool):
  """(element number, TFDS record) -> {'image': pixels, 'label': int32[, 'flip': bool]}: the per-image
  work of train_dataset (benchmarks/input_pipeline.py times it). Randomness: seed (hash(augment_key),
  element number), i.e. stateless_fold_in(augment_key, number) with the key's hash taken once here.
  Without augmentation the random flip is the last step and is left to the device ('flip')."""
  augment_hash = tf.random.stateless_uniform([], seed=augment_key, minval=None, maxval=None,
                                             dtype=tf.int64)
  defer_flip = bool(data_config.random_flip) and data_config.augment == 'none'

  def prepare(index, ex):
    out = preprocessing.preprocess_for_train(
        ex['image'], tf.stack([augment_hash, index]), image_size=data_config.image_size,
        train_crop=data_config.train_crop, random_flip=data_config.random_flip,
        augment=data_config.augment, randaugment_layers=data_config.randaugment_layers,
        randaugment_magnitude=data_config.randaugment_magnitude,
        resize_method=data_config.resize_method, crop_fraction=data_config.crop_fraction,
        augment_semantics=data_config.augment_semantics, record_id=ex['tfds_id'],
        all_jpeg=all_jpeg, defer_flip=defer_flip)
    label = tf.cast(ex['label'], tf.int32)
    if defer_flip:
      return {'image': out[0], 'label': label, 'flip': out[1]}
    return {'image': out, 'label': label}
  return prepare


# --------------------------------------------------------------------------------------- eval
def eval_dataset(data_config, *, per_process_batch_size: int, split: str | None = None,
                 process_index=None, process_count=None) -> tf.data.Dataset:
  """One pass of {'image', 'label', 'mask' (float32, 0 = padding)} batches; every process yields
  the same number of batches and the masks sum to the split size over all processes."""
  check_choices(data_config)
  split = split or data_config.eval_split
  pi, pc = _process(process_index, process_count)
  builder = prepared_builder(data_config)
  split = minival.resolve(data_config, builder, split)  # minival.SPLIT: the held-out examples
  total = _split_info(builder, split).num_examples
  shard = tfds.split_for_jax_process(split, process_index=pi, process_count=pc)
  n = builder.info.splits[shard].num_examples
  b = per_process_batch_size

  def prepare(ex):
    image = preprocessing.preprocess_for_eval(
        ex['image'], image_size=data_config.image_size, crop_fraction=data_config.crop_fraction,
        resize_method=data_config.resize_method, eval_preprocessing=data_config.eval_preprocessing,
        record_id=ex['tfds_id'], all_jpeg=all_jpeg)
    return {'image': image, 'label': tf.cast(ex['label'], tf.int32), 'mask': tf.constant(1.0)}

  ds = _records(builder, shard, data_config, n)
  all_jpeg = declares_jpeg(builder)
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if data_config.skip_decode_errors:
    ds = ds.ignore_errors(log_warning=True)
  return pad_and_batch(ds, total, b, data_config.image_size, process_count=pc)


def pad_and_batch(ds, total: int, batch_size: int, image_size: int,
                  process_count: int | None = None) -> tf.data.Dataset:
  """This process' share of a `total`-example eval set -> masked batches, padded so that every process
  yields the same number, ceil(ceil(total / processes) / batch) (SPMD steps line up; padding has mask 0).

  take() rather than a computed pad count: stays exact even if decode errors were skipped.
  """
  pc = jax.process_count() if process_count is None else process_count
  num_batches = math.ceil(math.ceil(total / pc) / batch_size)
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros([image_size, image_size, 3], tf.float32), 'label': tf.constant(0, tf.int32),
      'mask': tf.constant(0.0)}).repeat()
  ds = ds.concatenate(padding).take(num_batches * batch_size).batch(batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


# ----------------------------------------------------------------------------------- to device
def global_batches(dataset, sharding: jax.sharding.Sharding, normalization: str,
                   prefetch: int = 2) -> Iterator[dict]:
  """Per-process numpy batches of pixels -> global jax.Arrays of model inputs ('image' normalised on the
  device by `normalization`), keeping `prefetch` batches in flight.

  make_array_from_process_local_data starts the host->device copies asynchronously, so holding a
  few converted batches overlaps the transfer of batch t+1 with step t.
  """
  def to_global(batch):
    batch = jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
    flip = batch.pop('flip', None)  # a train flip left to the device (train_dataset)
    return dict(batch, image=normalization_lib.normalize(batch['image'], normalization, flip))

  queue = collections.deque()
  for batch in dataset.as_numpy_iterator():
    queue.append(to_global(batch))
    if len(queue) > prefetch:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
