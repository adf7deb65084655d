"""Compile a config's real training step for a TPU slice on any machine, without a TPU, and project the run.

  python -m advprop_jax.plan --config=configs/efficientnet.py:b7 [--topology=v4-32] [--config.x=...]
      [--output=plans] [--remat=auto|no] [--eval_step] [--utilization=U] [--fit]

Needs the TPU compiler: `pip install -r requirements-tpu.txt` (libtpu, on top of requirements.txt). The
train step (and with --eval_step the eval step) is traced, lowered and compiled for the slice's devices
exactly as training would run it (plan_core.py), which gives:
  * per-core HBM: XLA's buffer plan, arguments + outputs - aliased (donated) + temporaries, against the
    HBM the compiler offers one device; a program that does not fit is refused by the compiler itself. With
    --remat=auto a config that does not fit is compiled again with rematerialisation, and both are reported;
  * FLOPs per step (every PGD iteration counted) and per image; the cross-device collectives by kind;
  * a projection of the recipe run (PROJECTIONS, not measurements): steps = epochs x examples / batch, the
    FLOP-bound floor of its wall time and chip-hours at the slice's peak, and the same at a utilisation.
    The default utilisation (8.4 %) is the one implied by a published figure (ANCHOR: EfficientNet-B0's
    350-epoch TF recipe took 23 h on a Cloud TPU v2-8) given our own FLOP count for that run.
--topology=NxSLICE (`2xv5litepod-256`) compiles for N slices joined over the data-centre network
(multislice); `dcn-*` collectives are what crosses slices.
--fit keeps the global batch and picks the smallest gradient accumulation k (then remat) that fits,
from the first compile's buffer plan and one confirming compile (plan_fit.py); the JSON's
`grad_accumulation_steps`, `remat`, `slices` are the choice and `train_command` trains with it.
Writes OUTPUT/<model>-<method>-<topology>.json and .md (one markdown table row); the last line printed
is one JSON object. Exit 0 when the step compiles (fits or not), 2 for a bad config or slice name
(or an --output that is not writable), 3 when writing OUTPUT fails (a full disk: nothing half written
is left).
"""
import json
import os
import shutil
import time

from absl import flags
from ml_collections import config_flags

from advprop_jax import cli
from advprop_jax import config as config_lib
from advprop_jax import optim
from advprop_jax import plan_core
from advprop_jax import plan_fit
from advprop_jax import topologies

# Training images of datasets whose size is known without reading them (the projection's epochs).
KNOWN_TRAIN_EXAMPLES = {'imagenet2012': 1_281_167}
# Wongpanich, ..., Kumar 2021, "Training EfficientNets at Supercomputer Scale" (arXiv:2011.00071), abstract:
# "training an EfficientNet-B0 model takes 23 hours on a Cloud TPU v2-8 node" -- taken to be the TF recipe
# (350 epochs, batch 2048). flops_per_image is OUR count of that step (B0 vanilla, bf16, 224 px, measured by
# `python -m advprop_jax.plan --config=configs/efficientnet.py:b0 --config.method=vanilla
# --config.global_batch_size=2048 --topology=v2-8`); the implied utilisation is that work over 23 h at the
# v2-8's peak (8 cores x 22.5 TFLOP/s): 8.4 %.
ANCHOR = dict(model='efficientnet-b0', method='vanilla', topology='v2-8', hours=23.0, epochs=350,
              flops_per_image=2_788_830_208, source='Wongpanich et al. 2021, arXiv:2011.00071: EfficientNet-B0, '
                                           '350 epochs, 23 h on a Cloud TPU v2-8')


def implied_utilization(anchor=ANCHOR) -> float:
  """The FLOP utilisation the anchor run had by our FLOP count: work / (time x peak)."""
  tpu = topologies.parse(anchor['topology'])
  work = anchor['flops_per_image'] * anchor['epochs'] * KNOWN_TRAIN_EXAMPLES['imagenet2012']
  return work / (anchor['hours'] * 3600 * tpu.peak_flops_per_device * tpu.devices)


