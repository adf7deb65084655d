"""Per-distribution BatchNorm: AdvProp's main and auxiliary BatchNorms, the core of the method.

Every BatchNorm of a model is a `DistributionBatchNorm`: the convolution weights are shared by every input
distribution (clean images, adversarial images, ...), while each distribution has its own scale, bias and
running statistics. The names below say where each distribution's variables live.
"""
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

CLEAN = 'clean'  # the main distribution: inference uses its BNs only
ADV = 'adv'  # AdvProp's auxiliary (adversarial) distribution


def fine_grained_distribution(index: int) -> str:
  """Name of the auxiliary distribution of fine-grained AdvProp's attack strength `index` (0-based)."""
  return f'{ADV}{index + 1}'


def stats_collection(distribution: str) -> str:
  """Variable collection holding the BN running statistics of `distribution`."""
  return 'batch_stats' if distribution == CLEAN else f'batch_stats_{distribution}'


def param_suffix(distribution: str) -> str:
  """Suffix of the BN scale/bias params of `distribution` ('' for clean, so its tree is a plain BN)."""
  return '' if distribution == CLEAN else f'_{distribution}'


def with_main_bn_of(variables: dict, distribution: str) -> dict:
  """`variables` whose main (clean) BNs are those of `distribution`: its scale, bias and running
  statistics copied into the main BN's names, so that inference (which uses the main BN only) runs
  through the auxiliary BN unchanged, e.g. to evaluate AdvProp's adversarial BN. Convolutions and
  every other parameter are shared and stay as they are."""
  if distribution == CLEAN:
    return variables
  stats = stats_collection(distribution)
  if stats not in variables:
    raise ValueError(f'these variables have no BatchNorm of distribution {distribution!r} (no '
                     f'{stats!r} collection; present: {sorted(variables)})')
  suffix = param_suffix(distribution)

  def swap(tree):
    if not isinstance(tree, dict):
      return tree
    out = {k: swap(v) for k, v in tree.items()}
    for name in ('scale', 'bias'):
      if name + suffix in tree:
        out[name] = tree[name + suffix]
    return out
  return {**variables, 'params': swap(variables['params']),
          stats_collection(CLEAN): variables[stats]}


def distribution_segments(distribution) -> tuple:
  """`distribution` as ((name, size or None), ...).

  A pass normally has one distribution (a name). A *mixed* pass, ((name, size), ...), runs images of
  several distributions through the shared weights as ONE batch: rows [0, size_0) are normalised by the
  BN of name_0, the next size_1 rows by that of name_1, and so on. Convolutions then see one large batch
  instead of several small ones (better accelerator utilisation, one backward pass), while BN statistics
  stay separate per distribution.
  """
  if isinstance(distribution, str):
    return ((distribution, None),)
  segments = tuple((name, int(size)) for name, size in distribution)
  names = [name for name, _ in segments]
  if len(set(names)) != len(names):  # a BN would fold two batches into its running statistics
    raise ValueError(f'mixed distribution {distribution} names a distribution twice')
  return segments


def check_distribution(distribution, distributions: Sequence[str]) -> None:
  for name, _ in distribution_segments(distribution):
    if name not in distributions:
      raise ValueError(f'distribution={name!r} is not one of this model\'s distributions '
                       f'{tuple(distributions)}')


