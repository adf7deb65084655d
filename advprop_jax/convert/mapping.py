"""Name/layout mapping between our Flax models and foreign checkpoints (timm; TF reference for EfficientNet).

The Flax model is the source of truth: `entries(module, scheme)` walks the variable shapes that
`jax.eval_shape(module.init)` produces (no weights are computed) and gives, for every variable of the main
('clean') distribution, the foreign tensor name, the foreign layout and the Flax path. Tiny variants built with
`create_model(..., width=..., depth=...)` are therefore covered exactly like the full-size models.

ResNets map onto timm's (= torchvision's) `resnet50` ... names (models/resnet.py's table); they have no TF
reference names.

Auxiliary distributions (AdvProp's 'adv', fine-grained 'adv1', ...) have no foreign counterpart: on import they
are initialised as copies of the main BN (so AdvProp fine-tuning can start from a pretrained model), on export
they are dropped.
"""
import dataclasses
import re
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from advprop_jax.models import batchnorm
from advprop_jax.models import create_model
from advprop_jax.models import resnet

Path = Tuple[str, ...]  # (collection, module, ..., leaf)
CLEAN = batchnorm.CLEAN
MAX_LISTED = 20  # mismatches listed in one error message

# Flax module name -> timm module name, per block type (RECIPE §6).
_TIMM_TOP = {'stem_conv': 'conv_stem', 'stem_bn': 'bn1', 'head_conv': 'conv_head', 'head_bn': 'bn2',
             'classifier': 'classifier'}
_SE_TIMM = {'se_reduce': 'se.conv_reduce', 'se_expand': 'se.conv_expand'}
_TIMM_IR = {'expand_conv': 'conv_pw', 'expand_bn': 'bn1', 'depthwise_conv': 'conv_dw', 'depthwise_bn': 'bn2',
            'project_conv': 'conv_pwl', 'project_bn': 'bn3', **_SE_TIMM}
_TIMM_DS = {'depthwise_conv': 'conv_dw', 'depthwise_bn': 'bn1', 'project_conv': 'conv_pw',
            'project_bn': 'bn2', **_SE_TIMM}
_TIMM_LEAF = {'kernel': 'weight', 'bias': 'bias', 'scale': 'weight', 'mean': 'running_mean',
              'var': 'running_var'}

# TF reference (tensorflow/tpu efficientnet_model.py); blocks are numbered globally blocks_0..blocks_{N-1}.
_TF_TOP = {'stem_conv': 'stem/conv2d', 'stem_bn': 'stem/tpu_batch_normalization', 'head_conv': 'head/conv2d',
           'head_bn': 'head/tpu_batch_normalization', 'classifier': 'head/dense'}
_SE_TF = {'se_reduce': 'se/conv2d', 'se_expand': 'se/conv2d_1'}
_TF_IR = {'expand_conv': 'conv2d', 'expand_bn': 'tpu_batch_normalization',
          'depthwise_conv': 'depthwise_conv2d', 'depthwise_bn': 'tpu_batch_normalization_1',
          'project_conv': 'conv2d_1', 'project_bn': 'tpu_batch_normalization_2', **_SE_TF}
_TF_DS = {'depthwise_conv': 'depthwise_conv2d', 'depthwise_bn': 'tpu_batch_normalization',
          'project_conv': 'conv2d', 'project_bn': 'tpu_batch_normalization_1', **_SE_TF}
_TF_LEAF = {'kernel': 'kernel', 'bias': 'bias', 'mean': 'moving_mean', 'var': 'moving_variance'}
_TF_BN_LEAF = {'scale': 'gamma', 'bias': 'beta', 'mean': 'moving_mean', 'var': 'moving_variance'}

