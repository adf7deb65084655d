"""Export a training run's EMA weights (main BatchNorms only) for inference.

  python -m advprop_jax.export --workdir=DIR --format=flax|timm|savedmodel --output=PATH   (or advprop-export)
      [--step=best|N]   (default: the newest complete checkpoint; best: config.keep_best_by's)

* flax:        PATH/ is a directory: config.json (model, model_overrides, num_classes, image_size,
               crop_fraction, normalization, pixel_mean, pixel_std, input_range[, class_names])
               + variables/, an Orbax StandardCheckpointer checkpoint of {'params', 'batch_stats'} for
               create_model(model, num_classes=..., distributions=('clean',), **model_overrides).
               `load_exported_flax(PATH)` and `python -m advprop_jax.predict --checkpoint=PATH` read it.
* timm:        PATH is a .safetensors file for timm's tf_efficientnet_bX / resnetN (strict load_state_dict);
               its header metadata holds the same config ('advprop_jax_config') and timm's mean, std,
               input_size, crop_pct[, label_names], so predict needs no --model for it.
* savedmodel:  PATH/ is a TF SavedModel (jax2tf, native serialization for --platforms). Signatures:
               'serving_default': float32 images [batch, S, S, 3] NHWC, S = image_size, already cropped,
               resized and normalised -> {'probabilities': float32 [batch, classes]};
               'serving_uint8': the same with uint8 pixels 0..255 (normalised inside)[; a
               class_names string variable].

class_names: the classes of a run on an image folder (workdir classes.json), in label order.
Inputs are normalised per channel as the run's data.normalization: x = (pixels - pixel_mean) / pixel_std,
pixels 0..255; 'minus_one_one' (AdvProp EfficientNets): mean = std = 127.5, x in [-1, 1]; 'imagenet'
(configs/resnet.py): torchvision's mean/std.
The output is written next to PATH under a temporary name and renamed when complete. An existing PATH is
replaced only if it is an export of the same format (or empty). Mistakes (flags, paths, the run's files) print
one line naming the flag or path and exit with code 2, before anything is written.
"""
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, Sequence, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags
from flax import traverse_util

from advprop_jax import best_checkpoint
from advprop_jax import checkpoints
from advprop_jax import cli
from advprop_jax import config as config_lib
from advprop_jax import convert
from advprop_jax import workdir as workdir_lib
from advprop_jax.convert import savedmodel
# What an export records of the normalisation (export.normalization_config, .pixel_stats: API).
from advprop_jax.data.normalization import DEFAULT_INPUT_RANGE, normalization_config, pixel_stats
from advprop_jax.cli import UserError, one_line
from advprop_jax.models import create_model, model_names

CONFIG_FILE = 'config.json'
VARIABLES_DIR = 'variables'
CONFIG_KEYS = ('model', 'model_overrides', 'num_classes', 'image_size', 'crop_fraction')  # required on read
NORMALIZATION_KEYS = ('normalization', 'pixel_mean', 'pixel_std', 'input_range')  # written by export
CLASS_NAMES_KEY = 'class_names'  # written by export when the run recorded class names
FORMATS = ('flax', 'timm', 'savedmodel')
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
TIMM_CONFIG_KEY = 'advprop_jax_config'  # safetensors metadata key of the exported config (JSON)


# --------------------------------------------------------------------------------------------------------
# Configs: the export view of a run, and the config.json of an exported directory
# --------------------------------------------------------------------------------------------------------
def _read_json(path: str, what: str) -> Dict[str, Any]:
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except FileNotFoundError:
    raise UserError(f'{path} not found: {what}') from None
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f'{path}: cannot read it ({getattr(e, "strerror", None) or e})') from None
  except json.JSONDecodeError as e:
    raise UserError(f'{path}: not valid JSON ({e})') from None
  if not isinstance(value, dict):
    raise UserError(f'{path}: expected a JSON object, got {type(value).__name__}')
  return value