class DistributionBatchNorm(nn.Module):
  """BatchNorm with separate scale, bias and running statistics per input distribution.

  Clean statistics live in collection `batch_stats`, those of distribution D in `batch_stats_D`; the
  clean scale/bias are params `scale`/`bias`, those of D are `scale_D`/`bias_D`. Initialisation creates
  every distribution's variables; a pass touches only its own distribution's, so
  `apply(..., distribution='adv', mutable=['batch_stats_adv'])` can never write the clean statistics.

  `distribution` may also be a mixed batch, ((name, rows), ...): see `distribution_segments`.

  train=True normalises with batch statistics (averaged over the mesh axis `axis_name` when set) and
  updates the running statistics only if the distribution's collection is mutable: that is how an attack
  uses batch statistics without touching running ones. train=False uses the running statistics.
  Statistics are computed and kept in float32 whatever the activation dtype.
  """
  distributions: Sequence[str] = (CLEAN,)
  momentum: float = 0.99
  epsilon: float = 1e-3
  axis_name: Optional[Any] = None
  dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones

  def _variables(self, distribution, features):
    suffix = param_suffix(distribution)
    scale = self.param('scale' + suffix, self.scale_init, (features,), jnp.float32)
    bias = self.param('bias' + suffix, nn.initializers.zeros, (features,), jnp.float32)
    collection = stats_collection(distribution)
    mean = self.variable(collection, 'mean', lambda: jnp.zeros((features,), jnp.float32))
    var = self.variable(collection, 'var', lambda: jnp.ones((features,), jnp.float32))
    return scale, bias, mean, var

  @nn.compact
  def __call__(self, x, *, train: bool, distribution=CLEAN):
    check_distribution(distribution, self.distributions)
    segments = distribution_segments(distribution)
    features = x.shape[-1]
    if self.is_initializing():  # create every distribution's variables, in a fixed order
      for d in self.distributions:
        if d not in dict(segments):
          self._variables(d, features)
    x32 = x.astype(jnp.float32) if train else None
    if len(segments) == 1:
      moments = None
      if train:
        reduce_axes = tuple(range(x.ndim - 1))
        moments = jnp.mean(x32, reduce_axes), jnp.mean(lax.square(x32), reduce_axes)
      mul, add = self._affine(segments[0][0], features, moments)
    else:
      mul, add = self._mixed_affine(x32, x.shape, segments, train)
    return x * mul.astype(self.dtype) + add.astype(self.dtype)

  def _mixed_affine(self, x32, shape, segments, train):
    """Per-row (mul, add) of a mixed batch, shaped to broadcast against it.

    Statistics come from per-row sums over the spatial axes, sliced per segment: slicing the activation
    itself (split + concatenate) costs a pad and an add of the full activation per BN in the backward
    pass; slicing the [batch, channels] sums costs nothing.
    """
    sizes = [size for _, size in segments]
    if sum(sizes) != shape[0]:
      raise ValueError(f'mixed distribution {segments} covers {sum(sizes)} rows; the batch has '
                       f'{shape[0]}')
    if train:
      spatial = tuple(range(1, len(shape) - 1))
      row_sum, row_sq = jnp.sum(x32, spatial), jnp.sum(lax.square(x32), spatial)
      pixels = math.prod(shape[1:-1])
    muls, adds, start = [], [], 0
    for name, size in segments:
      moments = None
      if train:
        rows = slice(start, start + size)
        moments = (jnp.sum(row_sum[rows], 0) / (size * pixels),
                   jnp.sum(row_sq[rows], 0) / (size * pixels))
      mul, add = self._affine(name, shape[-1], moments)
      muls.append(mul)
      adds.append(add)
      start += size
    row_shape = (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)

    def per_row(values):
      rows = [jnp.broadcast_to(v, (size, shape[-1])) for v, size in zip(values, sizes)]
      return jnp.concatenate(rows).reshape(row_shape)
    return per_row(muls), per_row(adds)

  def _affine(self, distribution: str, features: int, moments):
    """(mul, add) with normalised x = x * mul + add, for one distribution.

    moments: the batch's (mean, mean of squares) per channel in train mode (averaged over `axis_name`,
    and folded into the running statistics when the collection is mutable), None to use the running
    statistics.
    """
    scale, bias, ra_mean, ra_var = self._variables(distribution, features)
    if moments is not None:
      mean, mean_sq = moments
      if self.axis_name is not None and not self.is_initializing():
        mean, mean_sq = lax.pmean((mean, mean_sq), self.axis_name)
      var = jnp.maximum(mean_sq - lax.square(mean), 0.0)
      if not self.is_initializing() and self.is_mutable_collection(stats_collection(distribution)):
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    else:
      mean, var = ra_mean.value, ra_var.value
    # Fold normalisation and affine into one multiply-add in the activation dtype.
    mul = scale * lax.rsqrt(var + self.epsilon)
    return mul, bias - mean * mul
