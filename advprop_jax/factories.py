"""Config -> the objects of a run: the model (with its method's BN distributions), the optimizer and its
schedule, the loader batch, the checkpoint fingerprint. TF-free: `plan`, the benchmarks, `evaluate` and
the training loop all build from here.
"""
import json
from typing import NamedTuple

import jax.numpy as jnp

from advprop_jax import config as config_lib
from advprop_jax import methods
from advprop_jax import optim
from advprop_jax import validation
from advprop_jax.models import create_model
from advprop_jax.models.conv import resolve_depthwise_impl

# Config fields a checkpoint must agree on to be resumed (anything else may change on resume).
FINGERPRINT_FIELDS = ('model', 'model_overrides', 'method', 'num_classes', 'data.image_size',
                      'optimizer', 'fine_grained_epsilons_pixels')
# The training schedule: changing one of these and resuming would silently continue the run under another
# schedule (and data order), so it is refused unless explicitly allowed (main.py --allow_schedule_change).
SCHEDULE_FIELDS = ('global_batch_size', 'base_learning_rate', 'num_epochs', 'warmup_epochs',
                   'lr_schedule', 'lr_decay_epochs', 'lr_decay_rate', 'lr_boundaries_epochs',
                   'seed', 'data.minival_examples')  # (the minival: what is trained on, how much)


def activation_dtype(config):
  return jnp.bfloat16 if config.dtype == 'bfloat16' else jnp.float32


def build_model(config, *, platform=None, **extra):
  """The config's model with its method's BN distributions. `platform`: the backend the program will be
  compiled for when that is not this host's (ahead-of-time TPU compilation from a CPU host), so that
  backend-dependent kernels ('auto' depthwise convolutions) are chosen for it."""
  overrides = config_lib.set_overrides(config)
  overrides.update(extra)
  overrides.setdefault('distributions', methods.get(config.method).distributions(config))
  model = create_model(config.model, num_classes=config.num_classes, dtype=activation_dtype(config),
                       **overrides)
  if platform is not None and hasattr(model, 'depthwise_impl'):
    model = model.clone(depthwise_impl=resolve_depthwise_impl(model.depthwise_impl, platform))
  return model


def loader_batch_size(config) -> int:
  """Images drawn from the loader per step (Fast AdvProp draws more than global_batch_size)."""
  return methods.get(config.method).loader_batch_size(config)


class Schedule(NamedTuple):
  steps_per_epoch: float  # loader batches per pass over the training split, a float like the reference
  total_steps: int  # steps of the whole run (config.max_steps caps it)
  eval_every_steps: int


def schedule(config, num_train_examples: int) -> Schedule:
  """Epochs -> steps for a training split of `num_train_examples` images, as the TF reference does it
  (optim.epochs_to_steps: int(epochs * N / batch), 109,474 steps for 350 ImageNet epochs at 4096)."""
  batch = loader_batch_size(config)
  total_steps = optim.epochs_to_steps(config.num_epochs, num_train_examples, batch)
  if config.max_steps is not None:
    total_steps = min(total_steps, config.max_steps)
  return Schedule(optim.steps_per_epoch(num_train_examples, batch), total_steps,
                  max(1, optim.epochs_to_steps(config.eval_every_epochs, num_train_examples, batch)))


def build_optimizer(config, steps_per_epoch):
  """(optax transformation, learning-rate function of the step) of the config's recipe."""
  base_lr = config.base_learning_rate * config.global_batch_size / 256
  lr_fn = optim.learning_rate_schedule(
      base_lr=base_lr, steps_per_epoch=steps_per_epoch, num_epochs=config.num_epochs,
      warmup_epochs=config.warmup_epochs, schedule=config.lr_schedule,
      decay_epochs=config.lr_decay_epochs, decay_rate=config.lr_decay_rate,
      boundaries_epochs=tuple(config.lr_boundaries_epochs))
  tx = optim.create_optimizer(config.optimizer, lr_fn, momentum=config.momentum,
                              rmsprop_decay=config.rmsprop_decay,
                              rmsprop_epsilon=config.rmsprop_epsilon, nesterov=config.nesterov,
                              weight_decay=config.weight_decay)
  return tx, lr_fn


def _plain(value):
  value = value.to_dict() if hasattr(value, 'to_dict') else value
  return json.loads(json.dumps(value, default=list))


def fingerprint(config) -> dict:
  """The config fields a checkpoint records (FINGERPRINT_FIELDS + SCHEDULE_FIELDS), JSON-able; unset model
  overrides are left out."""
  out = {f: _plain(validation.get(config, f)) for f in FINGERPRINT_FIELDS + SCHEDULE_FIELDS}
  out['model_overrides'] = {k: v for k, v in out['model_overrides'].items() if v is not None}
  return out