def _check_model(config: Dict[str, Any], where: str) -> None:
  if config['model'] not in model_names():
    raise UserError(f'{where}: model={config["model"]!r} is not a known model; '
                    f'names: {", ".join(model_names())}')


def read_config(directory: str) -> Dict[str, Any]:
  """The flat config.json of an exported directory (older exports: normalisation from input_range)."""
  path = os.path.join(directory, CONFIG_FILE)
  config = _read_json(path, f'{directory} is not an export --format=flax directory')
  missing = [k for k in CONFIG_KEYS if k not in config]
  if missing:
    raise UserError(f'{path} lacks {missing}: not written by advprop_jax.export --format=flax')
  config['model_overrides'] = config_lib.without_unset(config['model_overrides'])
  if 'pixel_mean' not in config:
    mean, std = pixel_stats(config)
    config.update(normalization='minus_one_one' if np.allclose(mean, 127.5) else 'custom',
                  pixel_mean=mean.tolist(), pixel_std=std.tolist())
    config.setdefault('input_range', list(DEFAULT_INPUT_RANGE))
  _check_model(config, path)
  return config


def run_config(workdir: str) -> Dict[str, Any]:
  """The export view (CONFIG_KEYS + NORMALIZATION_KEYS) of a training workdir's full config.json."""
  path = os.path.join(workdir, CONFIG_FILE)
  full = _read_json(path, f'--workdir={workdir} must be a training run directory (config.json, checkpoints/)')
  try:
    data = full['data']
    config = dict(model=full['model'], model_overrides=config_lib.without_unset(full.get('model_overrides')),
                  num_classes=int(full['num_classes']), image_size=int(data['image_size']))
    crop_fraction = data.get('crop_fraction')
    normalization = data.get('normalization', 'minus_one_one')
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(f'{path}: missing or invalid field {e} (not written by training?)') from None
  _check_model(config, path)
  if crop_fraction is None:
    # data.preprocessing imports TensorFlow (seconds): only for the S/(S+32) rule of configs without a crop.
    from advprop_jax.data import preprocessing  # pylint: disable=g-import-not-at-top
    crop_fraction = preprocessing.eval_crop_fraction(config['image_size'])
  try:
    norm = normalization_config(normalization)
  except ValueError as e:
    raise UserError(f'{path}: data.{e}') from None
  names = workdir_lib.read_class_names(workdir)  # None: the run's dataset names no classes
  return dict(config, crop_fraction=float(crop_fraction), **norm,
              **({CLASS_NAMES_KEY: names} if names else {}))


def exported_config(config: Dict[str, Any]) -> Dict[str, Any]:
  """What an export records (flax config.json, timm metadata): main-distribution model, preprocessing."""
  keep = dict(config, model_overrides={k: v for k, v in config_lib.without_unset(config['model_overrides']).items()
                                       if k != 'distributions'})
  return {k: keep[k] for k in CONFIG_KEYS + NORMALIZATION_KEYS + (CLASS_NAMES_KEY,) if k in keep}


# --------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------
def check_workdir(workdir: str) -> None:
  if not workdir:
    raise UserError('--workdir is required: the training run directory (config.json, checkpoints/)')
  if workdir.startswith('gs://'):
    raise UserError(f'--workdir={workdir}: export reads local directories only; copy the run first '
                    '(gcloud storage cp -r: config.json and the newest checkpoints/<step>)')
  if not os.path.isdir(workdir):
    what = 'is not a directory' if os.path.exists(workdir) else 'does not exist'
    raise UserError(f'--workdir={workdir} {what}: give the training run directory '
                    '(config.json, checkpoints/)')


