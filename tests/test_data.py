"""Input pipeline: mocked ImageNet (tfds.testing.mock_data), the offline digits set, bad inputs."""
import contextlib
import math

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from advprop_jax import config as config_lib
from advprop_jax.data import choices
from advprop_jax.data import input_pipeline as ip
from advprop_jax.data import preprocessing

N_TRAIN, N_VAL = 23, 11  # odd sizes: uneven process shards, partial batches
S = 32  # tiny model resolution keeps the suite fast


def _fake_images(split, n):
  """Deterministic JPEGs of varied sizes; label = index, so labels identify examples."""
  rng = np.random.default_rng(0 if split == 'train' else 1)
  out = []
  for _ in range(n):
    h, w = rng.integers(24, 48, size=2)
    out.append(tf.io.encode_jpeg(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).numpy())
  return out


@pytest.fixture(scope='module')
def fake_imagenet(tmp_path_factory):
  """imagenet2012 metadata with tiny splits + a mock reader that honours sub-splits."""
  data_dir = tmp_path_factory.mktemp('fake_imagenet')
  builder = tfds.builder('imagenet2012', data_dir=data_dir)
  template = tfds.core.ShardedFileTemplate(
      data_dir=builder.data_path, template='{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}',
      dataset_name='imagenet2012', split='train', filetype_suffix='tfrecord')
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=name, shard_lengths=[n], num_bytes=0,
                          filename_template=template.replace(split=name))
      for name, n in (('train', N_TRAIN), ('validation', N_VAL))]))
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)
  images = {'train': _fake_images('train', N_TRAIN), 'validation': _fake_images('val', N_VAL)}
  corrupt = set()

  def as_dataset_fn(self, split, decoders=None, read_config=None, **kwargs):
    assert isinstance(decoders['image'], tfds.decode.SkipDecoding)
    rows = []
    for fi in self.info.splits[split].file_instructions:
      name = 'train' if '-train.' in fi.filename else 'validation'
      take = fi.examples_in_shard - fi.skip if fi.take == -1 else fi.take
      for i in range(fi.skip, fi.skip + take):
        data = b'definitely not an image' if (name, i) in corrupt else images[name][i]
        rows.append((data, i, f'imagenet2012-{name}.tfrecord-00000-of-00001__{i}'))
    data, labels, ids = zip(*rows)
    return tf.data.Dataset.from_tensor_slices(
        {'image': list(data), 'label': np.array(labels, np.int64), 'tfds_id': list(ids)})

  @contextlib.contextmanager
  def mocked(corrupt_records=()):
    corrupt.clear()
    corrupt.update(corrupt_records)
    with tfds.testing.mock_data(data_dir=str(data_dir), policy=tfds.testing.MockPolicy.USE_FILES,
                                as_dataset_fn=as_dataset_fn):
      yield
  return mocked


def imagenet_config(**overrides):
  c = config_lib.data_config()
  c.image_size = S
  c.update(overrides)
  return c


def take(ds, n):
  return list(ds.take(n).as_numpy_iterator())


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['label'], y['label'])
    np.testing.assert_array_equal(x['image'], y['image'])


def test_train_shapes_range_determinism(fake_imagenet):
  with fake_imagenet():
    c = imagenet_config()  # inception crop + flip + AutoAugment v0
    batches = take(ip.train_dataset(c, per_process_batch_size=4, seed=0), 3)
    again = take(ip.train_dataset(c, per_process_batch_size=4, seed=0), 3)
    other = take(ip.train_dataset(c, per_process_batch_size=4, seed=1), 3)
    assert ip.num_examples(c, 'train') == N_TRAIN and ip.num_classes(c) == 1000
  for b in batches:  # pixels; AutoAugment's integer outputs stay uint8 until the device
    assert b['image'].shape == (4, S, S, 3) and b['image'].dtype == np.uint8
    assert b['label'].shape == (4,) and b['label'].dtype == np.int32
    assert b['image'].min() < 64 and b['image'].max() > 192  # really spans the range
  assert_batches_equal(batches, again)
  assert not all(np.array_equal(x['image'], y['image']) for x, y in zip(batches, other))


