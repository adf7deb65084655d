"""Train-preprocessing throughput on synthetic ImageNet-sized JPEGs (CPU; images/s per host core).

  python -m benchmarks.input_pipeline --num_images=256 --image_size=224 --augment=autoaugment

Measures exactly the per-image work of train_dataset: fused JPEG decode+Inception crop, bicubic
resize, flip, AutoAugment v0 (or RandAugment / none) on uint8, normalisation, batching. Reading
records from disk is left out (it is I/O, not host CPU). The JPEGs are 500x375 (ImageNet's typical
size) with smooth content + noise, so they compress and decode like photographs rather than like
pure noise. Prints one JSON line last.
"""
import argparse
import json
import os
import time

import numpy as np
import tensorflow as tf

from advprop_jax.data import input_pipeline, preprocessing


def synthetic_jpegs(num_images, height=375, width=500, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num_images):
    coarse = rng.uniform(0, 255, (height // 25, width // 25, 3)).astype(np.float32)
    smooth = tf.image.resize(coarse[None], [height, width], method='bicubic')[0].numpy()
    pixels = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
    out.append(tf.io.encode_jpeg(pixels, quality=90).numpy())
  return out


def build(jpegs, args, threads):
  cfg = input_pipeline.default_data_config()

  def prepare(index, image):
    seed = tf.random.experimental.stateless_fold_in(tf.constant([0, 0], tf.int64), index)
    return preprocessing.preprocess_for_train(
        image, seed, image_size=args.image_size, train_crop=cfg.train_crop,
        random_flip=cfg.random_flip, augment=args.augment, normalization=cfg.normalization)

  ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat().enumerate()
  ds = ds.map(prepare, num_parallel_calls=threads, deterministic=True)
  ds = ds.batch(args.batch_size, drop_remainder=True).prefetch(2)
  opts = input_pipeline._options()  # the options train_dataset uses  # pylint: disable=protected-access
  opts.threading.private_threadpool_size = threads
  return ds.with_options(opts)


def measure(ds, seconds, batch_size):
  it = iter(ds)
  for _ in range(3):  # warm-up: tracing, thread start, prefetch fill
    next(it)
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(it)
    n += batch_size
  return n / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num_images', type=int, default=256, help='distinct synthetic JPEGs')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--augment', default='autoaugment',
                      choices=['autoaugment', 'randaugment', 'none'])
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--seconds', type=float, default=20.0, help='timed window per measurement')
  args = parser.parse_args()

  cores = os.cpu_count() or 1
  t0 = time.perf_counter()
  jpegs = synthetic_jpegs(args.num_images)
  print(f'generated {len(jpegs)} JPEGs (mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB) '
        f'in {time.perf_counter() - t0:.1f}s', flush=True)
  one_thread = measure(build(jpegs, args, 1), args.seconds, args.batch_size)
  print(f'1 thread: {one_thread:.1f} images/s', flush=True)
  all_threads = measure(build(jpegs, args, cores), args.seconds, args.batch_size)
  print(f'{cores} threads: {all_threads:.1f} images/s', flush=True)
  print(json.dumps({
      'benchmark': 'input_pipeline_train', 'image_size': args.image_size, 'augment': args.augment,
      'num_images': args.num_images, 'host_cores': cores,
      'images_per_s_1_thread': round(one_thread, 1),
      'images_per_s_all_cores': round(all_threads, 1),
      'images_per_s_per_core': round(all_threads / cores, 1)}))


if __name__ == '__main__':
  main()
