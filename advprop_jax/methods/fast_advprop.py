"""Fast AdvProp (Mei et al., ICLR 2022; RECIPE §4): AdvProp at about the cost of vanilla training.

Config `config.fast_advprop`: `adv_fraction` (share of each loader batch used as the adversarial
source; the loader draws global_batch / (1 - adv_fraction) images), `noise_weight` (weight of the reused
attack gradient), `adv_weight` (weight of the adversarial pass). The attack is `config.attack` with one
untargeted step of size epsilon (`epsilon_pixels`; `random_start` is honoured, other fields are fixed).

Per device, the shard holds n_clean + n_adv images, n_adv = round(adv_fraction * shard):
  1. the first n_clean images: clean pass, main BN, train mode, updates `batch_stats` (weight 1);
  2. the last n_adv images, DIFFERENT images (decoupled from the clean ones): one FGSM step with the aux
     BN in train mode (batch statistics, running statistics untouched). The single backward pass of that
     step gives the input gradient (for the attack) and the parameter gradient, which is reused as a
     training gradient with weight `noise_weight` (the "noise" gradient) instead of being thrown away.
     Steps 1 and 2 run as ONE mixed batch through the shared layers (`clean_and_attack`: the rows are
     normalised by their own BNs), so a step costs two passes, not three;
  3. the adversarial examples are shuffled across BN groups (see `shuffle_across_groups`), then the
     adversarial pass runs with the aux BN, train mode, updating `batch_stats_adv` (weight `adv_weight`).
Each parameter group's summed gradient is divided by its own weighted sample count (`group_divisors`),
so shared weights, main BNs and aux BNs all move at the same speed (RECIPE: 320 / 256 / 64 for 256+64).
The gradient is not the gradient of one scalar loss: the method has a grad function and no loss function.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

from advprop_jax import attacks
from advprop_jax import optim
from advprop_jax import parallel
from advprop_jax import validation
from advprop_jax.methods import base
from advprop_jax.methods import passes as passes_lib
from advprop_jax.models.batchnorm import ADV, CLEAN, param_suffix


def split_sizes(shard_size: int, adv_fraction: float):
  """(n_clean, n_adv) of one device's shard; static, since shapes are."""
  n_adv = int(round(adv_fraction * shard_size))
  if not 0 < n_adv < shard_size:
    raise ValueError(f'fast_advprop: a shard of {shard_size} images with adv_fraction={adv_fraction} '
                     f'leaves {n_adv} adversarial and {shard_size - n_adv} clean images; both must be '
                     '> 0 (use a larger batch)')
  return shard_size - n_adv, n_adv


def group_divisors(params, n_clean: int, n_adv: int, noise_weight: float, adv_weight: float):
  """Per-leaf divisor of the summed gradient: each group's sample count x weight.

  Shared weights see every pass: n_clean * 1 + n_adv * (noise_weight + adv_weight). Main-BN scale/bias
  see only the clean pass (n_clean); aux-BN scale/bias the attack backward and the adversarial pass
  (n_adv * (noise_weight + adv_weight)).
  """
  aux = n_adv * (noise_weight + adv_weight)
  is_shared = traverse_util.flatten_dict(optim.not_batchnorm_mask(params))
  suffix = param_suffix(ADV)
  divisors = {}
  for path, shared in is_shared.items():
    if shared:
      divisors[path] = n_clean + aux
    else:
      divisors[path] = aux if path[-1].endswith(suffix) else float(n_clean)
  return traverse_util.unflatten_dict(divisors)


def _attack_start(x, rng, settings):
  """(starting point of the attack, projection onto the eps-ball around x and the input range)."""
  eps = jnp.asarray(settings['epsilon'], x.dtype)

  def project(z):
    return jnp.clip(jnp.clip(z, x - eps, x + eps), settings['clip_min'], settings['clip_max'])

  if settings['random_start'] > 0:
    return project(x + attacks.random_start_delta(rng, x, eps, settings['random_start'])), project
  return x, project


def _fgsm(x0, input_grad, project, settings):
  """One untargeted signed-gradient step from x0 (only the sign of input_grad matters)."""
  step = jnp.asarray(settings['step_size'], x0.dtype)
  return lax.stop_gradient(project(x0 + step * jnp.sign(input_grad).astype(x0.dtype)))


