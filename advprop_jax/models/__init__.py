"""Model registry: `create_model(name, ...)` builds any supported network by name."""
import dataclasses
from typing import Any, Callable, Dict

import flax.linen as nn
import jax.numpy as jnp

from advprop_jax.models import efficientnet
from advprop_jax.models import resnet

# name -> (constructor, default keyword arguments)
_REGISTRY: Dict[str, tuple] = {
    name: (efficientnet.EfficientNet,
           dict(width=s.width, depth=s.depth, dropout_rate=s.dropout))
    for name, s in efficientnet.SCALING.items()
}


def register(name: str, constructor: Callable[..., nn.Module], **defaults) -> None:
  _REGISTRY[name] = (constructor, defaults)


# ResNet v1.5: 224 px / 0.875 crop, which default_image_size / default_crop_fraction give non-EfficientNets.
for _name, _stage_sizes in resnet.STAGE_SIZES.items():
  register(_name, resnet.ResNet, stage_sizes=_stage_sizes)


def model_names():
  return tuple(sorted(_REGISTRY))


def _check_name(name: str):
  if name not in _REGISTRY:
    raise ValueError(f'Unknown model name {name!r}; valid names: {", ".join(model_names())}')


def default_image_size(name: str) -> int:
  """Native training resolution of `name` (RECIPE §1)."""
  _check_name(name)
  return efficientnet.SCALING[name].resolution if name in efficientnet.SCALING else 224


def default_crop_fraction(name: str) -> float:
  _check_name(name)
  return efficientnet.SCALING[name].crop_fraction if name in efficientnet.SCALING else 0.875


def num_feature_stages(name: str, overrides=None) -> int:
  """Number of block stages of model `name` whose outputs `from_stage`/`to_stage` name (A-FAN)."""
  _check_name(name)
  overrides = overrides.to_dict() if hasattr(overrides, 'to_dict') else dict(overrides or {})
  constructor, defaults = _REGISTRY[name]
  kwargs = {**defaults, **{k: v for k, v in overrides.items() if v is not None}}
  if constructor is efficientnet.EfficientNet:
    return len(kwargs.get('stages', efficientnet.B0_STAGES))
  return len(kwargs['stage_sizes'])


def check_overrides(name: str, overrides) -> None:
  """ValueError naming the first override that model `name` does not have or cannot take."""
  _check_name(name)
  constructor, defaults = _REGISTRY[name]
  fields = {f.name for f in dataclasses.fields(constructor) if f.init and f.name not in ('parent', 'name')}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f'{", ".join(unknown)} {"is not a field" if len(unknown) == 1 else "are not fields"} '
                     f'of model {name!r}; its fields: {", ".join(sorted(fields))}')
  kwargs = {**defaults, **overrides}
  distributions = tuple(kwargs.get('distributions', ('clean', 'adv')))
  if 'clean' not in distributions or len(set(distributions)) != len(distributions):
    raise ValueError(f'distributions={distributions!r} must contain \'clean\' and no duplicates')
  for field in ('width', 'depth'):
    if field in kwargs and not kwargs[field] > 0:
      raise ValueError(f'{field}={kwargs[field]!r} must be > 0')
  for field in ('dropout_rate', 'drop_connect_rate'):
    if field in kwargs and not 0 <= kwargs[field] < 1:
      raise ValueError(f'{field}={kwargs[field]!r} must be in [0, 1)')
  if 'stem' in kwargs and kwargs['stem'] not in resnet.STEMS:
    raise ValueError(f'stem={kwargs["stem"]!r} must be one of {resnet.STEMS}')
  if 'stem_stride' in kwargs and not (isinstance(kwargs['stem_stride'], int)
                                      and kwargs['stem_stride'] >= 1):
    raise ValueError(f'stem_stride={kwargs["stem_stride"]!r} must be an integer >= 1')


def create_model(name: str, *, num_classes: int = 1000, dtype: Any = jnp.float32,
                 **overrides) -> nn.Module:
  """Builds model `name` (see `model_names()`); `overrides` set any constructor field.

  Example: create_model('efficientnet-b0', width=0.25, depth=0.34, num_classes=10) for a tiny variant.
  """
  check_overrides(name, overrides)
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f'num_classes must be a positive integer, got {num_classes!r}')
  constructor, defaults = _REGISTRY[name]
  return constructor(**{**defaults, **overrides, 'num_classes': num_classes, 'dtype': dtype})