# Flax layout <- foreign layout, per scheme and tensor kind (transpose axes; None = identity).
_TO_FLAX = {
    'timm': {'conv': (2, 3, 1, 0), 'depthwise': (2, 3, 1, 0), 'dense': (1, 0), 'vector': None},
    'tf': {'conv': None, 'depthwise': (0, 1, 3, 2), 'dense': None, 'vector': None},
}
_BLOCK = re.compile(r'^blocks_(\d+)_(\d+)$')
# ResNet (torchvision / timm names): Flax module inside a bottleneck `layer{s}_{i}` -> timm module.
_RESNET_TOP = ('conv1', 'bn1', 'fc')
_RESNET_BLOCK = re.compile(r'^layer(\d+)_(\d+)$')
_RESNET_IN_BLOCK = {'conv1': 'conv1', 'bn1': 'bn1', 'conv2': 'conv2', 'bn2': 'bn2', 'conv3': 'conv3',
                    'bn3': 'bn3', 'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}


@dataclasses.dataclass(frozen=True)
class Entry:
  name: str                    # foreign tensor name
  path: Path                   # Flax path, collection first
  kind: str                    # conv | depthwise | dense | vector
  shape: Tuple[int, ...]       # Flax shape
  foreign_shape: Tuple[int, ...]

  def to_flax(self, value: np.ndarray, scheme: str) -> np.ndarray:
    axes = _TO_FLAX[scheme][self.kind]
    return value if axes is None else np.transpose(value, axes)

  def from_flax(self, value: np.ndarray, scheme: str) -> np.ndarray:
    axes = _TO_FLAX[scheme][self.kind]
    return value if axes is None else np.transpose(value, np.argsort(axes))


def resolve_model(model: Union[str, nn.Module], num_classes: Optional[int] = None,
                  **overrides) -> nn.Module:
  """A module from a registry name (+ create_model overrides) or the module itself."""
  if isinstance(model, nn.Module):
    if overrides or num_classes is not None:
      raise ValueError('Pass overrides/num_classes only with a model name, not with a module')
    return model
  return create_model(model, num_classes=1000 if num_classes is None else num_classes, **overrides)


def model_label(model: Union[str, nn.Module]) -> str:
  return model if isinstance(model, str) else type(model).__name__


_SHAPE_CACHE: Dict[Tuple[type, str], Dict[Path, jax.ShapeDtypeStruct]] = {}


def abstract_variables(module: nn.Module) -> Dict[Path, jax.ShapeDtypeStruct]:
  """Flat {path: ShapeDtypeStruct} of module.init's variables, from jax.eval_shape (no compute).

  Cached per module configuration (type + repr, which lists every field): tracing B8's init takes seconds.
  """
  key = (type(module), repr(module))
  if key not in _SHAPE_CACHE:
    traced = module.clone(depthwise_impl='grouped') if hasattr(module, 'depthwise_impl') else module
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)  # variable shapes do not depend on the size
    shapes = jax.eval_shape(lambda x: traced.init(jax.random.key(0), x, train=False), x)
    if len(_SHAPE_CACHE) >= 32:
      _SHAPE_CACHE.clear()
    _SHAPE_CACHE[key] = traverse_util.flatten_dict(dict(shapes))
  return dict(_SHAPE_CACHE[key])


def split_distribution(path: Path, distributions: Iterable[str]) -> Tuple[str, Path]:
  """(distribution, path of the corresponding main-distribution variable)."""
  collection, leaf = path[0], path[-1]
  for d in distributions:
    if d == CLEAN:
      continue
    if collection == batchnorm.stats_collection(d):
      return d, ('batch_stats',) + path[1:]
    if collection == 'params' and leaf in ('scale' + batchnorm.param_suffix(d), 'bias' + batchnorm.param_suffix(d)):
      return d, path[:-1] + (leaf[:-len(batchnorm.param_suffix(d))],)
  return CLEAN, path


def _distributions(module: nn.Module) -> Tuple[str, ...]:
  return tuple(getattr(module, 'distributions', (CLEAN,)))


def main_paths(module: nn.Module) -> Dict[Path, jax.ShapeDtypeStruct]:
  flat = abstract_variables(module)
  dists = _distributions(module)
  return {p: s for p, s in flat.items() if split_distribution(p, dists)[0] == CLEAN}


