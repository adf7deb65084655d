"""Training objectives over one model and state: vanilla, adversarial training, AdvProp, fine-grained AdvProp.

Each method is a function `(params, model_state, batch, rng) -> (grads, new_model_state, metrics)` built
by `make_grad_fn`; it runs on one device's shard inside the data-parallel step (see train.py), so any
cross-device reduction happens in the BatchNorms (batch statistics) or in the step (gradients).
Fast AdvProp and A-FAN live in their own modules and register here.
"""
import functools
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import optax

from advprop_jax import attacks
from advprop_jax import optim
from advprop_jax.layers import CLEAN, distribution_segments, stats_collection

METHODS = ('vanilla', 'adv_train', 'advprop', 'fine_grained_advprop', 'fast_advprop', 'afan')
SINGLE_LOSS_METHODS = METHODS[:4]  # their gradient is jax.grad of `_loss`
ATTACK_BN_MODES = ('eval', 'train')


def method_distributions(config) -> tuple:
  """The BN distributions a method's model needs (clean first)."""
  if config.method == 'fine_grained_advprop':
    return (CLEAN,) + tuple(f'adv{i + 1}' for i in range(len(config.fine_grained_epsilons_pixels)))
  if config.method in ('advprop', 'fast_advprop'):
    return (CLEAN, 'adv')
  return (CLEAN,)


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing) \
      if label_smoothing else jax.nn.one_hot(labels, num_classes)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def accuracy(logits, labels):
  return jnp.mean(jnp.argmax(logits, -1) == labels)


class Passes:
  """Forward passes of `model` for one distribution (or a mixed batch, see layers.distribution_segments).

  Running statistics update only when asked: `update_stats` True updates every distribution of the
  pass, False none, a tuple of names only those.
  """

  def __init__(self, model):
    self.model = model

  def __call__(self, params, model_state, x, *, distribution, train, rng=None, update_stats=True):
    variables = {'params': params, **model_state}
    rngs = {'dropout': rng} if (train and rng is not None) else {}
    if update_stats is True:
      update_stats = tuple(name for name, _ in distribution_segments(distribution))
    if train and update_stats:
      logits, updates = self.model.apply(variables, x, train=True, distribution=distribution,
                                         mutable=[stats_collection(d) for d in update_stats],
                                         rngs=rngs)
      return logits, {**model_state, **updates}
    return self.model.apply(variables, x, train=train, distribution=distribution, rngs=rngs), model_state


def attack_settings(attack_config, normalization: str, epsilon_pixels=None) -> dict:
  """Attack sizes in input units: the single place configs in pixels become input units."""
  eps_pixels = attack_config.epsilon_pixels if epsilon_pixels is None else epsilon_pixels
  num_steps = attack_config.num_steps or attacks.default_num_steps(eps_pixels)
  clip_min, clip_max = attacks.input_range(normalization)
  return dict(epsilon=attacks.pixels_to_input_units(eps_pixels, normalization),
              step_size=attacks.pixels_to_input_units(attack_config.step_size_pixels, normalization),
              num_steps=int(num_steps), random_start=float(attack_config.random_start),
              targeted=bool(attack_config.targeted), clip_min=clip_min, clip_max=clip_max)


def adversarial_examples(passes, params, model_state, batch, rng, *, distribution, settings,
                         bn_mode: str, num_classes: int):
  """PGD against the model normalised with `distribution`'s BN; returns (x_adv, attack labels).

  bn_mode 'eval' uses that BN's running statistics, 'train' its batch statistics (running statistics are
  never updated by the attack). Targeted attacks aim at a uniformly random wrong label.
  """
  x, labels = batch['image'], batch['label']
  target_rng, start_rng, dropout_rng = jax.random.split(rng, 3)
  if settings['targeted']:
    offset = jax.random.randint(target_rng, labels.shape, 1, num_classes)
    attack_labels = (labels + offset) % num_classes
  else:
    attack_labels = labels
  train = bn_mode == 'train'

  def loss_fn(z):  # summed, so per-example gradients are not scaled by 1/batch (matters in bf16)
    logits, _ = passes(params, model_state, z, distribution=distribution, train=train,
                       rng=dropout_rng, update_stats=False)
    return jnp.sum(cross_entropy(logits, attack_labels, num_classes))

  x_adv = attacks.pgd(loss_fn, x, rng=start_rng, **settings)
  return x_adv, attack_labels


def _attack_success(logits, labels, attack_labels, targeted):
  pred = jnp.argmax(logits, -1)
  return jnp.mean(pred == attack_labels) if targeted else jnp.mean(pred != labels)


