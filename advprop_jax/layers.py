"""Layers shared by the model families.

* `DistributionBatchNorm`: one BatchNorm per input distribution (AdvProp's main + auxiliary BNs).
* `DepthwiseConv`: a depthwise convolution whose formulation is chosen per backend.
* `drop_connect`: stochastic depth on a residual branch.
"""
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CLEAN = 'clean'


def stats_collection(distribution: str) -> str:
  """Variable collection holding the BN running statistics of `distribution`."""
  return 'batch_stats' if distribution == CLEAN else f'batch_stats_{distribution}'


def param_suffix(distribution: str) -> str:
  """Suffix of the BN scale/bias params of `distribution` ('' for clean, so its tree is a plain BN)."""
  return '' if distribution == CLEAN else f'_{distribution}'


def check_distribution(distribution: str, distributions: Sequence[str]) -> None:
  if distribution not in distributions:
    raise ValueError(f'distribution={distribution!r} is not one of this model\'s distributions '
                     f'{tuple(distributions)}')


class DistributionBatchNorm(nn.Module):
  """BatchNorm with separate scale, bias and running statistics per input distribution.

  Clean statistics live in collection `batch_stats`, those of distribution D in `batch_stats_D`; the
  clean scale/bias are params `scale`/`bias`, those of D are `scale_D`/`bias_D`. Initialisation creates
  every distribution's variables; a pass touches only its own distribution's, so
  `apply(..., distribution='adv', mutable=['batch_stats_adv'])` can never write the clean statistics.

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
  def __call__(self, x, *, train: bool, distribution: str = CLEAN):
    check_distribution(distribution, self.distributions)
    features = x.shape[-1]
    if self.is_initializing():  # create every distribution's variables, in a fixed order
      for d in self.distributions:
        if d != distribution:
          self._variables(d, features)
    scale, bias, ra_mean, ra_var = self._variables(distribution, features)

    if train:
      x32 = x.astype(jnp.float32)
      reduce_axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, reduce_axes)
      mean_sq = jnp.mean(lax.square(x32), reduce_axes)
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
    add = bias - mean * mul
    return x * mul.astype(self.dtype) + add.astype(self.dtype)


def _same_padding(size: int, kernel: int, stride: int):
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return out, (total // 2, total - total // 2)  # TF 'SAME': the extra pixel goes bottom/right


def depthwise_conv_shifted(x, kernel, stride: int):
  """Depthwise conv as k*k strided slices times per-channel weights, 'SAME' padding.

  Written by hand because XLA:CPU lowers grouped convolutions with feature_group_count=C to a slow
  generic loop (about 8x slower forward, 12x backward on B0 shapes); on GPU/TPU the native op wins.
  """
  k = kernel.shape[0]
  _, h, w, _ = x.shape
  out_h, pad_h = _same_padding(h, k, stride)
  out_w, pad_w = _same_padding(w, k, stride)
  xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  out = None
  for a in range(k):
    for b in range(k):
      patch = lax.slice(xp, (0, a, b, 0),
                        (xp.shape[0], a + (out_h - 1) * stride + 1, b + (out_w - 1) * stride + 1,
                         xp.shape[3]), (1, stride, stride, 1))
      term = patch * kernel[a, b, 0]
      out = term if out is None else out + term
  return out


def depthwise_conv_grouped(x, kernel, stride: int):
  return lax.conv_general_dilated(
      x, kernel, (stride, stride), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=x.shape[-1])


DEPTHWISE_IMPLEMENTATIONS = ('auto', 'shifted', 'grouped')


def resolve_depthwise_impl(implementation: str) -> str:
  if implementation not in DEPTHWISE_IMPLEMENTATIONS:
    raise ValueError(f'depthwise_impl={implementation!r}; allowed: {DEPTHWISE_IMPLEMENTATIONS}')
  if implementation == 'auto':
    return 'shifted' if jax.default_backend() == 'cpu' else 'grouped'
  return implementation


class DepthwiseConv(nn.Module):
  """Depthwise 'SAME' convolution, kernel [k, k, 1, C] (the layout of nn.Conv with feature_group_count=C)."""
  kernel_size: int
  strides: int = 1
  dtype: Any = jnp.float32
  implementation: str = 'auto'
  # TF's initialiser: normal(0, sqrt(2 / fan_out)) with fan_out = k*k for a depthwise kernel.
  kernel_init: Callable = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal',
                                                           in_axis=-1, out_axis=-2)

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (k, k, 1, x.shape[-1]), jnp.float32)
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    if resolve_depthwise_impl(self.implementation) == 'shifted':
      return depthwise_conv_shifted(x, kernel, self.strides)
    return depthwise_conv_grouped(x, kernel, self.strides)


def drop_connect(rate: float, *, deterministic: bool, name: Optional[str] = None) -> nn.Module:
  """Stochastic depth: drops a whole residual branch per sample, scaling the kept ones by 1/(1-rate)."""
  return nn.Dropout(rate=rate, broadcast_dims=(1, 2, 3), deterministic=deterministic, name=name)
