"""What the methods share: forward passes per distribution, the losses, and the pixel-space attack."""
import jax
import jax.numpy as jnp
import optax

from advprop_jax import attacks
from advprop_jax.data import normalization
from advprop_jax.models.batchnorm import distribution_segments, stats_collection

ATTACK_BN_MODES = ('eval', 'train')


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy in float32, with optax's label smoothing."""
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def accuracy(logits, labels):
  return jnp.mean(jnp.argmax(logits, -1) == labels)


class Passes:
  """Forward passes of `model` for one distribution (or a mixed batch, see batchnorm.distribution_segments).

  Running statistics update only when asked: `update_stats` True updates every distribution of the
  pass, False none, a tuple of names only those. Flax enforces it: only those collections are mutable.
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


def attack_steps(attack_config, epsilon_pixels=None) -> int:
  """PGD iterations: config.attack.num_steps, or the paper's rule (0)."""
  eps = attack_config.epsilon_pixels if epsilon_pixels is None else epsilon_pixels
  return int(attack_config.num_steps or attacks.default_num_steps(eps))


def attack_settings(attack_config, normalization_name: str, epsilon_pixels=None) -> dict:
  """Keyword arguments of attacks.pgd in input units, from a config's attack section in pixels."""
  eps_pixels = attack_config.epsilon_pixels if epsilon_pixels is None else epsilon_pixels
  clip_min, clip_max = normalization.input_range(normalization_name)
  return dict(
      epsilon=normalization.pixels_to_input_units(eps_pixels, normalization_name),
      step_size=normalization.pixels_to_input_units(attack_config.step_size_pixels, normalization_name),
      num_steps=attack_steps(attack_config, eps_pixels), random_start=float(attack_config.random_start),
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


def attack_success(logits, labels, attack_labels, targeted: bool):
  """Targeted: the share classified as the target; untargeted: the share misclassified."""
  pred = jnp.argmax(logits, -1)
  return jnp.mean(pred == attack_labels) if targeted else jnp.mean(pred != labels)