def projection(result: dict, config, utilization: float, num_train_examples: int) -> dict:
  """The recipe run on this slice, as a projection from the compiled step's FLOPs."""
  steps = optim.epochs_to_steps(config.num_epochs, num_train_examples, result['global_batch'])
  peak = result['peak_flops_per_device'] * result['devices']
  floor_s = result['flops_per_step'] * steps / peak
  return dict(epochs=float(config.num_epochs), train_examples=num_train_examples, steps=steps,
              floor_hours=floor_s / 3600, floor_chip_hours=floor_s * result['chips'] / 3600,
              utilization=utilization, hours=floor_s / utilization / 3600,
              chip_hours=floor_s * result['chips'] / utilization / 3600)


def fitting_batch(result: dict):
  """A per-core batch that would fit, estimated from the buffer plan (temporaries grow with the batch;
  the state does not). None when nothing is known or even one image would not fit."""
  hbm = result.get('hbm_bytes_per_core')
  temp = result.get('temp_bytes') or result.get('temp_bytes_required')
  if not (hbm and temp):
    return None
  fixed = result.get('argument_bytes', 0) + result.get('output_bytes', 0) - result.get('alias_bytes', 0)
  per_image = temp / result['per_core_batch']
  batch = int((hbm - fixed) // per_image)
  return batch if batch >= 1 else None


def _num(value, spec: str, scale: float = 1.0) -> str:
  """value / scale formatted, or '-' when unknown (no projection: the dataset's size is unknown)."""
  return '-' if value is None else f'{value / scale:{spec}}'


def markdown_row(r: dict) -> str:
  gib = lambda b: f'{b / 2 ** 30:.1f}' if b else '-'
  fits = 'yes' if r.get('fits') else 'no'
  if r.get('fits') and (r.get('grad_accumulation_steps', 1) > 1 or 'fit_trials' in r):
    fits += f' (k={r["grad_accumulation_steps"]}{", remat" if r.get("remat") else ""})'
  if not r.get('fits') and r.get('with_remat', {}).get('fits'):
    fits = 'with remat'
  p = r.get('projection', {})
  collectives = ', '.join(f'{k} x{v["count"]}' for k, v in r.get('collectives', {}).items()) or '-'
  return (f'| {r["model"]} | {r["method"]} | {r["topology"]} | {r["devices"]}/{r["processes"]} | '
          f'{r["per_core_batch"]} | {gib(r.get("per_core_bytes") or r.get("temp_bytes_required"))} / '
          f'{gib(r["hbm_bytes_per_core"])} | {fits} | '
          f'{_num(r.get("flops_per_step"), ".1f", 1e12)} | '
          f'{_num(r.get("flops_per_image"), ".2f", 1e9)} | '
          f'{collectives} | {p.get("steps", "-")} | '
          f'{_num(p.get("floor_hours"), ".1f")} h / {_num(p.get("hours"), ".1f")} h | '
          f'{_num(p.get("chip_hours"), ".0f")} | {r["compile_s"]:.0f} |')


MARKDOWN_HEADER = ('| model | method | slice | devices/hosts | batch/core | GiB/core (plan) / HBM | fits | '
                   'TFLOP/step | GFLOP/image | collectives | steps | run: floor / projected | chip-h '
                   '(projected) | compile s |\n|' + '---|' * 14)


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = dict(flag_values=flag_values)
  config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py[:arg]).',
                                  lock_config=True, **fv)
  flags.DEFINE_string('topology', None, f'TPU slice: {topologies.ACCEPTED_FORMS} (default: the '
                      'config\'s tpu_slice, the slice its recipe is sized for).', **fv)
  flags.DEFINE_string('output', 'plans', 'Directory for the JSON and markdown row ("" to write nothing).',
                      **fv)
  flags.DEFINE_enum('remat', 'auto', ['auto', 'no'], 'auto: when the step does not fit, compile it again '
                    'with rematerialisation (model_overrides.remat) and report both.', **fv)
  flags.DEFINE_bool('eval_step', False, 'Also compile the eval step at config.eval_batch_size.', **fv)
  flags.DEFINE_float('utilization', None, 'FLOP utilisation of the projection (default: the ANCHOR\'s).',
                     **fv)
  flags.DEFINE_integer('train_examples', None, 'Training images per epoch for the projection (default: '
                       f'known for {sorted(KNOWN_TRAIN_EXAMPLES)}).', **fv)
  flags.DEFINE_bool('fit', False, 'Keep the global batch; choose the smallest gradient '
                    'accumulation '
                    '(then remat) whose step fits the slice, and print the command that trains so.',
                    **fv)
  flags.mark_flags_as_required(['config'], **fv)


