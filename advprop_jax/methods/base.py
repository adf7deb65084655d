"""The Method record: everything the rest of the code needs to know about a training method.

A method's grad function runs on one device's shard inside the data-parallel step (step.py):
`grad_fn(params, model_state, batch, rng) -> (grads, new_model_state, metrics)`, with any cross-device
reduction done by the BatchNorms (batch statistics) or by the step (gradients).
"""
import dataclasses
from typing import Callable, Optional, Tuple

import jax

from advprop_jax.models.batchnorm import CLEAN

GradFn = Callable  # (params, model_state, batch, rng) -> (grads, new_model_state, metrics)
LossFn = Callable  # (params, model_state, batch, rng) -> (loss, (new_model_state, metrics))


@dataclasses.dataclass(frozen=True)
class Attack:
  """One attack a step runs, for FLOP accounting: `num_steps` forward + input-gradient passes of the
  model normalised with `distribution`'s BN, over `batch_fraction` of the device's shard, starting at
  feature stage `from_stage` (0: the image; A-FAN attacks an intermediate feature)."""
  distribution: str
  num_steps: int
  batch_fraction: float = 1.0
  from_stage: int = 0


@dataclasses.dataclass(frozen=True)
class AuxiliaryInput:
  """One auxiliary input distribution of a method, re-created from a few training images for display
  (image_summaries.py). `perturb(params, model_state, x, labels, rng) -> (reference, perturbed)`:
  the method's own attack settings applied to x with a plain (not sharded) model, BN statistics
  of those images where the attack uses batch statistics. In input units with reference = x for a
  pixel-space attack (`epsilon_pixels` its L-inf radius), else the features of block-stage
  `feature_stage` (A-FAN) before and after the perturbation (`epsilon_pixels` None)."""
  name: str
  perturb: Callable
  epsilon_pixels: Optional[float] = None
  feature_stage: int = 0


def _no_validation(config, num_devices: int) -> None:
  del config, num_devices


@dataclasses.dataclass(frozen=True)
class Method:
  """name: the config.method value. make_grad_fn(model, config) -> GradFn.

  make_loss_fn(model, config) -> LossFn when the gradient is the gradient of one loss (None otherwise:
  Fast AdvProp reuses the attack's backward pass). distributions(config): the BN distributions the
  model needs, clean first. loader_batch_size(config): images drawn from the loader per step.
  attacks(config): the attacks of one step (FLOP accounting). auxiliary_inputs(model, config): its
  auxiliary input distributions as AuxiliaryInput records (image summaries; vanilla has none).
  validate(config, num_devices): checks the method's own fields, raising validation.ConfigError.
  relative_cost(config): the cost model the
  benchmarks compare with, forward+backward passes per step in units of a vanilla step on
  global_batch_size images (None: no simple model).
  """
  name: str
  summary: str
  make_grad_fn: Callable[..., GradFn]
  make_loss_fn: Optional[Callable[..., LossFn]] = None
  distributions: Callable[..., Tuple[str, ...]] = lambda config: (CLEAN,)
  loader_batch_size: Callable[..., int] = lambda config: int(config.global_batch_size)
  attacks: Callable[..., Tuple[Attack, ...]] = lambda config: ()
  auxiliary_inputs: Callable[..., Tuple[AuxiliaryInput, ...]] = lambda model, config: ()
  validate: Callable[..., None] = _no_validation
  relative_cost: Callable[..., Optional[float]] = lambda config: None


def grad_fn_of(make_loss_fn: Callable[..., LossFn]) -> Callable[..., GradFn]:
  """make_grad_fn for a method whose gradient is jax.grad of its loss."""
  def make_grad_fn(model, config):
    loss_fn = make_loss_fn(model, config)

    def grad_fn(params, model_state, batch, rng):
      grads, (model_state, metrics) = jax.grad(loss_fn, has_aux=True)(params, model_state, batch, rng)
      return grads, model_state, metrics
    return grad_fn
  return make_grad_fn