def _adversarial_loss(config, passes, params, model_state, batch, rng, *, attack_distribution,
                      train_distribution, epsilon_pixels=None):
  """Attack with `attack_distribution`'s BN, then the training pass through `train_distribution`'s BN."""
  settings = attack_settings(config.attack, config.data.normalization, epsilon_pixels)
  attack_rng, pass_rng = jax.random.split(rng)
  x_adv, attack_labels = adversarial_examples(
      passes, jax.lax.stop_gradient(params), model_state, batch, attack_rng,
      distribution=attack_distribution, settings=settings, bn_mode=config.attack.bn_mode,
      num_classes=config.num_classes)
  logits, model_state = passes(params, model_state, x_adv, distribution=train_distribution,
                               train=True, rng=pass_rng)
  loss = jnp.mean(cross_entropy(logits, batch['label'], config.num_classes, config.label_smoothing))
  metrics = dict(adv_loss=loss, adv_accuracy=accuracy(logits, batch['label']),
                 attack_success=_attack_success(logits, batch['label'], attack_labels,
                                                settings['targeted']))
  return loss, model_state, metrics


def _loss(config, passes, params, model_state, batch, rng):
  """Total loss of one method on one shard; returns (loss, (new_model_state, metrics))."""
  clean_rng, adv_rng = jax.random.split(rng)
  labels = batch['label']
  metrics = {}
  if config.method == 'adv_train':
    # The paper's baseline: clean and adversarial images share the clean BN, normalised together.
    x_adv, attack_labels = adversarial_examples(
        passes, jax.lax.stop_gradient(params), model_state, batch, adv_rng, distribution=CLEAN,
        settings=attack_settings(config.attack, config.data.normalization),
        bn_mode=config.attack.bn_mode, num_classes=config.num_classes)
    both = jnp.concatenate([batch['image'], x_adv])
    logits, model_state = passes(params, model_state, both, distribution=CLEAN, train=True,
                                 rng=clean_rng)
    clean_logits, adv_logits = jnp.split(logits, 2)
    adv_loss = jnp.mean(cross_entropy(adv_logits, labels, config.num_classes, config.label_smoothing))
    metrics.update(adv_loss=adv_loss, adv_accuracy=accuracy(adv_logits, labels),
                   attack_success=_attack_success(adv_logits, labels, attack_labels,
                                                  config.attack.targeted))
  else:
    clean_logits, model_state = passes(params, model_state, batch['image'], distribution=CLEAN,
                                       train=True, rng=clean_rng)
  clean_loss = jnp.mean(cross_entropy(clean_logits, labels, config.num_classes,
                                      config.label_smoothing))
  metrics.update(clean_loss=clean_loss, clean_accuracy=accuracy(clean_logits, labels))
  loss = config.clean_weight * clean_loss
  if config.method == 'adv_train':
    loss = loss + config.adv_weight * metrics['adv_loss']
  elif config.method == 'advprop':
    adv_loss, model_state, adv_metrics = _adversarial_loss(
        config, passes, params, model_state, batch, adv_rng, attack_distribution='adv',
        train_distribution='adv')
    metrics.update(adv_metrics)
    loss = loss + config.adv_weight * adv_loss
  elif config.method == 'fine_grained_advprop':
    # One auxiliary BN per attack strength (distributions adv1..advK, weakest first).
    for i, eps in enumerate(config.fine_grained_epsilons_pixels):
      name = f'adv{i + 1}'
      adv_loss, model_state, adv_metrics = _adversarial_loss(
          config, passes, params, model_state, batch, jax.random.fold_in(adv_rng, i),
          attack_distribution=name, train_distribution=name, epsilon_pixels=eps)
      metrics.update({f'{k}_{name}': v for k, v in adv_metrics.items()})
      loss = loss + config.adv_weight * adv_loss
  if config.l2_weight:
    loss = loss + config.l2_weight * optim.l2_loss(params)
  metrics['loss'] = loss
  return loss, (model_state, metrics)


def make_grad_fn(model, config) -> Callable:
  """`(params, model_state, batch, rng) -> (grads, new_model_state, metrics)` for `config.method`."""
  # Imported here, not at the top: these modules import this one, then register their builders.
  from advprop_jax import afan, fast_advprop  # noqa: F401
  if config.method in _EXTRA_METHODS:
    return _EXTRA_METHODS[config.method](model, config, Passes(model))
  if config.method not in METHODS:
    raise ValueError(f'method={config.method!r}; allowed: {METHODS}')

  loss_fn = make_loss_fn(model, config)

  def grad_fn(params, model_state, batch, rng):
    grads, (model_state, metrics) = jax.grad(loss_fn, has_aux=True)(params, model_state, batch, rng)
    return grads, model_state, metrics
  return grad_fn


def make_loss_fn(model, config) -> Callable:
  """`(params, model_state, batch, rng) -> (loss, (new_model_state, metrics))` of a method whose
  gradient is the gradient of one loss (Fast AdvProp and A-FAN build their gradients otherwise)."""
  if config.method not in SINGLE_LOSS_METHODS:
    raise ValueError(f'method={config.method!r} has no single loss; allowed: {SINGLE_LOSS_METHODS}')
  return functools.partial(_loss, config, Passes(model))


# Methods whose gradient is not the gradient of one loss (Fast AdvProp reuses the attack's backward
# pass): name -> builder(model, config, passes) -> grad_fn. Filled in by their modules.
_EXTRA_METHODS: Dict[str, Callable] = {}


def register_method(name: str, builder: Callable) -> None:
  _EXTRA_METHODS[name] = builder