def attack_step(passes, params, model_state, x, labels, rng, *, settings, loss_fn):
  """One untargeted FGSM step with the aux BN in train mode, and the parameter gradient of its loss.

  ONE `jax.value_and_grad` w.r.t. (params, input): the backward pass the attack needs anyway also yields
  d(sum loss)/d(params) at the attack's starting point (x itself unless `random_start`), which Fast
  AdvProp reuses. Returns (x_adv with gradients stopped, summed loss, parameter gradient, logits).
  Used on its own when noise_weight is 0; otherwise `clean_and_attack` does this inside the clean pass.
  """
  start_rng, dropout_rng = jax.random.split(rng)
  x0, project = _attack_start(x, start_rng, settings)

  def loss(p, z):  # summed, like the PGD attacks' losses: per-example input gradients not scaled by 1/n
    logits, _ = passes(p, model_state, z, distribution=ADV, train=True, rng=dropout_rng,
                       update_stats=False)
    return jnp.sum(loss_fn(logits, labels)), logits

  (loss_sum, logits), (param_grads, input_grad) = jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True)(params, x0)
  return _fgsm(x0, input_grad, project, settings), loss_sum, param_grads, logits


def clean_and_attack(passes, params, model_state, batch, n_clean, rng, *, settings, loss_fn,
                     noise_weight):
  """The clean pass and the attack step as ONE mixed batch, with one backward pass.

  Rows [0, n_clean) are the clean images (main BN, train mode, running statistics updated), the rest the
  adversarial-source images (aux BN with batch statistics, running statistics untouched). The loss is
  clean_sum + noise_weight * noise_sum, so the single backward pass yields the clean gradient plus the
  weighted "noise" gradient, and the input gradient of the source rows, which is noise_weight times the
  attack's own (noise_weight > 0: same sign, same FGSM step). Same numbers as the clean pass and
  `attack_step` run separately, but the shared layers see one (n_clean + n_adv)-image batch instead of a
  small n_adv one. Returns (x_adv, parameter gradient, new model state, clean/noise sums and logits).
  """
  x, labels = batch['image'], batch['label']
  start_rng, dropout_rng = jax.random.split(rng)
  x0, project = _attack_start(x[n_clean:], start_rng, settings)
  mixed = ((CLEAN, n_clean), (ADV, x.shape[0] - n_clean))

  def loss(p, source):
    logits, state = passes(p, model_state, jnp.concatenate([x[:n_clean], source]), distribution=mixed,
                           train=True, rng=dropout_rng, update_stats=(CLEAN,))
    per_example = loss_fn(logits, labels)
    clean_sum, noise_sum = jnp.sum(per_example[:n_clean]), jnp.sum(per_example[n_clean:])
    return clean_sum + noise_weight * noise_sum, (state, logits, clean_sum, noise_sum)

  (_, (state, logits, clean_sum, noise_sum)), (param_grads, input_grad) = jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True)(params, x0)
  return dict(x_adv=_fgsm(x0, input_grad, project, settings), grads=param_grads, model_state=state,
              clean_sum=clean_sum, noise_sum=noise_sum, clean_logits=logits[:n_clean],
              noise_logits=logits[n_clean:])


def separate_clean_and_attack(passes, params, model_state, batch, n_clean, rng, *, settings, loss_fn,
                              noise_weight):
  """`clean_and_attack` as two passes: the clean pass, and `attack_step` whose parameter gradient is
  added with weight noise_weight (the only way when noise_weight is 0: the mixed batch's input gradient
  would then be zero)."""
  x, labels = batch['image'], batch['label']
  clean_rng, attack_rng = jax.random.split(rng)

  def clean_loss(p):
    logits, state = passes(p, model_state, x[:n_clean], distribution=CLEAN, train=True, rng=clean_rng)
    clean_sum = jnp.sum(loss_fn(logits, labels[:n_clean]))
    return clean_sum, (state, logits)

  (clean_sum, (state, clean_logits)), clean_grads = jax.value_and_grad(clean_loss, has_aux=True)(params)
  x_adv, noise_sum, noise_grads, noise_logits = attack_step(
      passes, params, model_state, x[n_clean:], labels[n_clean:], attack_rng, settings=settings,
      loss_fn=loss_fn)
  grads = (jax.tree.map(lambda c, n: c + noise_weight * n, clean_grads, noise_grads) if noise_weight
           else clean_grads)  # unused noise gradient: XLA drops its computation
  return dict(x_adv=x_adv, grads=grads, model_state=state, clean_sum=clean_sum, noise_sum=noise_sum,
              clean_logits=clean_logits, noise_logits=noise_logits)


def _axis_size(axis_name):
  """Size of a bound mesh axis, or None when not inside a shard_map over it (e.g. a plain jit)."""
  try:
    return lax.axis_size(axis_name)
  except NameError:
    return None