def test_resume_equals_uninterrupted_across_epochs(fake_imagenet):
  # Process 1 of 2 holds 11 examples; batches of 4 cross epoch boundaries at elements 11 and 22.
  kwargs = dict(per_process_batch_size=4, seed=3, process_index=1, process_count=2)
  with fake_imagenet():
    c = imagenet_config()
    full = take(ip.train_dataset(c, **kwargs), 6)
    for k in (2, 3):  # 2: starts in epoch 0 and crosses; 3: skips a whole epoch first
      assert_batches_equal(take(ip.train_dataset(c, start_step=k, **kwargs), 6 - k), full[k:])
  labels = np.concatenate([b['label'] for b in full])
  assert sorted(labels[:11]) == sorted(labels[11:22])  # each epoch is a permutation of the shard
  assert not np.array_equal(labels[:11], labels[11:22])  # ... reshuffled per epoch


@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_shards_and_exact_eval(fake_imagenet, process_count):
  c = imagenet_config(augment='none')
  eval_labels, train_labels, num_batches = [], [], []
  with fake_imagenet():
    for p in range(process_count):
      batches = list(ip.eval_dataset(c, per_process_batch_size=3, process_index=p,
                                     process_count=process_count).as_numpy_iterator())
      num_batches.append(len(batches))
      for b in batches:
        assert b['image'].shape == (3, S, S, 3) and b['mask'].shape == (3,)
        eval_labels.extend(b['label'][b['mask'] > 0].tolist())
      n_p = ip.num_examples(c, tfds.split_for_jax_process(
          'train', process_index=p, process_count=process_count))
      train = take(ip.train_dataset(c, per_process_batch_size=1, seed=0, process_index=p,
                                    process_count=process_count), n_p)
      train_labels.append({int(b['label'][0]) for b in train})
  assert len(set(num_batches)) == 1  # SPMD: every process steps the same number of times
  assert num_batches[0] == math.ceil(math.ceil(N_VAL / process_count) / 3)
  assert sorted(eval_labels) == list(range(N_VAL))  # masks sum to N, each example once
  assert sum(len(s) for s in train_labels) == N_TRAIN  # disjoint ...
  assert set().union(*train_labels) == set(range(N_TRAIN))  # ... and covering