def _foreign_name(path: Path, scheme: str, block_kinds: Dict[str, str], block_index: Dict[str, int],
                  kind: str) -> str:
  collection, modules, leaf = path[0], path[1:-1], path[-1]
  top = _TIMM_TOP if scheme == 'timm' else _TF_TOP
  if len(modules) == 1 and modules[0] in top:
    prefix, module_name = top[modules[0]], modules[0]
  elif len(modules) == 2 and _BLOCK.match(modules[0]):
    table = {('timm', 'ir'): _TIMM_IR, ('timm', 'ds'): _TIMM_DS, ('tf', 'ir'): _TF_IR,
             ('tf', 'ds'): _TF_DS}[scheme, block_kinds[modules[0]]]
    if modules[1] not in table:
      raise ValueError(f'No {scheme} name for Flax module {"/".join(modules)}')
    stage, i = _BLOCK.match(modules[0]).groups()
    block = f'blocks.{stage}.{i}' if scheme == 'timm' else f'blocks_{block_index[modules[0]]}'
    prefix, module_name = f'{block}{"." if scheme == "timm" else "/"}{table[modules[1]]}', modules[1]
  else:
    raise ValueError(f'No {scheme} name for Flax variable {"/".join(path)}: not an EfficientNet layer')
  if collection not in ('params', 'batch_stats'):
    raise ValueError(f'Unexpected variable collection {collection!r} at {"/".join(path)}')
  if scheme == 'timm':
    return f'{prefix}.{_TIMM_LEAF[leaf]}'
  if module_name.endswith('_bn'):
    return f'{prefix}/{_TF_BN_LEAF[leaf]}'
  return f'{prefix}/{"depthwise_kernel" if kind == "depthwise" else _TF_LEAF[leaf]}'


def _resnet_name(path: Path) -> str:
  collection, modules, leaf = path[0], path[1:-1], path[-1]
  if len(modules) == 1 and modules[0] in _RESNET_TOP:
    prefix = modules[0]
  elif len(modules) == 2 and _RESNET_BLOCK.match(modules[0]) and modules[1] in _RESNET_IN_BLOCK:
    stage, i = _RESNET_BLOCK.match(modules[0]).groups()
    prefix = f'layer{stage}.{i}.{_RESNET_IN_BLOCK[modules[1]]}'
  else:
    raise ValueError(f'No timm name for Flax variable {"/".join(path)}: not a ResNet layer')
  if collection not in ('params', 'batch_stats'):
    raise ValueError(f'Unexpected variable collection {collection!r} at {"/".join(path)}')
  return f'{prefix}.{_TIMM_LEAF[leaf]}'


def _kind(path: Path, shape: Tuple[int, ...]) -> str:
  if len(shape) == 4:
    return 'depthwise' if path[-2] == 'depthwise_conv' else 'conv'
  if len(shape) == 2:
    return 'dense'
  return 'vector'


def entries(module: nn.Module, scheme: str) -> List[Entry]:
  """Every main-distribution Flax variable of `module` with its foreign ('timm' | 'tf') name and layout."""
  if scheme not in _TO_FLAX:
    raise ValueError(f'scheme must be one of {tuple(_TO_FLAX)}, got {scheme!r}')
  paths = main_paths(module)
  if isinstance(module, resnet.ResNet):
    if scheme != 'timm':
      raise ValueError(f'{type(module).__name__} has timm (torchvision) names only, no {scheme!r} names')
    names = {path: _resnet_name(path) for path in paths}
  else:
    names = _efficientnet_names(paths, scheme)
  result = []
  for path, struct in paths.items():
    shape = tuple(struct.shape)
    kind = _kind(path, shape)
    axes = _TO_FLAX[scheme][kind]
    foreign_shape = shape if axes is None else tuple(shape[a] for a in np.argsort(axes))
    result.append(Entry(names[path], path, kind, shape, foreign_shape))
  listed = [e.name for e in result]
  if len(set(listed)) != len(listed):  # would be a bug in the tables above
    duplicates = sorted(n for n in set(listed) if listed.count(n) > 1)
    raise AssertionError(f'Duplicate {scheme} names in the mapping: {duplicates}')
  return sorted(result, key=lambda e: e.name)


