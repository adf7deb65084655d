"""A-FAN (Chen et al., TMLR; RECIPE §5): adversarial perturbation of an intermediate feature.

Config `config.afan`: `stage` (feature = output of block-stage `stage`, >= 1; 1 = first stage, the
paper's default), `num_steps` and `step_size` (untargeted L-inf PGD in FEATURE units, sign steps),
`epsilon` (L-inf radius in feature units; 0 = no projection, as in the released code, i.e. an infinite
ball), `pono_mix` in [0, 1] (0 = off; see `pono_mix`).

Per device: the clean pass (main BN, train mode) runs in two halves, image -> feature (stage s) ->
logits, so the feature costs nothing extra. The feature is detached, attacked with `attacks.pgd`
through the rest of the network, and the perturbed feature is pushed through the rest again:
loss = (clean CE + perturbed CE) / 2 (+ the L2 term). Since the feature is detached, the perturbed
branch gives gradients only to the layers after stage s; the layers up to s learn from the clean pass.

BatchNorm: one BN (the method's distributions are ('clean',)). The perturbed branch, like the
released code, normalises with its own batch statistics (train mode), but it does NOT update the running
statistics: those are what inference uses, and the perturbed features (unbounded when epsilon = 0) are an
augmentation, not the test distribution — AdvProp's reason for separate BNs, applied to the one BN A-FAN
has. Running statistics therefore update from the clean pass only (both halves).
"""
import jax
import jax.numpy as jnp
from jax import lax

from advprop_jax import attacks
from advprop_jax import optim
from advprop_jax import validation
from advprop_jax.methods import base
from advprop_jax.methods import passes as passes_lib
from advprop_jax.models import num_feature_stages
from advprop_jax.models.batchnorm import CLEAN, stats_collection

PONO_EPSILON = 1e-5  # the PONO reference's epsilon