def test_eval_is_deterministic_unclipped_and_equals_reference_ops(fake_imagenet):
  with fake_imagenet():
    c = imagenet_config()
    a = list(ip.eval_dataset(c, per_process_batch_size=4).as_numpy_iterator())
    b = list(ip.eval_dataset(c, per_process_batch_size=4).as_numpy_iterator())
  assert_batches_equal(a, b)
  assert len(a) == 3 and sum(x['mask'].sum() for x in a) == N_VAL
  # The reference's eval, spelled with TF's own ops: center crop int(S/(S+32) * min(h, w)),
  # tf.compat.v1.image.resize_bicubic, no clipping (noise images overshoot [0, 255]).
  images = np.concatenate([x['image'] for x in a])[:N_VAL]
  labels = np.concatenate([x['label'] for x in a])[:N_VAL]
  for image, label in zip(images, labels):
    jpeg = _fake_images('val', N_VAL)[label]
    h, w = tf.image.extract_jpeg_shape(jpeg).numpy()[:2]
    side = int(np.float32(S / (S + 32)) * np.float32(min(h, w)))
    # decode_and_crop_jpeg, as the reference: its edge pixels differ from decoding all, then cropping.
    crop = tf.image.decode_and_crop_jpeg(jpeg, [(h - side + 1) // 2, (w - side + 1) // 2, side, side],
                                         channels=3)
    expected = tf.compat.v1.image.resize_bicubic(crop[None], [S, S])[0].numpy()
    np.testing.assert_array_equal(image, expected)
  assert images.min() < 0.0 and images.max() > 255.0  # bicubic overshoot reaches the model


def test_bad_preprocessing_choices_are_refused_by_name():
  for field, value in (('resize_method', 'bicubic'), ('eval_preprocessing', 'pytorch'),
                       ('augment_semantics', 'fixed'), ('augment', 'mixup')):
    c = imagenet_config(**{field: value})
    with pytest.raises(ValueError, match=f"config.data.{field}='{value}'.*choose one of"):
      ip.eval_dataset(c, per_process_batch_size=2)
    config = config_lib.base_config()
    config.data.update({field: value})
    with pytest.raises(config_lib.ConfigError, match=f"config.data.{field}='{value}'"):
      config_lib.validate(config, 8)  # before anything is built or written
  assert choices.CHOICES['resize_method'] == ('tf1_bicubic', 'tf2_bicubic')
  assert choices.CHOICES['eval_preprocessing'] == ('tf_reference', 'timm')
  assert choices.CHOICES['augment_semantics'] == ('tf_reference', 'pil')


def test_undecodable_record_named_or_skipped(fake_imagenet):
  with fake_imagenet(corrupt_records={('validation', 5)}):
    c = imagenet_config()
    with pytest.raises(tf.errors.InvalidArgumentError, match='validation.tfrecord-00000-of-00001__5'):
      list(ip.eval_dataset(c, per_process_batch_size=4).as_numpy_iterator())
    c.skip_decode_errors = True
    batches = list(ip.eval_dataset(c, per_process_batch_size=4).as_numpy_iterator())
  assert len(batches) == 3 and sum(b['mask'].sum() for b in batches) == N_VAL - 1


@pytest.fixture(scope='module')
def digits_config(tmp_path_factory):
  c = config_lib.data_config()
  c.update(dataset='sklearn_digits', data_dir=str(tmp_path_factory.mktemp('tfds')), image_size=32,
           eval_split='test', train_crop='resize', augment='none', shuffle_buffer=1024)
  return c


def test_digits_builds_offline_through_the_pipeline(digits_config):
  c = digits_config
  assert ip.num_examples(c, 'train') == 1437 and ip.num_examples(c, 'test') == 360
  assert ip.num_classes(c) == 10
  batch = take(ip.train_dataset(c, per_process_batch_size=16, seed=0), 1)[0]
  assert batch['image'].shape == (16, 32, 32, 3) and batch['image'].dtype == np.float32
  evals = list(ip.eval_dataset(c, per_process_batch_size=64).as_numpy_iterator())
  labels = np.concatenate([b['label'][b['mask'] > 0] for b in evals])
  assert len(evals) == 6 and len(labels) == 360
  assert np.bincount(labels, minlength=10).min() >= 35  # stratified: 36 +- 1 per class
  # All train options work on 32px images, and caching decoded images changes nothing.
  c2 = c.copy_and_resolve_references()
  c2.update(train_crop='inception', augment='randaugment', randaugment_magnitude=15)
  assert take(ip.train_dataset(c2, per_process_batch_size=4, seed=0), 1)[0]['image'].shape == (
      4, 32, 32, 3)
  c2.update(augment='none', cache=True)
  cached = take(ip.train_dataset(c2, per_process_batch_size=4, seed=0, start_step=400), 2)
  c2.cache = False
  assert_batches_equal(cached, take(ip.train_dataset(c2, per_process_batch_size=4, seed=0,
                                                     start_step=400), 2))


def test_demo_inputs_are_the_stored_pixels(digits_config):
  # configs/demo.py: 32 px digits, crop_fraction 1.0, train_crop 'resize', no flip or augmentation.
  # TF1 bicubic 32 -> 32 samples exactly on the pixels (weights 0, 1, 0, 0), so the demo's inputs
  # are its PNG pixels (the model's: x 2/255 - 1, on the device), as with TF2's kernel before #17.
  c = digits_config.copy_and_resolve_references()
  c.update(crop_fraction=1.0, random_flip=False)
  builder = tfds.builder('sklearn_digits', data_dir=c.data_dir)
  raw = np.stack([ex['image'] for ex in builder.as_dataset(
      split='test', shuffle_files=False).take(8).as_numpy_iterator()]).astype(np.float32)
  expected = raw
  evals = take(ip.eval_dataset(c, per_process_batch_size=8), 1)[0]
  np.testing.assert_array_equal(evals['image'], expected)
  train = preprocessing.preprocess_for_train(
      tf.constant(raw[0].astype(np.uint8)), tf.constant([0, 0], tf.int64), image_size=32,
      train_crop=c.train_crop, random_flip=c.random_flip, augment=c.augment).numpy()
  np.testing.assert_array_equal(train, expected[0])


def test_global_batches_sharded_over_8_devices(digits_config):
  devices = jax.devices()
  assert len(devices) == 8
  sharding = NamedSharding(Mesh(np.array(devices), ('data',)), P('data'))
  ds = ip.eval_dataset(digits_config, per_process_batch_size=16)
  local = take(ds, 3)
  glob = list(ip.global_batches(ds.take(3), sharding, 'minus_one_one', prefetch=2))
  assert len(glob) == 3
  for g, l in zip(glob, local):
    assert g['image'].shape == (16, 32, 32, 3) and g['mask'].shape == (16,)
    assert g['image'].sharding == sharding and len(g['image'].addressable_shards) == 8
    assert g['image'].addressable_shards[0].data.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(np.asarray(g['label']), l['label'])
    # Normalised on the device: pixels x 2/255 - 1 (to float32 rounding).
    np.testing.assert_allclose(np.asarray(g['image']), l['image'] * np.float32(2 / 255) - 1,
                               rtol=0, atol=2e-7)
  imagenet = next(ip.global_batches(ds.take(1), sharding, 'imagenet'))['image']
  mean, std = (np.float32(0.485 * 255), np.float32(0.229 * 255))
  np.testing.assert_allclose(np.asarray(imagenet)[..., 0], (local[0]['image'][..., 0] - mean) / std,
                             rtol=1e-6, atol=1e-6)


def test_bad_inputs_give_clear_errors(fake_imagenet, tmp_path, digits_config):
  c = config_lib.data_config()
  c.update(dataset='no_such_dataset_xyz', data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="Unknown dataset 'no_such_dataset_xyz'"):
    ip.num_classes(c)
  c.dataset = 'imagenet2012'  # real builder, empty data_dir
  with pytest.raises(FileNotFoundError, match=f"'imagenet2012'.*{tmp_path}.*tfds build"):
    ip.train_dataset(c, per_process_batch_size=2, seed=0)
  c.dataset = 'iris'  # exists, but not images
  with pytest.raises(ValueError, match="'iris' is not an image-classification dataset"):
    ip.num_classes(c)
  with pytest.raises(ValueError, match="Unknown split 'nosuch' of dataset 'sklearn_digits'"):
    ip.eval_dataset(digits_config, per_process_batch_size=2, split='nosuch')
  with fake_imagenet():
    with pytest.raises(ValueError, match="Unknown split 'test'.*validation"):
      ip.num_examples(imagenet_config(), 'test')
    with pytest.raises(ValueError, match='process_index'):
      ip.eval_dataset(imagenet_config(), per_process_batch_size=2, process_index=2,
                      process_count=2)


@pytest.mark.slow  # ~30 s: traces one graph per (op, level, sign) of policy v0
def test_reference_peer_and_ours_identical_with_the_same_draws():
  # benchmarks/reference_preprocessing.py re-expresses the TF reference's preprocessing for timing;
  # with our random draws its eval, train and AutoAugment-op outputs must equal ours bit for bit.
  from benchmarks import input_pipeline as bench
  counts = bench.check_identical(bench.synthetic_jpegs(3, height=90, width=120), image_size=40)
  assert counts == {'eval_images': 3, 'train_images': 3, 'autoaugment_op_cases': 192}