def shuffle_across_groups(tree, rng, axis_name=parallel.GROUP_AXES):
  """Re-deals the adversarial sub-batch (a pytree of [n, ...] arrays) over the BN groups.

  Why: the examples were crafted with the aux BN's batch statistics of their own BN group; normalising
  them again together would let the label-dependent perturbations talk to each other through those
  statistics. BN groups are the (`slice`, `replica`) axes of the mesh (devices along `bn` share
  statistics), so the exchange runs over those (across slices too: as one slice of as many devices):
    * first a random permutation within the device (per-device rng), so which examples travel differs
      every step; on one device / one group this is all that happens (BN statistics are permutation
      invariant there, so it changes no number — there is no other group to mix with);
    * with G > 1 groups, the n examples are cut into c = min(n, G) near-equal chunks and chunk i moves
      i groups forward (same position in the group). When c = G and the chunks are equal this is exactly
      an all_to_all (one collective; the recipe's 64 examples over <= 8 groups); otherwise c - 1 fixed
      cyclic ppermutes. Either way every group then holds examples from c different groups (at most
      ceil(n / c) of its own), and the overall mapping is a permutation of the global adversarial batch.
  """
  leaves = jax.tree.leaves(tree)
  n = leaves[0].shape[0]
  perm = jax.random.permutation(rng, n)
  tree = jax.tree.map(lambda a: a[perm], tree)
  groups = _axis_size(axis_name)
  if not groups or groups == 1:
    return tree
  if n % groups == 0:
    return jax.tree.map(lambda a: lax.all_to_all(a, axis_name, 0, 0, tiled=True), tree)
  num_chunks = min(n, groups)
  bounds = np.linspace(0, n, num_chunks + 1).round().astype(int)

  def deal(a):
    chunks = []
    for i in range(num_chunks):
      chunk = a[bounds[i]:bounds[i + 1]]
      if i:
        chunk = lax.ppermute(chunk, axis_name, [(g, (g + i) % groups) for g in range(groups)])
      chunks.append(chunk)
    return jnp.concatenate(chunks)
  return jax.tree.map(deal, tree)


def loader_batch_size(config) -> int:
  """The loader draws global_batch / (1 - adv_fraction) images: global_batch clean + the attack sources."""
  return int(round(config.global_batch_size / (1.0 - config.fast_advprop.adv_fraction)))


def relative_cost(config) -> float:
  """n_clean clean + n_adv attacked + n_adv adversarial images, all with parameter gradients, against
  vanilla's n_clean: 1 + 2 f / (1 - f) for adv_fraction f (1.5 at 0.2). Per loader image it is 1 + f."""
  f = config.fast_advprop.adv_fraction
  return 1.0 + 2.0 * f / (1.0 - f)


def validate(config, num_devices: int) -> None:
  fa = config.fast_advprop
  validation.require_number(config, 'fast_advprop.adv_fraction', low=0, high=1, low_open=True,
                            high_open=True)
  validation.require_number(config, 'fast_advprop.noise_weight', low=0)
  validation.require_number(config, 'fast_advprop.adv_weight', low=0)
  if fa.noise_weight + fa.adv_weight <= 0:
    raise validation.ConfigError(
        f'config.fast_advprop.noise_weight={fa.noise_weight} and config.fast_advprop.adv_weight='
        f'{fa.adv_weight}: at least one must be > 0 (the auxiliary BN would get no samples)')
  validation.require_number(config, 'attack.epsilon_pixels', low=0, high=255, low_open=True)
  loader = loader_batch_size(config)
  if loader % num_devices:
    raise validation.ConfigError(
        f'config.global_batch_size={config.global_batch_size} with config.fast_advprop.adv_fraction='
        f'{fa.adv_fraction} gives a loader batch of {loader}, not divisible by the device count '
        f'{num_devices}')
  # The split is per micro-batch with gradient accumulation (k validated >= 1 before; a k that does
  # not divide the shard is reported after this).
  k = config.get('grad_accumulation_steps', 1)
  shard = loader // num_devices
  micro = shard // k if shard % k == 0 else shard
  try:
    split_sizes(micro, fa.adv_fraction)
  except ValueError as e:
    accumulation = f', config.grad_accumulation_steps={k}' if micro != shard else ''
    raise validation.ConfigError(f'config.global_batch_size={config.global_batch_size}, '
                                 f'config.fast_advprop.adv_fraction={fa.adv_fraction}'
                                 f'{accumulation}: {e}') from e


