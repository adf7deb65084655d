"""Train-preprocessing throughput, ours next to the TF reference's, on synthetic ImageNet-sized JPEGs.

  python -m benchmarks.input_pipeline --num_images=64 --threads=1 --seconds=10 --rounds=5 \
      --augment=none,autoaugment

Times, per augmentation setting and in alternating order each round, the per-image work of
train_dataset (input_pipeline.train_example_fn: fused JPEG decode + Inception crop, TF1 bicubic resize,
flip, AutoAugment v0 on uint8) against the reference's preprocess_image(is_training=True) re-written as
a measured peer in benchmarks/reference_preprocessing.py. Both yield pixels and leave normalisation to
the accelerator (the reference in its model_fn, ours in input_pipeline.global_batches); ours also
leaves the flip to it when no augmentation follows, and after AutoAugment stays uint8 where the
reference casts to float32 on the host. All run in tf.data with `threads` map threads and
private thread pools, batch 32; record I/O is left out. Reported: images/s of wall time and images per CPU-second of this process
(time.process_time, all threads: less sensitive to other jobs on a shared machine), medians over rounds,
and the median of the per-round ratios (a round's runs are back to back).

Before timing it checks that the outputs are identical (pixel for pixel) where the semantics are: eval
preprocessing on every image; train preprocessing without augmentation with the reference driven by our
random draws; each of policy v0's (op, level, sign) on train crops. Prints one JSON line per setting, last.
"""
import argparse
import json
import os
import statistics
import time

import numpy as np
import tensorflow as tf

from advprop_jax import config as config_lib
from advprop_jax.data import autoaugment, input_pipeline, preprocessing
from benchmarks import reference_preprocessing as reference


def synthetic_jpegs(num_images, height=375, width=500, seed=0):
  """Smooth content + noise, so they compress and decode like photographs rather than pure noise."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num_images):
    coarse = rng.uniform(0, 255, (height // 25, width // 25, 3)).astype(np.float32)
    smooth = tf.image.resize(coarse[None], [height, width], method='bicubic')[0].numpy()
    pixels = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
    out.append(tf.io.encode_jpeg(pixels, quality=90).numpy())
  return out


_KEY = tf.constant([0, 0], tf.int64)


def _seed(index):  # as train_example_fn: stateless_fold_in(key, index)
  return tf.random.experimental.stateless_fold_in(_KEY, tf.cast(index, tf.int64))


def ours_fn(image_size, augment):
  """train_dataset's per-image function, as it reads TFDS ImageNet (declared JPEG)."""
  cfg = config_lib.data_config()
  cfg.update(image_size=image_size, augment=augment)
  prepare = input_pipeline.train_example_fn(cfg, _KEY, all_jpeg=True)
  return lambda index, image: prepare(index, {'image': image, 'label': 0, 'tfds_id': ''})


def reference_fn(image_size, augment):
  """The reference's dataset_parser minus record parsing: (preprocessed image, int32 label)."""
  return lambda index, image: {
      'image': reference.preprocess_train(image, image_size, augment != 'none'),
      'label': tf.constant(0, tf.int32)}


