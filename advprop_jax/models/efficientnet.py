"""EfficientNet B0-B8 / L2 (TF reference architecture), built from the B0 block table and scaling rules.

Every BatchNorm is a `DistributionBatchNorm`, so the same weights serve several input distributions
(clean, adversarial, ...) with their own normalisation; see batchnorm.py.
"""
import functools
import math
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from advprop_jax.models import batchnorm
from advprop_jax.models import conv as conv_lib


class StageSpec(NamedTuple):
  repeats: int
  kernel: int
  stride: int
  expand: int
  out: int


# B0 stages (RECIPE §1); every other model scales this table.
B0_STAGES: Tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 16), StageSpec(2, 3, 2, 6, 24), StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80), StageSpec(3, 5, 1, 6, 112), StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320))


class Scaling(NamedTuple):
  width: float
  depth: float
  resolution: int
  dropout: float
  crop_fraction: float


# crop_fraction is timm's crop_pct for the ported weights: the TF reference's S/(S+32) rounded to three
# decimals (1 px off the reference's crop side for many image sizes). predict/export use it for timm-style
# evaluation; the training recipe (configs/efficientnet.py) sets data.crop_fraction=None, the exact rule.
SCALING = {
    'efficientnet-b0': Scaling(1.0, 1.0, 224, 0.2, 0.875),
    'efficientnet-b1': Scaling(1.0, 1.1, 240, 0.2, 0.882),
    'efficientnet-b2': Scaling(1.1, 1.2, 260, 0.3, 0.890),
    'efficientnet-b3': Scaling(1.2, 1.4, 300, 0.3, 0.904),
    'efficientnet-b4': Scaling(1.4, 1.8, 380, 0.4, 0.922),
    'efficientnet-b5': Scaling(1.6, 2.2, 456, 0.4, 0.934),
    'efficientnet-b6': Scaling(1.8, 2.6, 528, 0.5, 0.942),
    'efficientnet-b7': Scaling(2.0, 3.1, 600, 0.5, 0.949),
    'efficientnet-b8': Scaling(2.2, 3.6, 672, 0.5, 0.954),
    # L2 (no timm weights): the unrounded S/(S+32).
    'efficientnet-l2': Scaling(4.3, 5.3, 800, 0.5, 800 / 832),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  scaled = filters * width
  new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if new < 0.9 * scaled:  # never round down by more than 10%
    new += divisor
  return int(new)


def round_repeats(repeats: int, depth: float) -> int:
  return int(math.ceil(depth * repeats))


def conv_kernel_init():
  # TF reference: normal(0, sqrt(2 / fan_out)), fan_out = kh * kw * out_channels.
  return nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _conv(features, kernel_size, *, strides=(1, 1), name=None, use_bias=False, dtype=jnp.float32,
          kernel_init=None):
  """nn.Conv, or the equivalent PointwiseConv for an unstrided 1x1 kernel."""
  kernel_init = kernel_init or conv_kernel_init()
  if tuple(kernel_size) == (1, 1) and tuple(strides) == (1, 1):
    return conv_lib.PointwiseConv(features, use_bias=use_bias, dtype=dtype, kernel_init=kernel_init,
                                  name=name)
  return nn.Conv(features, kernel_size, strides=strides, use_bias=use_bias, dtype=dtype,
                 kernel_init=kernel_init, name=name)


class MBConv(nn.Module):
  """Mobile inverted bottleneck with squeeze-excitation (SE width from the block's input channels)."""
  in_features: int
  out_features: int
  expand: int
  kernel: int
  stride: int
  drop_rate: float
  norm: Any
  dtype: Any = jnp.float32
  depthwise_impl: str = 'auto'
  se_ratio: float = 0.25

  @nn.compact
  def __call__(self, x, train: bool, distribution):
    conv = functools.partial(_conv, use_bias=False, dtype=self.dtype)

    def norm(y, name):
      return self.norm(name=name)(y, train=train, distribution=distribution)

    inputs = x
    hidden = self.in_features * self.expand
    if self.expand != 1:
      x = nn.swish(norm(conv(hidden, (1, 1), name='expand_conv')(x), name='expand_bn'))
    x = conv_lib.DepthwiseConv(self.kernel, self.stride, dtype=self.dtype,
                             implementation=self.depthwise_impl, name='depthwise_conv')(x)
    x = nn.swish(norm(x, name='depthwise_bn'))

    se_features = max(1, int(self.in_features * self.se_ratio))
    se_conv = functools.partial(_conv, kernel_size=(1, 1), use_bias=True, dtype=self.dtype)
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.swish(se_conv(se_features, name='se_reduce')(s))
    x = x * nn.sigmoid(se_conv(hidden, name='se_expand')(s))

    x = norm(conv(self.out_features, (1, 1), name='project_conv')(x), name='project_bn')
    if self.stride == 1 and self.in_features == self.out_features:
      if self.drop_rate > 0:
        x = conv_lib.drop_connect(self.drop_rate, deterministic=not train)(x)
      x = x + inputs
    return x


class EfficientNet(nn.Module):
  """EfficientNet with per-distribution BatchNorm.

  `from_stage`/`to_stage` expose intermediate features (A-FAN perturbs them): stage 0 is the image,
  stage s in 1..7 the output of block-stage s, and `to_stage=None` gives the logits.
  """
  width: float = 1.0
  depth: float = 1.0
  dropout_rate: float = 0.2
  drop_connect_rate: float = 0.2
  num_classes: int = 1000
  dtype: Any = jnp.float32
  distributions: Sequence[str] = ('clean', 'adv')
  bn_axis_name: Optional[Any] = None
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  depthwise_impl: str = 'auto'
  remat: bool = False
  stages: Sequence[StageSpec] = B0_STAGES
  stem_features: int = 32
  head_features: int = 1280
  # 1 for 32 px inputs (CIFAR): B0's five stride-2 layers would leave 1x1 features. No
  # parameter changes.
  stem_stride: int = 2

  @nn.compact
  def __call__(self, x, *, train: bool = False, distribution=batchnorm.CLEAN,
               from_stage: int = 0, to_stage: Optional[int] = None):
    batchnorm.check_distribution(distribution, self.distributions)
    norm = functools.partial(batchnorm.DistributionBatchNorm, distributions=tuple(self.distributions),
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             axis_name=self.bn_axis_name, dtype=self.dtype)
    conv = functools.partial(_conv, use_bias=False, dtype=self.dtype)
    x = x.astype(self.dtype)
    if from_stage == 0:
      x = conv(round_filters(self.stem_features, self.width), (3, 3),
               strides=(self.stem_stride, self.stem_stride), name='stem_conv')(x)
      x = nn.swish(norm(name='stem_bn')(x, train=train, distribution=distribution))

    block = nn.remat(MBConv, static_argnums=(2, 3)) if self.remat else MBConv
    num_blocks = sum(round_repeats(StageSpec(*s).repeats, self.depth) for s in self.stages)
    in_features = round_filters(self.stem_features, self.width)
    index = 0
    for stage_index, stage in enumerate(StageSpec(*s) for s in self.stages):
      out_features = round_filters(stage.out, self.width)
      for i in range(round_repeats(stage.repeats, self.depth)):
        if from_stage <= stage_index:
          x = block(in_features, out_features, stage.expand, stage.kernel,
                    stage.stride if i == 0 else 1,
                    drop_rate=self.drop_connect_rate * index / num_blocks, norm=norm, dtype=self.dtype,
                    depthwise_impl=self.depthwise_impl,
                    name=f'blocks_{stage_index}_{i}')(x, train, distribution)
        in_features = out_features
        index += 1
      if to_stage == stage_index + 1:
        return x

    x = conv(round_filters(self.head_features, self.width), (1, 1), name='head_conv')(x)
    x = nn.swish(norm(name='head_bn')(x, train=train, distribution=distribution))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    # TF reference: uniform(-1/sqrt(num_classes), 1/sqrt(num_classes)).
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='classifier',
                 kernel_init=nn.initializers.variance_scaling(1 / 3, 'fan_out', 'uniform'))(x)
    return x.astype(jnp.float32)
