"""Fine-tuning: a NEW run's weights from `config.init_from` (trainer.py calls `prepare` and
`initial_state`).

Sources, told apart by what the path holds:
  workdir  a training run directory (checkpoints/): its newest checkpoint, EMA or raw weights
           (`config.init_from_weights`)
  flax     an `advprop_jax.export --format=flax` directory (config.json + variables/)
  timm     a timm state dict file: .safetensors (or .pth/.pt/.bin, read with torch weights_only),
           e.g. the `tf_efficientnet_b*.ap_in1k` model.safetensors of a Hugging Face hub cache
  tf       a TF-reference checkpoint: a directory with a `checkpoint` file, or a prefix (X.index);
           its /ExponentialMovingAverage shadows with init_from_weights=ema
Only the main distribution is read: every auxiliary BN (scale_<d>, bias_<d>, batch_stats_<d>)
starts as a copy of the main BN, as the converters do, so AdvProp's clean and adversarial BNs start
from the same pretrained statistics. A classifier of another size (another dataset) is
re-initialised as a new run initialises it; any other difference is an architecture mismatch. The
optimizer state and the step start fresh; the EMA starts at the loaded weights.

Everything is read and compared with the run's model (jax.eval_shape) BEFORE the workdir is created:
a bad path or a mismatch is one ConfigError (exit 2) and nothing is written. A workdir that already
has a checkpoint resumes from it and ignores init_from (a restart must not reload the pretrained
weights).
"""
import functools
import logging
import os
from typing import Dict, NamedTuple, Optional, Tuple

import jax
import numpy as np
from etils import epath
from flax import traverse_util

from advprop_jax import checkpoints
from advprop_jax import cli
from advprop_jax import config as config_lib
from advprop_jax import convert
from advprop_jax import parallel
from advprop_jax import step as step_lib
from advprop_jax.convert import mapping

Flat = Dict[Tuple[str, ...], np.ndarray]
HEAD_MODULES = ('classifier', 'fc')  # EfficientNet, ResNet: re-initialised when their size differs
KINDS = ('workdir', 'flax', 'timm', 'tf')


class Source(NamedTuple):
  kind: str  # one of KINDS
  path: str
  variables: Flat  # main-distribution variables fitting the run's model (no head if re-initialised)
  reinit_head: bool


