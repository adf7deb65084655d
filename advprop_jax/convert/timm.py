"""timm `tf_efficientnet_b{0..8}` (e.g. the `.ap_in1k` AdvProp weights) and `resnet50/101/152/200` <-> our Flax
EfficientNet / ResNet.

timm layouts: conv OIHW (depthwise [C, 1, k, k]), Linear [out, in], BN weight/bias/running_mean/running_var
(+ the integer buffer num_batches_tracked, which holds no weights: ignored on import, written as 0 on export
so that `model.load_state_dict(sd, strict=True)` never depends on torch's BN version fallback).
"""
import os
from typing import Dict, Mapping, Optional, Union

from safetensors import SafetensorError, safe_open
from safetensors import numpy as safetensors_numpy

import flax.linen as nn
import numpy as np

from advprop_jax.convert import mapping

NUM_BATCHES_TRACKED = 'num_batches_tracked'
_TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt', '.tar')
# The classifier of each model family: timm name of its weight [out, in], Flax module name (kernel [in, out]).
_CLASSIFIERS = (('classifier.weight', 'classifier'), ('fc.weight', 'fc'))


def _num_classes(state_dict: Mapping, num_classes: Optional[int], model_name) -> Optional[int]:
  if num_classes is None and isinstance(model_name, str):
    for name, _ in _CLASSIFIERS:
      if name in state_dict:
        return int(np.shape(state_dict[name])[0])
  return num_classes


def num_classes_of(variables: Mapping) -> Optional[int]:
  """Output size of the classifier (EfficientNet 'classifier', ResNet 'fc') of Flax variables, else None."""
  for _, module in _CLASSIFIERS:
    try:
      return int(np.shape(variables['params'][module]['kernel'])[1])
    except (KeyError, TypeError, IndexError):
      continue
  return None


def timm_to_flax(state_dict: Mapping[str, np.ndarray], model_name: Union[str, nn.Module], *,
                 num_classes: Optional[int] = None, **overrides) -> dict:
  """Flax variables (params, batch_stats, batch_stats_<d> ...) from a timm state dict.

  `model_name` is a registry name (then `overrides` are create_model overrides, e.g. width/depth for tiny
  variants, distributions=...) or a module. num_classes defaults to classifier.weight's row count. Every
  auxiliary distribution's BN (scale_<d>, bias_<d>, batch_stats_<d>) starts as a copy of the main BN.
  Missing, unexpected or mis-shaped tensors raise one ValueError listing the first of them by name.
  """
  module = mapping.resolve_model(model_name, _num_classes(state_dict, num_classes, model_name), **overrides)
  table = mapping.entries(module, 'timm')
  expected = {e.name for e in table}
  bn_prefixes = {e.name.rsplit('.', 1)[0] for e in table if e.name.endswith('.running_mean')}
  shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
  extra = [k for k in shapes if k not in expected and not (
      k.endswith('.' + NUM_BATCHES_TRACKED) and k.rsplit('.', 1)[0] in bn_prefixes)]
  mapping.check_foreign(table, shapes, extra,
                        f'timm state dict -> {mapping.model_label(model_name)} {_describe(overrides)}')
  return mapping.assemble(module, table, lambda name: state_dict[name], 'timm')


def flax_to_timm(variables: Mapping, model_name: Union[str, nn.Module], *,
                 num_classes: Optional[int] = None, include_num_batches_tracked: bool = True,
                 **overrides) -> Dict[str, np.ndarray]:
  """timm state dict (numpy, timm layouts) of the MAIN distribution of `variables`.

  Auxiliary-distribution variables are ignored (they may be present or absent). num_classes defaults to the
  classifier kernel's column count. Loads into timm's `tf_efficientnet_bX` / `resnetN`
  (timm.create_model(..., num_classes=...)) with load_state_dict(strict=True).
  """
  if num_classes is None and isinstance(model_name, str):
    num_classes = num_classes_of(variables)
  module = mapping.resolve_model(model_name, num_classes, **overrides)
  table = mapping.entries(module, 'timm')
  state = mapping.export_main(variables, module, table, 'timm',
                              f'Flax variables -> timm {mapping.model_label(model_name)}')
  if include_num_batches_tracked:
    for e in table:
      if e.name.endswith('.running_mean'):
        state[e.name.rsplit('.', 1)[0] + '.' + NUM_BATCHES_TRACKED] = np.zeros((), np.int64)
  return dict(sorted(state.items()))


def _describe(overrides) -> str:
  return f'(overrides {overrides})' if overrides else ''


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """name -> numpy array from a .safetensors file (preferred) or a torch file (.pth/.pt/.bin).

  Torch files are pickles: they are only ever read with torch.load(..., weights_only=True), which refuses
  arbitrary objects; torch must be installed for them. Training checkpoints holding 'state_dict_ema',
  'state_dict' or 'model' are unwrapped (EMA first) and a DataParallel 'module.' prefix is stripped.
  """
  path = os.fspath(path)
  if path.endswith('.safetensors'):
    try:
      return dict(safetensors_numpy.load_file(path))
    except SafetensorError as e:
      raise ValueError(f'{path}: not a readable safetensors file ({e})') from e
  if path.endswith(_TORCH_SUFFIXES):
    try:
      import torch
    except ImportError as e:
      raise ImportError(f'{path} is a torch pickle: reading it needs torch (it is loaded with '
                        'weights_only=True). Install torch, or convert the file to .safetensors.') from e
    obj = torch.load(path, map_location='cpu', weights_only=True)
    for key in ('state_dict_ema', 'state_dict', 'model'):
      if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
        obj = obj[key]
        break
    if not isinstance(obj, Mapping):
      raise ValueError(f'{path} does not hold a state dict (got {type(obj).__name__})')
    result = {}
    for k, v in obj.items():
      k = k[len('module.'):] if k.startswith('module.') else k
      v = v.detach().cpu()
      result[k] = (v.float() if v.is_floating_point() else v).numpy()
    return result
  raise ValueError(f'Unknown weight file type {path!r}: expected .safetensors or one of {_TORCH_SUFFIXES}')


def load_timm_checkpoint(path: str, model_name: Union[str, nn.Module], **kwargs) -> dict:
  """timm_to_flax(load_state_dict(path), model_name, **kwargs)."""
  return timm_to_flax(load_state_dict(path), model_name, **kwargs)


def save_timm_safetensors(variables: Mapping, model_name: Union[str, nn.Module], path: str,
                          metadata: Optional[Mapping[str, str]] = None, **kwargs) -> Dict[str, np.ndarray]:
  """Writes flax_to_timm(variables, model_name, **kwargs) to a safetensors file; returns the dict.

  `metadata` (str -> str) is stored in the file's header next to {'format': 'pt'}."""
  state = flax_to_timm(variables, model_name, **kwargs)
  safetensors_numpy.save_file(state, os.fspath(path), metadata={**dict(metadata or {}), 'format': 'pt'})
  return state


def safetensors_metadata(path: str) -> Dict[str, str]:
  """The str -> str metadata of a .safetensors file's header ({} when it has none); reads no tensor."""
  try:
    with safe_open(os.fspath(path), framework='np') as f:
      return dict(f.metadata() or {})
  except SafetensorError as e:
    raise ValueError(f'{path}: not a readable safetensors file ({e})') from e
