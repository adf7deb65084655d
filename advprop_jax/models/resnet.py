"""ResNet-50/101/152/200 v1.5 (torchvision layout) with per-distribution BatchNorm.

v1.5 means the stride of a downsampling bottleneck sits on its 3x3 conv (conv2), not on the first 1x1
(torchvision / timm `resnet50` etc.; better accuracy than v1 for the same FLOPs). Every BatchNorm is a
`batchnorm.DistributionBatchNorm`, so one set of conv weights serves several input distributions (AdvProp).

Names map 1:1 onto a torchvision (or timm) state dict, so weights can be ported mechanically:

  torchvision                         Flax (this module)
  conv1.weight [O,I,kh,kw]            params/conv1/kernel [kh,kw,I,O]  (transpose 2,3,1,0)
  bn1.weight / bn1.bias               params/bn1/scale / params/bn1/bias
  bn1.running_mean / running_var      batch_stats/bn1/mean / batch_stats/bn1/var
  layer{s}.{i}.conv{k}.weight         params/layer{s}_{i}/conv{k}/kernel   (k = 1, 2, 3)
  layer{s}.{i}.bn{k}.*                params|batch_stats/layer{s}_{i}/bn{k}/*
  layer{s}.{i}.downsample.0.weight    params/layer{s}_{i}/downsample_conv/kernel
  layer{s}.{i}.downsample.1.*         params|batch_stats/layer{s}_{i}/downsample_bn/*
  fc.weight [O,I] / fc.bias           params/fc/kernel [I,O] (transpose) / params/fc/bias
  bn*.num_batches_tracked             (dropped: momentum is fixed, not cumulative)

Auxiliary distributions D add `scale_D`/`bias_D` next to each BN's params and a `batch_stats_D`
collection mirroring `batch_stats`; a torchvision checkpoint fills the clean ones only.

Padding is explicit and symmetric like torchvision's (stem conv 3, 3x3 convs 1, max-pool 1 with -inf),
not TF 'SAME' (which pads bottom/right only on stride 2 and would shift ported weights by a pixel).

Initialisation follows torchvision: convs kaiming_normal(fan_out, relu) = untruncated normal with
std sqrt(2 / (kh*kw*out)); fc weight and bias uniform(+-1/sqrt(fan_in)) (nn.Linear's default);
BN scale 1 / bias 0, except the last BN of each residual branch (bn3) whose scale is 0 when
`zero_init_residual` (Goyal et al. 2017: every block starts as the identity). That zeroes values
only, so parameter counts are unchanged.
"""
import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from advprop_jax.models import batchnorm

# Bottleneck blocks per stage (torchvision resnet50/101/152; timm resnet200).
STAGE_SIZES = {
    'resnet50': (3, 4, 6, 3),
    'resnet101': (3, 4, 23, 3),
    'resnet152': (3, 8, 36, 3),
    'resnet200': (3, 24, 36, 3),
}
EXPANSION = 4  # bottleneck output channels = EXPANSION * its inner width
STEMS = ('imagenet', 'cifar')


