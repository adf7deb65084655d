"""Original TF EfficientNet checkpoints (e.g. the efficientnet-bX AdvProp tarballs) -> our Flax variables.

Variable names (RECIPE §6): `<scope>/stem/conv2d/kernel`, `<scope>/blocks_<i>/...` with blocks numbered globally,
`<scope>/head/dense/{kernel,bias}`, BNs `tpu_batch_normalization{,_1,_2}/{gamma,beta,moving_mean,
moving_variance}`. Each variable may have an `/ExponentialMovingAverage` shadow: the shadows are what the
reference evaluates, and they are preferred here. Optimizer slots and global_step are ignored.
"""
import re
from typing import Optional, Union

import flax.linen as nn
import numpy as np

from advprop_jax.convert import mapping

EMA_SUFFIX = '/ExponentialMovingAverage'
# Trailing name parts that are not model weights: EMA shadows, optimizer slots.
_NON_WEIGHT = re.compile(r'/(ExponentialMovingAverage|RMSProp(_\d+)?|Momentum|Adam(_\d+)?)$')
_STEM = '/stem/conv2d/kernel'


def _scope(names, scope: Optional[str]) -> str:
  if scope is not None:
    return scope
  scopes = sorted({n[:-len(_STEM)] for n in names if n.endswith(_STEM)})
  if len(scopes) != 1:
    raise ValueError(f'Cannot tell the model scope of this TF checkpoint (variables ending in {_STEM!r}: '
                     f'{scopes or "none"}); pass scope=...')
  return scopes[0]


def tf_checkpoint_to_flax(path: str, model_name: Union[str, nn.Module], *,
                          num_classes: Optional[int] = None, prefer_ema: bool = True,
                          scope: Optional[str] = None, allow_extra: bool = False, **overrides) -> dict:
  """Flax variables from a TF checkpoint (a path or prefix accepted by tf.train.load_checkpoint).

  scope: the name prefix, e.g. 'efficientnet-b0' (default: found from the stem kernel). prefer_ema: use
  `<name>/ExponentialMovingAverage` where present (the evaluation weights). Variables under the scope that do
  not map to the model raise (listed with missing / mis-shaped ones, in one ValueError) unless allow_extra.
  Auxiliary BNs are initialised from the main ones, as for timm_to_flax.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (slow import; only needed here)
  reader = tf.train.load_checkpoint(path)
  all_shapes = {k: tuple(v) for k, v in reader.get_variable_to_shape_map().items()}
  scope = _scope(all_shapes, scope)
  if num_classes is None and f'{scope}/head/dense/kernel' in all_shapes and isinstance(model_name, str):
    num_classes = all_shapes[f'{scope}/head/dense/kernel'][1]
  module = mapping.resolve_model(model_name, num_classes, **overrides)
  table = mapping.entries(module, 'tf')

  source, shapes = {}, {}
  for e in table:
    full = f'{scope}/{e.name}'
    chosen = full + EMA_SUFFIX if prefer_ema and full + EMA_SUFFIX in all_shapes else full
    if chosen in all_shapes:
      source[e.name], shapes[e.name] = chosen, all_shapes[chosen]
  known = {f'{scope}/{e.name}' for e in table}
  extra = []
  if not allow_extra:
    for name in all_shapes:
      base = name
      while _NON_WEIGHT.search(base):
        base = _NON_WEIGHT.sub('', base)
      if name.startswith(scope + '/') and base not in known:
        extra.append(name)
  shapes.update({name: all_shapes[name] for name in extra})
  mapping.check_foreign(table, shapes, extra, f'TF checkpoint {path} -> {mapping.model_label(model_name)}')
  return mapping.assemble(module, table, lambda name: np.asarray(reader.get_tensor(source[name])), 'tf')