def pono_moments(x):
  """Positional normalisation moments: per example and position, mean/std over channels."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, -1, keepdims=True)
  std = jnp.sqrt(jnp.var(x32, -1, keepdims=True) + PONO_EPSILON)
  return mean, std


def pono_mix(clean, perturbed, mix: float):
  """The clean feature re-normalised with the moments of the point `mix` of the way to `perturbed`.

  A-FAN's normalisation: PONO-normalise the clean feature, then give it the per-position channel mean/std
  of f_mix = clean + mix * (perturbed - clean). mix = 0 returns the clean feature (up to the epsilon),
  mix = 1 the clean content with the perturbed feature's moments. Only the moments of the perturbation
  reach the network, which is the point: it perturbs feature statistics, not content.
  """
  mean, std = pono_moments(clean)
  mix_mean, mix_std = pono_moments(clean + mix * (perturbed - clean))
  out = (clean.astype(jnp.float32) - mean) / std * mix_std + mix_mean
  return out.astype(clean.dtype)


def perturb_feature(rest_loss, feature, afan_config):
  """Untargeted PGD on a (detached) feature: `rest_loss(z)` is the summed CE of the rest of the net.

  epsilon 0 means no projection (the released code): an infinite ball, so `pgd`'s projection is a no-op;
  no clipping, features have no valid range.
  """
  epsilon = afan_config.epsilon if afan_config.epsilon > 0 else jnp.inf
  return attacks.pgd(rest_loss, feature, epsilon=epsilon, step_size=afan_config.step_size,
                     num_steps=int(afan_config.num_steps), random_start=False, targeted=False,
                     clip_min=None, clip_max=None)


def validate(config, num_devices: int) -> None:
  del num_devices
  num_stages = num_feature_stages(config.model, config.model_overrides)
  validation.require_number(config, 'afan.stage', low=1, high=num_stages, integer=True)
  validation.require_number(config, 'afan.num_steps', low=1, integer=True)
  validation.require_number(config, 'afan.step_size', low=0, low_open=True)
  validation.require_number(config, 'afan.epsilon', low=0)
  validation.require_number(config, 'afan.pono_mix', low=0, high=1)


def make_loss_fn(model, config):
  """`(params, model_state, batch, rng) -> (loss, (new_model_state, metrics))` (validated config)."""
  ac = config.afan
  stage = int(ac.stage)
  collection = stats_collection(CLEAN)

  def apply(params, model_state, x, rng, *, update_stats, **stages):
    variables = {'params': params, **model_state}
    out = model.apply(variables, x, train=True, distribution=CLEAN, rngs={'dropout': rng},
                      mutable=[collection] if update_stats else False, **stages)
    if update_stats:
      out, updates = out
      return out, {**model_state, **updates}
    return out, model_state

  def ce(logits, labels):
    return passes_lib.cross_entropy(logits, labels, config.num_classes, config.label_smoothing)

  def loss_fn(params, model_state, batch, rng):
    x, labels = batch['image'], batch['label']
    head_rng, tail_rng, attack_rng, adv_rng = jax.random.split(rng, 4)
    # Clean pass in two halves (image -> stage-s feature -> logits): both update the running statistics.
    feature, new_state = apply(params, model_state, x, head_rng, update_stats=True, to_stage=stage)
    clean_logits, new_state = apply(params, new_state, feature, tail_rng, update_stats=True,
                                    from_stage=stage)
    clean_loss = jnp.mean(ce(clean_logits, labels))

    # The perturbed branch must not train the layers up to s. pgd returns a detached feature anyway;
    # this also keeps the clean feature's moments (pono_mix) from carrying gradient back.
    feature = lax.stop_gradient(feature)
    frozen = lax.stop_gradient(params)

    def rest_loss(z):  # summed: per-example feature gradients not scaled by 1/n (as the pixel attacks)
      return jnp.sum(passes_lib.cross_entropy(
          apply(frozen, model_state, z, attack_rng, update_stats=False, from_stage=stage)[0], labels,
          config.num_classes))

    feature_adv = perturb_feature(rest_loss, feature, ac)
    if ac.pono_mix:
      feature_adv = pono_mix(feature, feature_adv, float(ac.pono_mix))
    adv_logits, _ = apply(params, model_state, feature_adv, adv_rng, update_stats=False,
                          from_stage=stage)
    adv_loss = jnp.mean(ce(adv_logits, labels))

    loss = 0.5 * (clean_loss + adv_loss)
    if config.l2_weight:
      loss = loss + config.l2_weight * optim.l2_loss(params)
    metrics = dict(clean_loss=clean_loss, clean_accuracy=passes_lib.accuracy(clean_logits, labels),
                   adv_loss=adv_loss, adv_accuracy=passes_lib.accuracy(adv_logits, labels),
                   attack_success=jnp.mean(jnp.argmax(adv_logits, -1) != labels), loss=loss)
    return loss, (new_state, metrics)

  return loss_fn


def auxiliary_inputs(model, config):
  """The stage-s feature of the shown images before and after the attack (and PONO mixing), as
  `loss_fn` computes it (train-mode BN with the shown images' batch statistics, none updated)."""
  ac, stage = config.afan, int(config.afan.stage)

  def perturb(params, model_state, x, labels, rng):
    head_rng, attack_rng = jax.random.split(rng)
    variables = {'params': params, **model_state}

    def run(z, r, **stages):
      return model.apply(variables, z, train=True, distribution=CLEAN, rngs={'dropout': r},
                         mutable=False, **stages)

    def rest_loss(z):
      return jnp.sum(passes_lib.cross_entropy(run(z, attack_rng, from_stage=stage), labels,
                                              config.num_classes))

    feature = run(x, head_rng, to_stage=stage)
    feature_adv = perturb_feature(rest_loss, feature, ac)
    if ac.pono_mix:
      feature_adv = pono_mix(feature, feature_adv, float(ac.pono_mix))
    return feature, feature_adv
  return (base.AuxiliaryInput(f'feature_stage{stage}', perturb, feature_stage=stage),)


AFAN = base.Method(
    name='afan', summary='A-FAN: PGD on an intermediate feature, optional PONO mixing, main BN',
    make_grad_fn=base.grad_fn_of(make_loss_fn), make_loss_fn=make_loss_fn, validate=validate,
    auxiliary_inputs=auxiliary_inputs,
    attacks=lambda config: (base.Attack(CLEAN, int(config.afan.num_steps),
                                        from_stage=int(config.afan.stage)),))