def conv_kernel_init():
  # torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'); JAX's 'normal' is untruncated,
  # like torch's, so a from-scratch run matches the torchvision recipe.
  return nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def dense_bias_init(fan_in: int) -> Callable:
  """nn.Linear's bias init, uniform(+-1/sqrt(fan_in)); a Flax bias init does not see fan_in: a closure."""
  bound = 1.0 / fan_in ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class Bottleneck(nn.Module):
  """1x1 reduce -> 3x3 (stride here: v1.5) -> 1x1 expand, plus identity or 1x1-conv+BN shortcut."""
  width: int
  stride: int
  norm: Any
  dtype: Any = jnp.float32
  zero_init_residual: bool = True

  @nn.compact
  def __call__(self, x, train: bool, distribution):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=conv_kernel_init())

    def norm(y, name, **kwargs):
      return self.norm(name=name, **kwargs)(y, train=train, distribution=distribution)

    out_features = self.width * EXPANSION
    shortcut = x
    y = nn.relu(norm(conv(self.width, (1, 1), name='conv1')(x), 'bn1'))
    y = conv(self.width, (3, 3), strides=(self.stride, self.stride), padding=((1, 1), (1, 1)),
             name='conv2')(y)
    y = nn.relu(norm(y, 'bn2'))
    y = conv(out_features, (1, 1), name='conv3')(y)
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = norm(y, 'bn3', scale_init=last_scale)
    # torchvision adds a projection whenever the shape changes: first block of every stage
    # (channels 64 -> 256 in layer1 even though its stride is 1).
    if self.stride != 1 or x.shape[-1] != out_features:
      shortcut = conv(out_features, (1, 1), strides=(self.stride, self.stride),
                      name='downsample_conv')(x)
      shortcut = norm(shortcut, 'downsample_bn')
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """ResNet v1.5 with per-distribution BatchNorm; same call interface as `EfficientNet`.

  `from_stage`/`to_stage` expose intermediate features (A-FAN perturbs them): stage 0 is the image,
  stage s in 1..len(stage_sizes) the output of residual stage s (torchvision `layer{s}`), and
  `to_stage=None` gives the logits (float32). `model.apply(v, x, to_stage=s)` followed by
  `model.apply(v, feature, from_stage=s)` equals the full forward pass.
  """
  stage_sizes: Sequence[int] = STAGE_SIZES['resnet50']
  base_width: int = 64  # stem channels and layer1 bottleneck width; layer s uses base_width * 2**(s-1)
  num_classes: int = 1000
  dtype: Any = jnp.float32
  distributions: Sequence[str] = ('clean', 'adv')
  bn_axis_name: Optional[Any] = None
  bn_momentum: float = 0.9  # torch's momentum=0.1 on the new value, i.e. 0.9 on the running one
  bn_epsilon: float = 1e-5  # torchvision's default
  zero_init_residual: bool = True
  remat: bool = False
  # 'imagenet': 7x7 stride-2 conv + 3x3 stride-2 max-pool (torchvision). 'cifar': one 3x3
  # stride-1 conv, no max-pool (He et al. 2016, 4.2): at 32 px the ImageNet stem leaves 8x8
  # features for layer1 and 1x1 after layer4. Same parameter names (conv1 3x3 instead of 7x7).
  stem: str = 'imagenet'

  @nn.compact
  def __call__(self, x, *, train: bool = False, distribution=batchnorm.CLEAN,
               from_stage: int = 0, to_stage: Optional[int] = None):
    batchnorm.check_distribution(distribution, self.distributions)
    num_stages = len(self.stage_sizes)
    if not 0 <= from_stage <= num_stages:
      raise ValueError(f'from_stage={from_stage} must be in [0, {num_stages}]')
    if to_stage is not None and not from_stage <= to_stage <= num_stages:
      raise ValueError(f'to_stage={to_stage} must be None or in [from_stage={from_stage}, {num_stages}]')
    if self.base_width < 1 or not self.stage_sizes or min(self.stage_sizes) < 1:
      raise ValueError(f'base_width={self.base_width}, stage_sizes={self.stage_sizes} must be positive')

    norm = functools.partial(batchnorm.DistributionBatchNorm, distributions=tuple(self.distributions),
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             axis_name=self.bn_axis_name, dtype=self.dtype)
    x = x.astype(self.dtype)
    if to_stage == from_stage:  # nothing to run: stage s of a stage-s feature is the feature itself
      return x
    if self.stem not in STEMS:
      raise ValueError(f'stem={self.stem!r} must be one of {STEMS}')
    if from_stage == 0:
      cifar = self.stem == 'cifar'
      kernel, stride, pad = (3, 1, 1) if cifar else (7, 2, 3)
      x = nn.Conv(self.base_width, (kernel, kernel), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), use_bias=False, dtype=self.dtype,
                  kernel_init=conv_kernel_init(), name='conv1')(x)
      x = nn.relu(norm(name='bn1')(x, train=train, distribution=distribution))
      if not cifar:
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pads with -inf

    # static_argnums count self: (self, x, train, distribution) -> train, distribution are static.
    block = nn.remat(Bottleneck, static_argnums=(2, 3)) if self.remat else Bottleneck
    for stage_index, num_blocks in enumerate(self.stage_sizes):
      stage = stage_index + 1
      if stage <= from_stage:
        continue
      width = self.base_width * 2 ** stage_index
      for i in range(num_blocks):
        stride = 2 if i == 0 and stage_index > 0 else 1  # layer1 keeps the max-pool's resolution
        x = block(width, stride, norm=norm, dtype=self.dtype,
                  zero_init_residual=self.zero_init_residual,
                  name=f'layer{stage}_{i}')(x, train, distribution)
      if to_stage == stage:
        return x

    x = jnp.mean(x, axis=(1, 2))
    fan_in = x.shape[-1]
    # torchvision nn.Linear default: kaiming_uniform(a=sqrt(5)) = uniform(+-1/sqrt(fan_in)) = scale 1/3.
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='fc',
                 kernel_init=nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'),
                 bias_init=dense_bias_init(fan_in))(x)
    return x.astype(jnp.float32)