def load_inference_variables(workdir: str, step=None) -> Tuple[Dict[str, Any], dict]:
  """(config, variables) of a training workdir: the newest checkpoint's (or `step`'s: a number or
  'best') EMA weights, all distributions.

  What a training workdir must hold is defined here: config.json (run_config) and the newest complete
  checkpoint of checkpoints.load_inference_variables (checkpoints/<step>/state with ema_params,
  ema_model_state)."""
  check_workdir(workdir)
  config = run_config(workdir)
  try:
    variables, _, step = checkpoints.load_inference_variables(workdir, ema=True, with_step=True,
                                                              step=step)
  except FileNotFoundError as e:
    hint = 'train first, or give the run directory' if step is None else 'see checkpoints/'
    raise UserError(f'--workdir={workdir}: {one_line(e)} ({hint})') from None
  except Exception as e:  # pylint: disable=broad-except  # orbax raises many types for unreadable files
    which = 'the newest checkpoint' if step is None else f'checkpoint step {step}'
    raise UserError(f'--workdir={workdir}: cannot read {which} '
                    f'({cli.read_failure(e, workdir)})') from None
  return dict(config, checkpoint_step=step), variables  # the step is not exported (exported_config)


def inference_model(config: Dict[str, Any]):
  """The model with the main distribution only (what the exported variables fit)."""
  overrides = {k: v for k, v in config_lib.without_unset(config['model_overrides']).items() if k != 'distributions'}
  try:
    return create_model(config['model'], num_classes=int(config['num_classes']), distributions=('clean',),
                        **overrides)
  except ValueError as e:
    raise UserError(f'model {config["model"]} with model_overrides {overrides}: {e}') from None


def inference_variables(config: Dict[str, Any], variables: dict) -> dict:
  """Main-distribution variables, checked against the inference model (one ValueError if they do not fit)."""
  # Without an explicit list every batch_stats_<d> collection and BN scale_<d>/bias_<d> param is auxiliary.
  main = convert.main_distribution(variables, config['model_overrides'].get('distributions'))
  expected = {p: tuple(s.shape) for p, s in convert.abstract_variables(inference_model(config)).items()}
  got = {p: tuple(np.shape(v)) for p, v in traverse_util.flatten_dict(main).items()}
  problems = [f'missing {"/".join(p)}' for p in expected if p not in got]
  problems += [f'shape mismatch {"/".join(p)}: got {got[p]}, expected {s}'
               for p, s in expected.items() if p in got and got[p] != s]
  problems += [f'unexpected {"/".join(p)}' for p in got if p not in expected]
  convert.mapping.raise_problems(problems, f'checkpoint variables -> {config["model"]}')
  return jax.tree.map(lambda a: np.asarray(a, np.float32), main)


# --------------------------------------------------------------------------------------------------------
# Output paths: checked before anything is read or written; written under a temporary name, then renamed
# --------------------------------------------------------------------------------------------------------
def _is_export(path: str, fmt: str) -> bool:
  names = set(os.listdir(path))
  if fmt == 'flax':
    return names == {CONFIG_FILE, VARIABLES_DIR}
  return 'saved_model.pb' in names


def check_output(output: str, fmt: str) -> str:
  """The absolute output path, or one UserError naming it (wrong kind, not replaceable, not writable)."""
  if not output:
    raise UserError(f'--output is required: {"a .safetensors file" if fmt == "timm" else "a directory"} path')
  if '://' in output:
    raise UserError(f'--output={output}: export writes local paths only')
  path = os.path.abspath(output)
  if fmt == 'timm':
    if os.path.isdir(path):
      raise UserError(f'--output={output} is a directory; --format=timm writes one file, '
                      f'e.g. --output={os.path.join(output, "model.safetensors")}')
    if not path.endswith('.safetensors'):
      raise UserError(f'--output={output}: --format=timm writes a .safetensors file; '
                      'end the path in .safetensors')
  elif os.path.exists(path):
    if not os.path.isdir(path):
      raise UserError(f'--output={output} is a file; --format={fmt} writes a directory')
    if os.listdir(path) and not _is_export(path, fmt):
      raise UserError(f'--output={output} exists and is not a {fmt} export; nothing was written: choose a new '
                      'path (an earlier export of the same format is replaced, anything else is not)')
  parent = os.path.dirname(path)
  existing = parent
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f'--output={output}: {existing} is not a writable directory')
  return path