def _efficientnet_names(paths, scheme: str) -> Dict[Path, str]:
  blocks = sorted({p[1] for p in paths if _BLOCK.match(p[1])},
                  key=lambda b: tuple(int(g) for g in _BLOCK.match(b).groups()))
  block_index = {b: i for i, b in enumerate(blocks)}
  block_kinds = {b: 'ir' if ('params', b, 'expand_conv', 'kernel') in paths else 'ds' for b in blocks}
  return {path: _foreign_name(path, scheme, block_kinds, block_index, _kind(path, tuple(s.shape)))
          for path, s in paths.items()}


def raise_problems(problems: List[str], what: str) -> None:
  """ONE ValueError listing the first problems (by tensor name)."""
  if problems:
    listed = '\n  '.join(problems[:MAX_LISTED])
    more = f'\n  ... and {len(problems) - MAX_LISTED} more' if len(problems) > MAX_LISTED else ''
    raise ValueError(f'{what}: {len(problems)} mismatch(es):\n  {listed}{more}')


def check_foreign(table: List[Entry], shapes: Mapping[str, Tuple[int, ...]], extra: Iterable[str],
                  what: str) -> None:
  """Missing tensors, shape mismatches and extra (unused) tensor names -> one ValueError."""
  problems = []
  for e in table:
    if e.name not in shapes:
      problems.append(f'missing {e.name} (expected shape {e.foreign_shape})')
    elif tuple(shapes[e.name]) != e.foreign_shape:
      problems.append(f'shape mismatch {e.name}: got {tuple(shapes[e.name])}, expected {e.foreign_shape}')
  problems += [f'unexpected {name} (shape {tuple(shapes[name])})' for name in sorted(extra)]
  raise_problems(problems, what)


def assemble(module: nn.Module, table: List[Entry], get: Callable[[str], np.ndarray],
             scheme: str) -> dict:
  """The module's full variables dict from foreign tensors; auxiliary BNs copy the main ones."""
  main = {e.path: np.asarray(e.to_flax(np.asarray(get(e.name), np.float32), scheme)) for e in table}
  dists = _distributions(module)
  flat = {}
  for path, struct in abstract_variables(module).items():
    _, source = split_distribution(path, dists)
    value = main[source]
    flat[path] = value if source == path else value.copy()
    assert flat[path].shape == tuple(struct.shape), (path, flat[path].shape, struct.shape)
  return traverse_util.unflatten_dict(flat)


def export_main(variables: Mapping, module: nn.Module, table: List[Entry], scheme: str,
                what: str) -> Dict[str, np.ndarray]:
  """Foreign tensors of the main distribution; other distributions' variables are ignored."""
  flat = traverse_util.flatten_dict(jax.device_get(dict(variables)))
  flat = {tuple(k): v for k, v in flat.items()}
  dists = _distributions(module)
  known = {e.path for e in table}
  problems = []
  for e in table:
    if e.path not in flat:
      problems.append(f'missing Flax variable {"/".join(e.path)} (for {e.name})')
    elif tuple(np.shape(flat[e.path])) != e.shape:
      problems.append(f'shape mismatch {"/".join(e.path)}: got {tuple(np.shape(flat[e.path]))}, '
                      f'expected {e.shape}')
  problems += [f'unexpected Flax variable {"/".join(p)}' for p in sorted(flat)
               if p not in known and split_distribution(p, dists)[0] == CLEAN]
  raise_problems(problems, what)
  return {e.name: np.ascontiguousarray(e.from_flax(np.asarray(flat[e.path]), scheme)) for e in table}


def main_distribution(variables: Mapping, distributions: Iterable[str] = None) -> dict:
  """Only the main distribution's variables (drops scale_<d>/bias_<d> and batch_stats_<d>).

  Without `distributions`, every params leaf named scale_*/bias_* and every batch_stats_* collection goes.
  """
  flat = traverse_util.flatten_dict(dict(variables))
  keep = {}
  for path, value in flat.items():
    if distributions is not None:
      if split_distribution(path, distributions)[0] != CLEAN:
        continue
    elif path[0].startswith('batch_stats_') or (
        path[0] == 'params' and re.match(r'^(scale|bias)_.+$', path[-1]) and len(path) > 2):
      continue
    keep[path] = value
  return traverse_util.unflatten_dict(keep)
