"""Adversarial examples as TensorBoard pictures: config.log_images_every_steps = K > 0.

Every K-th step, the first NUM_IMAGES images of the step's batch, their version for each auxiliary
input distribution of the method (methods.base.AuxiliaryInput: AdvProp's PGD images, one per
fine-grained epsilon, Fast AdvProp's one-step images, adv_train's PGD images) and the perturbation
amplified to the full range, under these tags (E: the L-inf radius in pixels):

  train_images/clean                          the images as the model saw them (augmented)
  train_images/<name>_eps<E>px                the adversarial images
  train_images/<name>_eps<E>px_perturbation   grey = unchanged, black / white = -E / +E pixels
  train_images/feature_stage<s>_perturbation  A-FAN perturbs a feature, not pixels: per position
                                              the largest change over the channels, white = the
                                              image's largest

Why a separate function rather than more outputs of the train step: with K = 0 nothing is built or
compiled and the step's program is unchanged; on a logging step a small jitted function re-creates
the versions from the step's batch, with the params after the step, the method's own attack settings
and an rng of the step. The model is not sharded there, so an attack that uses BN batch statistics
uses those of the shown images, not of the device's shard. Every process calls it (the batch is a
global array); only process 0's writer writes.
"""
import functools
import time

import jax
import numpy as np

from advprop_jax import methods
from advprop_jax import parallel
from advprop_jax.data import normalization as normalization_lib

NUM_IMAGES = 4
PREFIX = 'train_images'


def _compute(inputs, params, model_state, batch, rng):
  x, labels = batch['image'][:NUM_IMAGES], batch['label'][:NUM_IMAGES]
  return x, [aux.perturb(params, model_state, x, labels, jax.random.fold_in(rng, i))
             for i, aux in enumerate(inputs)]


def _uint8(pixels):
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def _feature_heat_map(delta):
  """[n, h, w, c] feature change -> [n, h, w, 1] uint8, each image scaled to its own maximum."""
  change = np.max(np.abs(delta), axis=-1, keepdims=True)
  peak = np.max(change, axis=(1, 2, 3), keepdims=True)
  return _uint8(255.0 * change / np.maximum(peak, np.finfo(np.float32).tiny))


def render(x, versions, inputs, normalization: str) -> dict:
  """{tag: uint8 [n, h, w, c]} of the model inputs x and each AuxiliaryInput's (reference,
  perturbed) pair (numpy), un-normalised with the data pipeline's mean/std."""
  mean, std = (np.asarray(v, np.float32) for v in normalization_lib.mean_std_pixels(normalization))
  x = np.asarray(x, np.float32)
  images = {f'{PREFIX}/clean': _uint8(x * std + mean)}
  for aux, (reference, perturbed) in zip(inputs, versions):
    delta = np.asarray(perturbed, np.float32) - np.asarray(reference, np.float32)
    if aux.epsilon_pixels is None:
      images[f'{PREFIX}/{aux.name}_perturbation'] = _feature_heat_map(delta)
      continue
    tag = f'{PREFIX}/{aux.name}_eps{aux.epsilon_pixels:g}px'
    images[tag] = _uint8(np.asarray(perturbed, np.float32) * std + mean)
    # In pixels, +-E -> 255 / 0: a 1-pixel attack is invisible in the adversarial image itself.
    images[f'{tag}_perturbation'] = _uint8(127.5 + delta * std * (127.5 / aux.epsilon_pixels))
  return images


def make_images_fn(model, config, mesh):
  """`images(params, model_state, batch, rng) -> {tag: uint8 [n, h, w, c]}` (numpy, on every
  process) for the (unsharded) `model` of the config's method; batch: the step's global batch."""
  inputs = methods.get(config.method).auxiliary_inputs(model, config)
  # Replicated outputs: every process can read them (the first images live on one process' devices).
  compute = jax.jit(functools.partial(_compute, inputs),
                    out_shardings=parallel.replicated_sharding(mesh))

  def images(params, model_state, batch, rng):
    x, versions = jax.device_get(compute(params, model_state, batch, rng))
    return render(x, versions, inputs, config.data.normalization)
  return images


def make_logger(model, config, mesh):
  """`log(writer, step, state, batch, rng) -> seconds spent` writing the images of every K-th step
  (K = config.log_images_every_steps), or None when K = 0: nothing is built then."""
  every = int(config.get('log_images_every_steps', 0) or 0)
  if every <= 0:
    return None
  images = make_images_fn(model, config, mesh)

  def log(writer, step, state, batch, rng):
    if step % every:
      return 0.0
    start = time.time()
    writer.write_images(step, images(state.params, state.model_state, batch,
                                     jax.random.fold_in(rng, step)))
    return time.time() - start
  return log