def run_plan(config, topology: str, *, remat='auto', eval_step=False, utilization=None,
             train_examples=None, fit=False) -> dict:
  """plan_core.plan + the remat retry (or with fit, plan_fit's choice) + the projection; one
  dict."""
  start = time.perf_counter()
  if fit:
    result = plan_fit.fit(config, topology, plan_core.plan)
  else:
    result = plan_core.plan(config, topology, eval_step=eval_step)
  if not fit and not result.get('fits') and remat == 'auto' and not result['remat']:
    retry = config.copy_and_resolve_references()
    retry.model_overrides.remat = True
    result['with_remat'] = plan_core.plan(retry, topology)
  best = result['with_remat'] if not result.get('fits') and result.get('with_remat', {}).get('fits') \
      else result
  suggestion = fitting_batch(best) if not best.get('fits') else None
  if suggestion:
    result['fitting_per_core_batch_estimate'] = suggestion
  examples = train_examples or KNOWN_TRAIN_EXAMPLES.get(config.data.dataset)
  if examples and 'flops_per_step' in best:
    result['projection'] = projection(best, config, utilization or implied_utilization(), examples)
  elif not examples:  # said instead of projecting nothing (a row of '-'; it printed 'nan' before)
    result['no_projection'] = (f'the size of dataset {config.data.dataset!r} is not known here '
                               f'(known: {", ".join(sorted(KNOWN_TRAIN_EXAMPLES))}); pass '
                               '--train_examples=N')
  result['train_step_compile_s'] = result.get('compile_s')
  result['compile_s'] = time.perf_counter() - start  # every compile this plan made (remat retry included)
  return result


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> int:
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; flags are --name=value')
  config = flag_values.config
  topology = flag_values.topology or config.get('tpu_slice')
  if not topology:
    cli.fail('--topology: no slice named and the config names none (config.tpu_slice); e.g. '
             '--topology=v4-32')
  try:
    topologies.parse(topology)
  except ValueError as e:
    cli.fail(f'{"--topology" if flag_values.topology else "config.tpu_slice"}: {e}')
  if not topologies.libtpu_available():
    cli.fail('the TPU compiler is not installed: pip install -r requirements-tpu.txt (libtpu)')
  topologies.compile_only_environment()
  if flag_values.utilization is not None and not 0 < flag_values.utilization <= 1:
    cli.fail(f'--utilization={flag_values.utilization} must be in (0, 1]')
  if flag_values.fit and flag_values.eval_step:
    cli.fail('--eval_step with --fit: --fit compiles train steps only; plan the eval step '
             'without it')
  if flag_values.output:
    cli.check_writable('--output', flag_values.output)  # before compiling (minutes), not after
  try:
    result = run_plan(config, topology, remat=flag_values.remat,
                      eval_step=flag_values.eval_step, utilization=flag_values.utilization,
                      train_examples=flag_values.train_examples, fit=flag_values.fit)
    if flag_values.fit and result.get('fits'):
      result['train_command'] = plan_fit.train_command(
          config_flags.get_config_filename(flag_values['config']),
          config_flags.get_override_values(flag_values['config']), result)
      result['fit_note'] = plan_fit.micro_batch_note(config, result)
  except config_lib.ConfigError as e:
    cli.fail(f'Config error: {e}')
  except Exception as e:  # pylint: disable=broad-except  (a compile failure that is not out-of-HBM)
    cli.fail(f'the step of {config.model} ({config.method}, global batch {config.global_batch_size}, '
             f'{config.data.image_size} px, {config.dtype}) did not compile for {topology}: '
             f'{cli.one_line(e)}', code=1)
  _report(result, flag_values.output)
  return 0


