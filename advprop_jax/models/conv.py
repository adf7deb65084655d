"""Convolution kernels shared by the model families: depthwise (per backend), pointwise, drop-connect.

XLA:CPU runs grouped (depthwise) convolutions and the gradients of 1x1 convolutions through slow generic
loops; the formulations here compute the same functions with ops it runs fast. On GPU/TPU the native ops
are used (see `resolve_depthwise_impl`).
"""
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


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


def resolve_depthwise_impl(implementation: str, platform: Optional[str] = None) -> str:
  """'auto' -> 'shifted' on CPU, 'grouped' elsewhere. `platform` is the backend the program is compiled
  for (default: JAX's default backend); ahead-of-time compilation for a TPU from a CPU host passes 'tpu'."""
  if implementation not in DEPTHWISE_IMPLEMENTATIONS:
    raise ValueError(f'depthwise_impl={implementation!r}; allowed: {DEPTHWISE_IMPLEMENTATIONS}')
  if implementation == 'auto':
    return 'shifted' if (platform or jax.default_backend()) == 'cpu' else 'grouped'
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


class PointwiseConv(nn.Module):
  """A 1x1 convolution computed as a matmul over the channel axis.

  Same parameters as `nn.Conv(features, (1, 1))` (a 'kernel' [1, 1, in, out], optional 'bias', same
  initialisers and RNG paths), so checkpoints and converters see no difference. XLA:CPU runs the
  gradients of a 1x1 `conv_general_dilated` as generic convolutions, 3-10x slower than the equivalent
  dot on B0 shapes; on GPU/TPU a 1x1 conv becomes the same GEMM either way.
  """
  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', self.kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', self.bias_init, (self.features,), jnp.float32) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))
    if bias is not None:
      y = y + bias
    return y


def drop_connect(rate: float, *, deterministic: bool, name: Optional[str] = None) -> nn.Module:
  """Stochastic depth: drops a whole residual branch per sample, scaling the kept ones by 1/(1-rate)."""
  return nn.Dropout(rate=rate, broadcast_dims=(1, 2, 3), deterministic=deterministic, name=name)