def _fail(path: str, message: str):
  raise config_lib.ConfigError(f'config.init_from={path}: {message}')


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir` holds a complete checkpoint (checkpoints.py's layout: checkpoints/<step>/
  with its step metadata file); reads no array."""
  directory = epath.Path(workdir) / 'checkpoints'
  if not directory.is_dir():
    return False
  metadata = checkpoints._STEP_METADATA_FILE  # pylint: disable=protected-access
  return any(p.name.isdigit() and (p / metadata).exists() for p in directory.iterdir())


def kind_of(path: str) -> str:
  """Which of KINDS `path` is (a ConfigError naming what was expected if none)."""
  if '://' in path:
    _fail(path, 'init_from reads local paths only; copy the weights to this machine first')
  if os.path.isdir(path):
    names = set(os.listdir(path))
    if 'checkpoints' in names:
      return 'workdir'
    if {'config.json', 'variables'} <= names:
      return 'flax'
    if 'checkpoint' in names or any(n.endswith('.index') for n in names):
      return 'tf'
  elif os.path.isfile(path):
    return 'timm'  # convert.load_state_dict names the file types it reads
  elif os.path.isfile(path + '.index'):
    return 'tf'
  what = 'does not exist' if not os.path.exists(path) else 'is none of the known kinds'
  _fail(path, f'{what}; expected a training workdir (checkpoints/), a Flax export (config.json + '
        'variables/), a timm .safetensors/.pth file, or a TF checkpoint (a directory with a '
        '`checkpoint` file, or a prefix with .index)')


def _main_module(config, num_classes: int):
  """The run's model with the main distribution only, `num_classes` outputs (for the converters)."""
  return mapping.resolve_model(config.model, num_classes, distributions=('clean',),
                               **config_lib.set_overrides(config))


def _read(kind: str, path: str, config) -> Flat:
  """The source's main-distribution variables as a flat numpy dict (the converters check names and
  shapes of foreign files against the run's model themselves)."""
  ema = config.init_from_weights == 'ema'
  if kind == 'workdir':
    variables, _ = checkpoints.load_inference_variables(path, ema=ema)
  elif kind == 'flax':
    from advprop_jax import export  # pylint: disable=g-import-not-at-top  (only for this kind)
    _, _, variables = export.load_exported_flax(path)
  elif kind == 'timm':
    state = convert.load_state_dict(path)
    variables = convert.timm_to_flax(state, _main_module(config, _classes(state, path)))
  else:
    variables = convert.tf_checkpoint_to_flax(path, config.model, prefer_ema=ema,
                                              distributions=('clean',),
                                              **config_lib.set_overrides(config))
  flat = traverse_util.flatten_dict(convert.main_distribution(dict(variables)))
  return {tuple(k): np.asarray(v) for k, v in flat.items()}


def _classes(state, path) -> int:
  """The classifier size of a timm state dict (the head may differ from the run's)."""
  for name in ('classifier.weight', 'fc.weight'):
    if name in state:
      return int(np.shape(state[name])[0])
  _fail(path, 'no classifier.weight or fc.weight: not a timm EfficientNet / ResNet state dict')


def _is_head(path) -> bool:
  return path[0] == 'params' and path[1] in HEAD_MODULES


def _compare(source: Flat, expected: Dict) -> Tuple[list, bool]:
  """(problems, params first, in model order; whether only the classifier's output size differs)."""
  problems, head_differs = [], False
  for path, struct in sorted(expected.items(), key=lambda item: item[0][0] != 'params'):
    name, want = '/'.join(path), tuple(struct.shape)
    if path not in source:
      problems.append(f'missing {name} (this run\'s model: {want})')
    elif np.shape(source[path]) != want:
      got = tuple(np.shape(source[path]))
      if _is_head(path) and got[:-1] == want[:-1]:
        head_differs = True  # only the number of classes: a new head
      else:
        problems.append(f'{name}: source {got}, this run\'s model {want}')
  problems += [f'unexpected {"/".join(p)} {tuple(np.shape(v))} (not in this run\'s model)'
               for p, v in source.items() if p not in expected]
  return problems, head_differs


def load(config, model) -> Source:
  """Reads config.init_from and checks it against `model` (the run's model; shapes only)."""
  path = config.init_from
  kind = kind_of(path)
  model_name = f'{config.model} (model_overrides {config_lib.set_overrides(config)})'
  try:
    source = _read(kind, path, config)
  except config_lib.ConfigError:
    raise
  except (ValueError, ImportError, FileNotFoundError) as e:  # mismatch, no torch, no checkpoint
    _fail(path, f'{kind} source: {_describe(e, model_name)}')
  except Exception as e:  # pylint: disable=broad-except  (orbax / TF raise many types)
    _fail(path, f'cannot read this {kind} source ({type(e).__name__}: {cli.one_line(e)})')
  problems, head_differs = _compare(source, mapping.main_paths(model))
  if problems:
    _fail(path, f'{kind} source does not fit {model_name}: first difference {problems[0]} '
          f'({len(problems)} in all)')
  if head_differs:
    source = {p: v for p, v in source.items() if not _is_head(p)}
  return Source(kind, path, source, head_differs)


def _describe(error: Exception, model_name: str) -> str:
  """One line; a converter's mismatch list (a header, then one line per tensor, see
  mapping.raise_problems) as its first tensor and the count."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if len(lines) > 1 and lines[0].endswith('mismatch(es):'):
    count = lines[0].rsplit(': ', 2)[-1].split()[0]
    first = lines[1].replace(': got ', ': source ').replace(', expected ', ", this run's model ")
    return f'does not fit {model_name}: first difference {first} ({count} in all)'
  return cli.one_line(error)


def prepare(config, workdir: str, model) -> Optional[Source]:
  """The source to start from, read and checked; None without init_from or when the workdir
  resumes."""
  if not config.init_from:
    return None
  if has_checkpoint(workdir):
    logging.info('%s has a checkpoint: resuming from it; init_from ignored (%s)', workdir,
                 config.init_from)
    return None
  source = load(config, model)
  logging.info('init_from: %s source %s (%s weights where the source has both), %d arrays',
               source.kind, source.path, config.init_from_weights, len(source.variables))
  return source


def initial_state(source: Source, model, tx, config, mesh) -> step_lib.TrainState:
  """Step 0 of a new run from `source`: the model's fresh init (config.seed, as a run from scratch)
  overwritten by the loaded variables; each auxiliary BN copies the main one. Fresh optimizer state;
  the EMA copies start at the loaded weights."""
  image_size = config.data.image_size
  init = jax.jit(functools.partial(step_lib.init_variables, model, image_size=image_size))
  fresh = traverse_util.flatten_dict(jax.device_get(init(jax.random.PRNGKey(config.seed))))
  distributions = tuple(getattr(model, 'distributions', ('clean',)))
  for path, value in fresh.items():
    main = mapping.split_distribution(path, distributions)[1]
    if main in source.variables:
      fresh[path] = np.asarray(source.variables[main], value.dtype)
  if source.reinit_head:
    logging.info('init_from: the classifier is re-initialised (%d classes here, another number in '
                 '%s)', config.num_classes, source.path)
  variables = traverse_util.unflatten_dict(fresh)
  params = variables.pop('params')

  def build(params, model_state):
    return step_lib.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                               model_state=model_state, opt_state=tx.init(params),
                               ema_params=params, ema_model_state=model_state)
  return jax.jit(build, out_shardings=parallel.replicated_sharding(mesh))(params, variables)