def _report(result: dict, output: str) -> None:
  row = markdown_row(result)
  gib = result.get('per_core_bytes') or result.get('temp_bytes_required') or 0
  hbm = result['hbm_bytes_per_core'] / 2 ** 30
  print(f'{result["model"]} {result["method"]} on {result["topology"]} ({result["devices"]} devices, '
        f'{result["processes"]} hosts): {gib / 2 ** 30:.2f} GiB per core of {hbm:.2f} -> '
        f'{"fits" if result.get("fits") else "does NOT fit"}')
  if 'fit_trials' in result:
    tried = ', '.join(f'k={t["grad_accumulation_steps"]}{" remat" if t["remat"] else ""}: '
                      f'{"fits" if t["fits"] else "no"}' for t in result['fit_trials'])
    print(f'  --fit compiled {len(result["fit_trials"])} time(s) ({tried})')
    if result.get('fits'):
      print(f'  FIT: grad_accumulation_steps={result["grad_accumulation_steps"]}, remat='
            f'{result["remat"]}, {result["slices"]} slice(s); {result["fit_note"]}\n'
            f'  train with: {result["train_command"]}')
    else:
      print(f'  {result["fit_failure"]}')
  if 'with_remat' in result:
    remat = result['with_remat']
    remat_gib = (remat.get('per_core_bytes') or remat.get('temp_bytes_required', 0)) / 2 ** 30
    print(f'  with remat: {remat_gib:.2f} GiB -> {"fits" if remat.get("fits") else "does not fit either"}')
  if 'fitting_per_core_batch_estimate' in result:
    print(f'  a per-core batch of about {result["fitting_per_core_batch_estimate"]} would fit (estimate '
          'from the buffer plan): --config.global_batch_size=' +
          str(result['fitting_per_core_batch_estimate'] * result['devices']))
  if 'projection' in result:
    p = result['projection']
    print(f'  PROJECTION: {p["steps"]} steps; FLOP-bound floor {p["floor_hours"]:.1f} h '
          f'({p["floor_chip_hours"]:.0f} chip-h) at peak; {p["hours"]:.1f} h ({p["chip_hours"]:.0f} chip-h) '
          f'at {100 * p["utilization"]:.1f} % utilisation')
  elif 'no_projection' in result:
    print(f'  no projection of the run: {result["no_projection"]}')
  print(MARKDOWN_HEADER + '\n' + row)
  if output:
    _write_files(output, f'{result["model"]}-{result["method"]}-{result["topology"]}', {
        '.json': json.dumps(result, indent=1, sort_keys=True, default=str), '.md': row + '\n'})
  print(json.dumps(result, sort_keys=True, default=str))


def _write_files(output: str, stem: str, texts: dict) -> None:
  """OUTPUT/<stem><suffix> for each text; a failed write (a full disk) is one cli.WriteError and
  leaves no half-written file, nor an OUTPUT it created."""
  path = top = os.path.join(os.path.abspath(output), stem)
  while not os.path.exists(os.path.dirname(top)):
    top = os.path.dirname(top)  # the topmost directory this call creates, if any
  created = top != path
  with cli.writing('the plan', path + '.*'):
    try:
      os.makedirs(output, exist_ok=True)
      for suffix, text in texts.items():
        with open(path + suffix + '.tmp', 'w') as f:
          f.write(text)
      for suffix in texts:
        os.replace(path + suffix + '.tmp', path + suffix)
    except BaseException:
      for suffix in texts:
        if os.path.exists(path + suffix + '.tmp'):
          os.remove(path + suffix + '.tmp')
      if created:
        shutil.rmtree(top, ignore_errors=True)
      raise


def run():
  """Console-script entry point."""
  cli.run(main, 'advprop_jax.plan', __doc__, define_flags)


if __name__ == '__main__':
  run()