def build(jpegs, fn, threads, batch_size, first_index=0):
  # Ours draws its crops from the element number: each round starts elsewhere (`first_index`), so
  # that ours, like the reference's stateful draws, sees fresh crop sizes each round.
  ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat().enumerate(start=first_index)
  ds = ds.map(fn, num_parallel_calls=threads, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(2)
  opts = input_pipeline._options()  # the options train_dataset uses  # pylint: disable=protected-access
  opts.threading.private_threadpool_size = threads
  return ds.with_options(opts)


def measure(ds, seconds, batch_size):
  """(images/s wall, images per CPU-second of this process)."""
  it = iter(ds)
  for _ in range(3):  # warm-up: tracing, thread start, prefetch fill
    next(it)
  n, start, cpu = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - start < seconds:
    next(it)
    n += batch_size
  return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


# --------------------------------------------------------------------------------- identity
class _OurDraws(reference.Draws):
  """The reference's random ops replaced by the stateless draws our pipeline makes for `index`."""

  def __init__(self, index):
    self.crop_seed, self.flip_seed, _ = tf.unstack(
        tf.random.experimental.stateless_split(_seed(index), 3))

  def box(self, shape, **kwargs):
    return tf.image.stateless_sample_distorted_bounding_box(shape, seed=self.crop_seed, **kwargs)

  def flip(self, image):
    return tf.image.stateless_random_flip_left_right(image, self.flip_seed)


def check_identical(jpegs, image_size):
  """Raises AssertionError unless ours == the reference where the semantics are the same."""
  crops = []
  for i, jpeg in enumerate(jpegs):
    jpeg = tf.constant(jpeg)
    ours = preprocessing.preprocess_for_eval(jpeg, image_size=image_size)
    ref = reference.preprocess_eval(jpeg, image_size)
    np.testing.assert_array_equal(ours.numpy(), ref.numpy(), err_msg=f'eval, image {i}')
    ours = ours_fn(image_size, 'none')(tf.constant(i, tf.int64), jpeg)  # the flip: on the device
    ours = ours['image'].numpy()[:, ::-1] if ours['flip'] else ours['image'].numpy()
    ref = reference.preprocess_train(jpeg, image_size, draws=_OurDraws(tf.constant(i, tf.int64)))
    np.testing.assert_array_equal(ours, ref.numpy(), err_msg=f'train, image {i}')
    crops.append(tf.cast(tf.clip_by_value(ref, 0.0, 255.0), tf.uint8))
  ops = 0
  for sub in autoaugment.POLICY_V0:
    for name, _, level in sub:
      args = autoaugment.level_to_arg(name, level, autoaugment.AUTOAUGMENT_HPARAMS)
      geometric = name in reference._GEOMETRIC  # pylint: disable=protected-access
      for sign in (1.0, -1.0) if geometric else (1.0,):
        signed = (sign * args[0],) if geometric else args
        # In a graph, as tf.data runs the reference (its Solarize(256) relies on graph conversion).
        ref_op = tf.function(lambda im, name=name, signed=signed, geometric=geometric:
                             reference.OPS[name](im, *signed, *([reference.REPLACE] if geometric
                                                                else [])))
        for crop in crops[:4]:
          ours = autoaugment.NAME_TO_FUNC[name](crop, *signed)  # default: reference semantics
          np.testing.assert_array_equal(ours.numpy(), ref_op(crop).numpy(),
                                        err_msg=f'{name} level {level} sign {sign}')
          ops += 1
  return {'eval_images': len(jpegs), 'train_images': len(jpegs), 'autoaugment_op_cases': ops}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num_images', type=int, default=64, help='distinct synthetic JPEGs')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--augment', default='none,autoaugment', help='comma-separated settings')
  parser.add_argument('--threads', type=int, default=1, help='tf.data map threads (and pool size)')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--seconds', type=float, default=10.0, help='timed window per measurement')
  parser.add_argument('--rounds', type=int, default=3, help='alternating rounds; medians reported')
  parser.add_argument('--skip_check', action='store_true', help='skip the identical-output check')
  args = parser.parse_args()

  t0 = time.perf_counter()
  jpegs = synthetic_jpegs(args.num_images)
  print(f'generated {len(jpegs)} JPEGs (mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB) '
        f'in {time.perf_counter() - t0:.1f}s', flush=True)
  if not args.skip_check:
    print('identical outputs:', check_identical(jpegs, args.image_size), flush=True)
  impls = {'reference': reference_fn, 'ours': ours_fn}
  results = []
  for augment in args.augment.split(','):
    runs = {name: [] for name in impls}
    for r in range(args.rounds):
      order = list(impls) if r % 2 == 0 else list(reversed(impls))
      for name in order:
        ds = build(jpegs, impls[name](args.image_size, augment), args.threads, args.batch_size,
                   first_index=r * 10**6)
        wall, per_cpu = measure(ds, args.seconds, args.batch_size)
        runs[name].append((wall, per_cpu))
        print(f'{augment:12s} round {r} {name:20s} {wall:7.1f} img/s  {per_cpu:7.1f} img/CPU-s  '
              f'(load {os.getloadavg()[0]:.2f})', flush=True)
    row = {'benchmark': 'input_pipeline_train_vs_reference', 'augment': augment,
           'image_size': args.image_size, 'threads': args.threads, 'num_images': args.num_images,
           'rounds': args.rounds}
    for name, values in runs.items():
      row[f'{name}_images_per_s'] = round(statistics.median(v[0] for v in values), 1)
      row[f'{name}_images_per_cpu_s'] = round(statistics.median(v[1] for v in values), 1)
    row['ours_over_reference_wall'] = round(row['ours_images_per_s'] / row['reference_images_per_s'], 3)
    row['ours_over_reference_cpu'] = round(row['ours_images_per_cpu_s'] /
                                           row['reference_images_per_cpu_s'], 3)
    # Paired per round (a round's runs are back to back): robust to slow drifts of the load.
    row['ours_over_reference_cpu_paired'] = round(statistics.median(
        o[1] / r[1] for o, r in zip(runs['ours'], runs['reference'])), 3)
    results.append(row)
  for row in results:
    print(json.dumps(row))


if __name__ == '__main__':
  main()