def _write_atomically(output: str, fmt: str, write: Callable[[str], None]) -> str:
  """write(tmp_path) next to the output, then rename it into place; nothing is left behind on failure."""
  path = check_output(output, fmt)
  parent = os.path.dirname(path)
  created, probe = None, parent  # created: the topmost directory this call creates, if any
  while not os.path.exists(probe):
    created, probe = probe, os.path.dirname(probe)
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=parent)
  except OSError as e:  # e.g. a full disk (exit status 3, cli.WriteError)
    if created:
      shutil.rmtree(created, ignore_errors=True)
    raise cli.write_error(e, f'the {fmt} export', path) from None
  try:
    target = os.path.join(tmp, 'out')
    write(target)
    if fmt == 'timm':
      umask = os.umask(0o22)
      os.umask(umask)
      os.chmod(target, 0o666 & ~umask)  # as a plain open() would create it (safetensors writes 0600)
      os.replace(target, path)
    elif os.path.isdir(path):  # an earlier export (or an empty directory): swap
      old = os.path.join(tmp, 'old')
      os.rename(path, old)
      try:
        os.rename(target, path)
      except OSError:
        os.rename(old, path)
        raise
    else:
      os.rename(target, path)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if created:
      shutil.rmtree(created, ignore_errors=True)
    raise cli.write_error(e, f'the {fmt} export', path) from None  # a full disk: one line, status 3
  shutil.rmtree(tmp, ignore_errors=True)
  return path


# --------------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------------
def export_flax(config, variables, output: str) -> str:
  main = inference_variables(config, variables)

  def write(target):
    os.makedirs(target)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(target, VARIABLES_DIR), main)
    checkpointer.wait_until_finished()
    with open(os.path.join(target, CONFIG_FILE), 'w', encoding='utf-8') as f:
      json.dump(exported_config(config), f, indent=1)
  return _write_atomically(output, 'flax', write)


def load_exported_flax(path: str):
  """(config, module, variables) of a directory written by export_flax."""
  config = read_config(path)
  module = inference_model(config)
  try:
    variables = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), VARIABLES_DIR))
  except Exception as e:  # pylint: disable=broad-except  # orbax raises many types for unreadable files
    raise UserError(f'{os.path.join(path, VARIABLES_DIR)}: cannot read the exported weights '
                    f'({type(e).__name__}: {one_line(e)})') from None
  return config, module, jax.tree.map(np.asarray, variables)


def timm_metadata(config: Dict[str, Any]) -> Dict[str, str]:
  """safetensors header metadata: our config, and timm's pretrained_cfg fields (mean/std in 0..1 units)."""
  mean, std = pixel_stats(config)
  size = int(config['image_size'])
  return {TIMM_CONFIG_KEY: json.dumps(exported_config(config), sort_keys=True),
          'mean': json.dumps([round(float(m) / 255, 6) for m in mean]),
          'std': json.dumps([round(float(s) / 255, 6) for s in std]),
          'input_size': json.dumps([3, size, size]),
          'crop_pct': f'{float(config["crop_fraction"]):g}', **({'label_names': json.dumps(
              config[CLASS_NAMES_KEY])} if CLASS_NAMES_KEY in config else {})}


def export_timm(config, variables, output: str) -> str:
  main = inference_variables(config, variables)
  module = inference_model(config)
  return _write_atomically(output, 'timm', lambda target: convert.save_timm_safetensors(
      main, module, target, metadata=timm_metadata(config)))


