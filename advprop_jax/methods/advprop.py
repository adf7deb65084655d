"""Vanilla training, adversarial training, AdvProp and fine-grained AdvProp (Xie et al. 2020; RECIPE §3).

Each is a loss `(params, model_state, batch, rng) -> (loss, (new_model_state, metrics))` whose gradient
is the method's gradient:
  vanilla               clean images through the main BN.
  adv_train             clean + PGD images in ONE batch through the main BN (the paper's baseline).
  advprop               clean images through the main BN + PGD images, crafted against and trained
                        through the auxiliary BN 'adv'; loss = clean + adversarial.
  fine_grained_advprop  one auxiliary BN per attack strength (adv1..advK, weakest first).
"""
import functools

import jax
import jax.numpy as jnp

from advprop_jax import optim
from advprop_jax import validation
from advprop_jax.methods import base
from advprop_jax.methods import passes as passes_lib
from advprop_jax.methods.passes import accuracy, cross_entropy
from advprop_jax.models.batchnorm import ADV, CLEAN, fine_grained_distribution


def _mean_ce(config, logits, labels):
  return jnp.mean(cross_entropy(logits, labels, config.num_classes, config.label_smoothing))


def _clean_pass(config, passes, params, model_state, batch, rng):
  logits, model_state = passes(params, model_state, batch['image'], distribution=CLEAN, train=True,
                               rng=rng)
  loss = _mean_ce(config, logits, batch['label'])
  return loss, model_state, dict(clean_loss=loss, clean_accuracy=accuracy(logits, batch['label']))


def _finish(config, params, loss, model_state, metrics):
  """Adds the recipe's L2 term (inside the loss, TF style) and reports the total."""
  if config.l2_weight:
    loss = loss + config.l2_weight * optim.l2_loss(params)
  metrics['loss'] = loss
  return loss, (model_state, metrics)


def _adversarial_loss(config, passes, params, model_state, batch, rng, *, distribution,
                      epsilon_pixels=None):
  """PGD against `distribution`'s BN, then the training pass of the examples through that BN."""
  settings = passes_lib.attack_settings(config.attack, config.data.normalization, epsilon_pixels)
  attack_rng, pass_rng = jax.random.split(rng)
  x_adv, attack_labels = passes_lib.adversarial_examples(
      passes, jax.lax.stop_gradient(params), model_state, batch, attack_rng,
      distribution=distribution, settings=settings, bn_mode=config.attack.bn_mode,
      num_classes=config.num_classes)
  logits, model_state = passes(params, model_state, x_adv, distribution=distribution, train=True,
                               rng=pass_rng)
  loss = _mean_ce(config, logits, batch['label'])
  metrics = dict(adv_loss=loss, adv_accuracy=accuracy(logits, batch['label']),
                 attack_success=passes_lib.attack_success(logits, batch['label'], attack_labels,
                                                          settings['targeted']))
  return loss, model_state, metrics


def vanilla_loss(config, passes, params, model_state, batch, rng):
  clean_rng, _ = jax.random.split(rng)
  loss, model_state, metrics = _clean_pass(config, passes, params, model_state, batch, clean_rng)
  return _finish(config, params, config.clean_weight * loss, model_state, metrics)


def adv_train_loss(config, passes, params, model_state, batch, rng):
  # Clean and adversarial images share the clean BN and are normalised together.
  clean_rng, adv_rng = jax.random.split(rng)
  labels = batch['label']
  x_adv, attack_labels = passes_lib.adversarial_examples(
      passes, jax.lax.stop_gradient(params), model_state, batch, adv_rng, distribution=CLEAN,
      settings=passes_lib.attack_settings(config.attack, config.data.normalization),
      bn_mode=config.attack.bn_mode, num_classes=config.num_classes)
  logits, model_state = passes(params, model_state, jnp.concatenate([batch['image'], x_adv]),
                               distribution=CLEAN, train=True, rng=clean_rng)
  clean_logits, adv_logits = jnp.split(logits, 2)
  clean_loss, adv_loss = _mean_ce(config, clean_logits, labels), _mean_ce(config, adv_logits, labels)
  metrics = dict(adv_loss=adv_loss, adv_accuracy=accuracy(adv_logits, labels),
                 attack_success=passes_lib.attack_success(adv_logits, labels, attack_labels,
                                                          config.attack.targeted),
                 clean_loss=clean_loss, clean_accuracy=accuracy(clean_logits, labels))
  loss = config.clean_weight * clean_loss + config.adv_weight * adv_loss
  return _finish(config, params, loss, model_state, metrics)


def advprop_loss(config, passes, params, model_state, batch, rng):
  clean_rng, adv_rng = jax.random.split(rng)
  clean_loss, model_state, metrics = _clean_pass(config, passes, params, model_state, batch, clean_rng)
  adv_loss, model_state, adv_metrics = _adversarial_loss(config, passes, params, model_state, batch,
                                                         adv_rng, distribution=ADV)
  metrics.update(adv_metrics)
  loss = config.clean_weight * clean_loss + config.adv_weight * adv_loss
  return _finish(config, params, loss, model_state, metrics)


