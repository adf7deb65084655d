"""Layers shared by the model families.

* `DistributionBatchNorm`: one BatchNorm per input distribution (AdvProp's main + auxiliary BNs).
* `DepthwiseConv`: a depthwise convolution whose formulation is chosen per backend.
* `drop_connect`: stochastic depth on a residual branch.
"""
import functools
import math
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


def _same_padding(size: int, kernel: int, stride: int):
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return out, (total // 2, total - total // 2)  # TF 'SAME': the extra pixel goes bottom/right


def _shifted_forward(x, kernel, stride: int):
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


def _shifted_kernel_grad(x, g, k: int, stride: int):
  """d(depthwise_conv_shifted)/d(kernel): sum over (n, i, j) of each tap's input window times g.

  One reduction per tap, run as a `scan` over the taps. Autodiff of the forward gives k*k sibling
  slice-reductions, which XLA:CPU fuses into one slow loop (9 taps of a 16x56x56x144 activation: ~190 ms
  against ~6 ms per tap alone). Strided taps read a space-to-depth phase of the padded input, so every
  tap is an unstrided dynamic_slice.
  """
  n, h, w, c = x.shape
  out_h, pad_h = _same_padding(h, k, stride)
  out_w, pad_w = _same_padding(w, k, stride)
  reach = (k - 1) // stride + 1  # extra phase rows/cols a tap may start at
  # Pad at the end so each phase has out + reach - 1 rows/cols (the extra zeros are never read).
  rows, cols = (out_h + reach) * stride, (out_w + reach) * stride
  xp = jnp.pad(x, ((0, 0), (pad_h[0], rows - h - pad_h[0]), (pad_w[0], cols - w - pad_w[0]), (0, 0)))
  if stride == 1:
    phases = xp[None]
  else:
    phases = jnp.stack([xp[:, p::stride, q::stride] for p in range(stride) for q in range(stride)])
  taps = jnp.asarray([((a % stride) * stride + b % stride, a // stride, b // stride)
                      for a in range(k) for b in range(k)], jnp.int32)

  def tap(_, t):
    window = lax.dynamic_slice(phases, (t[0], 0, t[1], t[2], 0), (1, n, out_h, out_w, c))[0]
    return None, jnp.sum(window * g, axis=(0, 1, 2))

  return lax.scan(tap, None, taps)[1].reshape(k, k, 1, c)


def _shifted_input_grad_strided(g, kernel, x_shape, stride: int):
  """d(depthwise_conv_shifted)/dx for stride > 1, by output phase (depth-to-space).

  Autodiff transposes each strided tap into an interior-padded copy of g (25 of them for a 5x5 kernel);
  instead, padded-input row s*u+p only receives taps a = s*m+p, so each of the s*s phases is an
  unstrided shifted sum over g, and the phases are interleaved once.
  """
  k = kernel.shape[0]
  n, h, w, c = x_shape
  out_h, pad_h = _same_padding(h, k, stride)
  out_w, pad_w = _same_padding(w, k, stride)
  reach = (k - 1) // stride + 1
  rows, cols = out_h + reach, out_w + reach
  gp = jnp.pad(g, ((0, 0), (reach - 1, reach), (reach - 1, reach), (0, 0)))
  phases = []
  for p in range(stride):
    for q in range(stride):
      acc = None
      for m in range((k - p + stride - 1) // stride):
        for l in range((k - q + stride - 1) // stride):
          window = lax.slice(gp, (0, reach - 1 - m, reach - 1 - l, 0),
                             (n, reach - 1 - m + rows, reach - 1 - l + cols, c))
          term = window * kernel[stride * m + p, stride * l + q, 0]
          acc = term if acc is None else acc + term
      phases.append(acc)
  dxp = jnp.stack(phases).reshape(stride, stride, n, rows, cols, c)
  dxp = dxp.transpose(2, 3, 0, 4, 1, 5).reshape(n, rows * stride, cols * stride, c)
  return dxp[:, pad_h[0]:pad_h[0] + h, pad_w[0]:pad_w[0] + w]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv_shifted(x, kernel, stride: int):
  """Depthwise conv as k*k strided slices times per-channel weights, 'SAME' padding.

  Written by hand because XLA:CPU lowers grouped convolutions with feature_group_count=C to a slow
  generic loop (about 8x slower forward, 12x backward on B0 shapes); on GPU/TPU the native op wins.
  The input gradient is the autodiff of the forward (one fused loop) at stride 1, by output phase
  otherwise (`_shifted_input_grad_strided`); the kernel gradient is computed tap by tap
  (`_shifted_kernel_grad`).
  """
  return _shifted_forward(x, kernel, stride)


def _shifted_fwd(x, kernel, stride):
  return _shifted_forward(x, kernel, stride), (x, kernel)


def _shifted_bwd(stride, residuals, g):
  x, kernel = residuals
  if stride == 1:
    _, x_vjp = jax.vjp(lambda x_: _shifted_forward(x_, kernel, stride), x)
    (dx,) = x_vjp(g)
  else:
    dx = _shifted_input_grad_strided(g, kernel, x.shape, stride)
  dk = _shifted_kernel_grad(x, g, kernel.shape[0], stride).astype(kernel.dtype)
  return dx, dk


depthwise_conv_shifted.defvjp(_shifted_fwd, _shifted_bwd)


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