def export_savedmodel(config, variables, output: str, platforms=('cpu', 'cuda', 'tpu'),
                      depthwise_impl=None) -> str:
  """platforms: where the SavedModel may run (jax2tf native serialization lowers once per platform).
  depthwise_impl: override the model's depthwise formulation (default 'auto' resolves on THIS machine's
  backend: 'shifted' when exporting on CPU, 'grouped' on GPU/TPU; both compute the same function)."""
  module = inference_model(config)
  if depthwise_impl and hasattr(module, 'depthwise_impl'):
    module = module.clone(depthwise_impl=depthwise_impl)
  mean, std = pixel_stats(config)
  main = inference_variables(config, variables)
  return _write_atomically(output, 'savedmodel', lambda target: savedmodel.save_savedmodel(
      module, main, target, image_size=int(config['image_size']), pixel_mean=mean, pixel_std=std,
      platforms=platforms, class_names=config.get(CLASS_NAMES_KEY)))


def export(workdir: str, fmt: str, output: str, with_step: bool = False, step=None, **kwargs):
  """Exports the run in `workdir` (its newest checkpoint, or `step`: a number or 'best') as `fmt`
  to `output`; returns the absolute output path (with_step: and the step of the checkpoint
  exported)."""
  if fmt not in FORMATS:
    raise UserError(f'--format={fmt}: allowed: {", ".join(FORMATS)}')
  check_workdir(workdir)
  check_output(output, fmt)  # before the (slow) checkpoint read
  config, variables = load_inference_variables(workdir, step)
  writer = {'flax': export_flax, 'timm': export_timm, 'savedmodel': export_savedmodel}[fmt]
  try:
    path = writer(config, variables, output, **kwargs)
  except UserError:
    raise
  except ValueError as e:  # the checkpoint's variables do not fit the model that config.json describes
    raise UserError(f'--workdir={workdir}: the newest checkpoint does not fit config.json '
                    f'({one_line(e)})') from None
  return (path, config['checkpoint_step']) if with_step else path


# --------------------------------------------------------------------------------------------------------
# Command line (absl flags)
# --------------------------------------------------------------------------------------------------------
def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'Training run directory (config.json, checkpoints/).',
                      flag_values=flag_values)
  flags.DEFINE_enum('format', 'flax', FORMATS, 'Export format.', flag_values=flag_values)
  flags.DEFINE_string('output', None, 'Output path: a directory for flax/savedmodel, a .safetensors file for '
                      'timm.', flag_values=flag_values)
  flags.DEFINE_list('platforms', ['cpu', 'cuda', 'tpu'], f'savedmodel: platforms to lower for, '
                    f'of {", ".join(PLATFORMS)}.', flag_values=flag_values)
  flags.DEFINE_string('step', None, "Checkpoint to export: a step number, or 'best' (the run's "
                      'config.keep_best_by); default: the newest complete one.',
                      flag_values=flag_values)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> int:
  status = [0]
  with cli.user_errors('export', status):
    if len(argv) > 1:
      raise UserError(f'unexpected arguments {list(argv[1:])}: export takes flags only (--help lists them)')
    unknown = sorted(set(flag_values.platforms) - set(PLATFORMS))
    if unknown or not flag_values.platforms:
      raise UserError(f'--platforms={",".join(flag_values.platforms)}: allowed: {", ".join(PLATFORMS)}')
    kwargs = dict(platforms=tuple(flag_values.platforms)) if flag_values.format == 'savedmodel' else {}
    try:
      wanted = best_checkpoint.parse_step(flag_values.step)
    except ValueError as e:
      raise UserError(str(e)) from None
    path, step = export(flag_values.workdir, flag_values.format, flag_values.output, with_step=True,
                        step=wanted, **kwargs)
    which = {None: 'the newest complete one', best_checkpoint.BEST: 'the best one'}.get(
        wanted, 'as asked')
    print(f'Exported {flag_values.workdir} (checkpoint step {step}, {which}) as '
          f'{flag_values.format} to {path}')
  return status[0]


def call(argv: Sequence[str]) -> int:
  """`advprop-export ARGS` in-process; returns the exit status."""
  return cli.call(define_flags, main, 'export', argv)


def run() -> None:
  """Console script `advprop-export`."""
  cli.run(main, 'export', __doc__, define_flags)


if __name__ == '__main__':
  run()