def fine_grained_loss(config, passes, params, model_state, batch, rng):
  clean_rng, adv_rng = jax.random.split(rng)
  clean_loss, model_state, metrics = _clean_pass(config, passes, params, model_state, batch, clean_rng)
  loss = config.clean_weight * clean_loss
  for i, eps in enumerate(config.fine_grained_epsilons_pixels):
    name = fine_grained_distribution(i)
    adv_loss, model_state, adv_metrics = _adversarial_loss(
        config, passes, params, model_state, batch, jax.random.fold_in(adv_rng, i), distribution=name,
        epsilon_pixels=eps)
    metrics.update({f'{k}_{name}': v for k, v in adv_metrics.items()})
    loss = loss + config.adv_weight * adv_loss
  return _finish(config, params, loss, model_state, metrics)


def _loss_builder(loss):
  def make_loss_fn(model, config):
    return functools.partial(loss, config, passes_lib.Passes(model))
  return make_loss_fn


def _require_attack(config, num_devices):
  del num_devices
  validation.require_number(config, 'attack.epsilon_pixels', low=0, high=255, low_open=True)


def _validate_fine_grained(config, num_devices):
  del num_devices
  epsilons = config.fine_grained_epsilons_pixels
  if not epsilons:
    raise validation.ConfigError('config.fine_grained_epsilons_pixels must list at least one epsilon '
                                 '(pixels, one auxiliary BN each)')
  for eps in epsilons:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 255:
      raise validation.ConfigError(f'config.fine_grained_epsilons_pixels={tuple(epsilons)}: each must '
                                   'be a number in (0, 255]')


def _pgd(distribution):
  return lambda config: (base.Attack(distribution, passes_lib.attack_steps(config.attack)),)


def _pgd_input(config, model, name, distribution, epsilon_pixels=None):
  """The PGD images of `_adversarial_loss` / `adv_train_loss` (image summaries)."""
  passes = passes_lib.Passes(model)
  settings = passes_lib.attack_settings(config.attack, config.data.normalization, epsilon_pixels)

  def perturb(params, model_state, x, labels, rng):
    x_adv, _ = passes_lib.adversarial_examples(
        passes, params, model_state, dict(image=x, label=labels), rng, distribution=distribution,
        settings=settings, bn_mode=config.attack.bn_mode, num_classes=config.num_classes)
    return x, x_adv
  eps = config.attack.epsilon_pixels if epsilon_pixels is None else epsilon_pixels
  return base.AuxiliaryInput(name, perturb, epsilon_pixels=float(eps))


def _fine_grained_inputs(model, config):
  names = [fine_grained_distribution(i) for i in range(len(config.fine_grained_epsilons_pixels))]
  return tuple(_pgd_input(config, model, name, name, eps)
               for name, eps in zip(names, config.fine_grained_epsilons_pixels))


def _method(name, summary, loss, **fields):
  make_loss_fn = _loss_builder(loss)
  return base.Method(name=name, summary=summary, make_grad_fn=base.grad_fn_of(make_loss_fn),
                     make_loss_fn=make_loss_fn, **fields)


def _attack_cost(config):
  """PGD-K costs K passes, plus the clean and the adversarial training passes: K + 2."""
  return float(passes_lib.attack_steps(config.attack) + 2)


VANILLA = _method('vanilla', 'clean images, main BN', vanilla_loss, relative_cost=lambda config: 1.0)
ADV_TRAIN = _method('adv_train', 'clean + PGD images in one batch, main BN (adversarial training)',
                    adv_train_loss, attacks=_pgd(CLEAN), validate=_require_attack,
                    auxiliary_inputs=lambda model, c: (_pgd_input(c, model, 'adv', CLEAN),),
                    relative_cost=_attack_cost)
ADVPROP = _method('advprop', 'clean (main BN) + PGD images (auxiliary BN)', advprop_loss,
                  distributions=lambda config: (CLEAN, ADV), attacks=_pgd(ADV),
                  auxiliary_inputs=lambda model, c: (_pgd_input(c, model, 'adv', ADV),),
                  validate=_require_attack, relative_cost=_attack_cost)
FINE_GRAINED_ADVPROP = _method(
    'fine_grained_advprop', 'clean + one PGD strength per auxiliary BN', fine_grained_loss,
    distributions=lambda config: (CLEAN,) + tuple(
        fine_grained_distribution(i) for i in range(len(config.fine_grained_epsilons_pixels))),
    attacks=lambda config: tuple(
        base.Attack(fine_grained_distribution(i), passes_lib.attack_steps(config.attack, eps))
        for i, eps in enumerate(config.fine_grained_epsilons_pixels)),
    auxiliary_inputs=_fine_grained_inputs, validate=_validate_fine_grained,
    relative_cost=lambda config: 1.0 + sum(passes_lib.attack_steps(config.attack, eps) + 1.0
                                           for eps in config.fine_grained_epsilons_pixels))