def attack_settings(config) -> dict:
  """config.attack as one untargeted step of size epsilon (input units; random_start honoured)."""
  settings = passes_lib.attack_settings(config.attack, config.data.normalization)
  settings.update(step_size=settings['epsilon'], num_steps=1, targeted=False)
  return settings


def auxiliary_inputs(model, config):
  """The attack step's images for image summaries: `attack_step` on the shown images (so the aux
  BN's batch statistics are theirs; its parameter gradient is unused and compiled away)."""
  passes, settings = passes_lib.Passes(model), attack_settings(config)

  def loss_fn(logits, labels):
    return passes_lib.cross_entropy(logits, labels, config.num_classes, config.label_smoothing)

  def perturb(params, model_state, x, labels, rng):
    return x, attack_step(passes, params, model_state, x, labels, rng, settings=settings,
                          loss_fn=loss_fn)[0]
  return (base.AuxiliaryInput('adv', perturb, epsilon_pixels=float(config.attack.epsilon_pixels)),)


def make_grad_fn(model, config):
  """`(params, model_state, batch, rng) -> (grads, new_model_state, metrics)` (validated config)."""
  fa = config.fast_advprop
  noise_w, adv_w = float(fa.noise_weight), float(fa.adv_weight)
  passes = passes_lib.Passes(model)
  settings = attack_settings(config)

  def loss_fn(logits, labels):  # the training loss: its parameter gradient is reused for training
    return passes_lib.cross_entropy(logits, labels, config.num_classes, config.label_smoothing)

  def grad_fn(params, model_state, batch, rng):
    labels = batch['label']
    n_clean, n_adv = split_sizes(labels.shape[0], fa.adv_fraction)
    attack_rng, shuffle_rng, adv_rng = jax.random.split(rng, 3)
    first = (clean_and_attack if noise_w > 0 else separate_clean_and_attack)(
        passes, params, model_state, batch, n_clean, attack_rng, settings=settings, loss_fn=loss_fn,
        noise_weight=noise_w)
    x_adv, adv_labels = shuffle_across_groups((first['x_adv'], labels[n_clean:]), shuffle_rng)

    def adv_loss(p):  # the adversarial pass: aux BN, train mode, updates `batch_stats_adv`
      logits, state = passes(p, first['model_state'], x_adv, distribution=ADV, train=True, rng=adv_rng)
      adv_sum = jnp.sum(loss_fn(logits, adv_labels))
      return adv_w * adv_sum, (state, logits, adv_sum)

    adv_grads, (model_state, adv_logits, adv_sum) = jax.grad(adv_loss, has_aux=True)(params)
    sum_grads = jax.tree.map(jnp.add, first['grads'], adv_grads)
    clean_sum, noise_sum = first['clean_sum'], first['noise_sum']
    clean_logits, noise_logits = first['clean_logits'], first['noise_logits']
    divisors = group_divisors(params, n_clean, n_adv, noise_w, adv_w)
    grads = jax.tree.map(jnp.divide, sum_grads, divisors)
    loss = (clean_sum + noise_w * noise_sum + adv_w * adv_sum) / (n_clean + n_adv * (noise_w + adv_w))
    if config.l2_weight:
      l2, l2_grads = jax.value_and_grad(optim.l2_loss)(params)
      grads = jax.tree.map(lambda g, r: g + config.l2_weight * r, grads, l2_grads)
      loss = loss + config.l2_weight * l2
    metrics = dict(
        clean_loss=clean_sum / n_clean, clean_accuracy=passes_lib.accuracy(clean_logits, labels[:n_clean]),
        adv_loss=adv_sum / n_adv, adv_accuracy=passes_lib.accuracy(adv_logits, adv_labels),
        attack_success=jnp.mean(jnp.argmax(adv_logits, -1) != adv_labels),
        noise_loss=noise_sum / n_adv,
        noise_accuracy=passes_lib.accuracy(noise_logits, labels[n_clean:]),
        loss=loss)
    return grads, model_state, metrics
  return grad_fn


FAST_ADVPROP = base.Method(
    name='fast_advprop', summary='Mei et al. 2022: 80 % clean / 20 % other images attacked with one '
    'step, the attack gradient reused, per-group gradient normalisation',
    make_grad_fn=make_grad_fn, distributions=lambda config: (CLEAN, ADV),
    loader_batch_size=loader_batch_size, validate=validate, relative_cost=relative_cost,
    auxiliary_inputs=auxiliary_inputs)
