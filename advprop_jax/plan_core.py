"""Compile a config's real train (and eval) step for a TPU slice on a machine without a TPU, and measure it.

`plan(config, 'v4-32')` builds the slice's devices from libtpu (advprop_jax.topologies), the
(slice, replica, bn) mesh over them (TF's BN-group rule; `2xv4-32`: two slices, BN groups inside
each), the model, optimizer and TrainState as abstract
arrays (replicated) and the batch (sharded over the data axes), then traces, lowers and compiles the
step ahead of time. From the compiled program it reads XLA's per-device buffer plan, the FLOPs, and the
cross-device collectives. Nothing runs and no array is allocated: the cost is the compile (host CPU/RAM).

`compile_and_measure(step_fn, args, ...)` is the part that needs no knowledge of this codebase: any
jitted function and abstract arguments (ShapeDtypeStructs with shardings).

One process compiles for every device of a multi-host slice: the program is SPMD, the same on every
device, and the compile-only devices carry their process_index, so nothing else is needed.
"""
import collections
import contextlib
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from advprop_jax import config as config_lib
from advprop_jax import factories
from advprop_jax import flops as flops_lib
from advprop_jax import parallel
from advprop_jax import step as step_lib
from advprop_jax import topologies
from advprop_jax.eval.step import make_eval_step

_COLLECTIVE = re.compile(r'=\s*(?P<type>.*?)\s(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|'
                         r'collective-permute|collective-broadcast)(?:-start)?\(')
_GROUPS_IOTA = re.compile(r'replica_groups=\[(\d+),(\d+)\]<=')
_GROUPS_LIST = re.compile(r'replica_groups=\{\{([\d,]*)\}')
# Multislice: libtpu compiles one slice's program; what crosses slices (over the data-centre
# network, DCN) is a `send` to the megascale runtime that names the collective it implements.
_MEGASCALE = re.compile(r'=\s*(?P<type>.*?)\ssend\(.*_xla_megascale_transfer_type="(?P<kind>\w+)"')
_ARRAY = re.compile(r'\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]')
_BYTES = dict(pred=1, s8=1, u8=1, s16=2, u16=2, bf16=2, f16=2, s32=4, u32=4, f32=4, s64=8, u64=8, f64=8)


def abstract(tree, sharding):
  """ShapeDtypeStructs of `tree`'s leaves, all with `sharding` (nothing is allocated)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def tree_bytes(tree) -> int:
  return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def _array_bytes(type_text: str) -> int:
  return sum(_BYTES[t] * math.prod(int(d) for d in dims.split(',') if d)
             for t, dims in _ARRAY.findall(type_text))


def collectives(hlo_text: str, num_devices: int, num_slices: int = 1) -> dict:
  """Cross-device ops of a compiled HLO module, by kind and group size, with their result bytes.

  Counted statically: an op inside a while loop (PGD iterations) executes once per iteration but is
  listed once. XLA combines small all-reduces, so the gradient mean is a few large all-reduces, not one
  per parameter. Group size num_devices = over every device (gradients, running statistics, metrics);
  smaller groups are BatchNorm groups. Multislice (num_devices = those of ONE slice: the program is
  per slice): a reduction over every device is an all-reduce over the slice followed by the
  cross-slice
  exchange, listed as `dcn-<kind>/<num_slices>` (e.g. dcn-all-reduce/2) with the bytes each device
  sends.
  """
  found = collections.defaultdict(lambda: dict(count=0, bytes=0))
  for line in hlo_text.splitlines():
    dcn = _MEGASCALE.search(line)
    if dcn:
      entry = found[f'dcn-{dcn.group("kind").lower().replace("_", "-")}/{num_slices}']
      entry['count'] += 1
      entry['bytes'] += _array_bytes(dcn.group('type'))
      continue
    match = _COLLECTIVE.search(line)
    if not match or '-done(' in line:
      continue
    iota, listed = _GROUPS_IOTA.search(line), _GROUPS_LIST.search(line)
    if iota:
      group = int(iota.group(2))
    elif listed:
      group = len(listed.group(1).split(',')) if listed.group(1) else num_devices
    else:
      group = num_devices  # no replica_groups (e.g. collective-permute): over the whole program
    size = _array_bytes(match.group('type'))
    if match.group(0).rstrip('(').endswith('-start'):
      size //= 2  # an async start's result tuple holds the operand and the result
    entry = found[f'{match.group("op")}/{group}']
    entry['count'] += 1
    entry['bytes'] += size
  return dict(sorted(found.items()))


@contextlib.contextmanager
def _no_persistent_cache_write():
  """Keeps AOT TPU executables out of JAX's persistent compilation cache.

  libtpu's compile-only client cannot deserialize executables, so such an entry is never usable: the
  next run warns ("PjRtCompiler must be constructed with a Client to call DeserializeLoadedExecutable")
  and compiles again. JAX decides whether to write by compile time, a setting read at write time.
  """
  name = 'jax_persistent_cache_min_compile_time_secs'
  old = getattr(jax.config, name)
  jax.config.update(name, float('inf'))
  try:
    yield
  finally:
    jax.config.update(name, old)


def compile_and_measure(step_fn, args, *, num_devices: int, hbm_bytes_per_device=None,
                        num_slices: int = 1) -> dict:
  """trace + lower + compile `step_fn(*args)` ahead of time; XLA's buffer plan, FLOPs, collectives.

  Per device (the step is SPMD): argument/output/alias/temp bytes from memory_analysis();
  total = argument + output - alias (donated inputs reused as outputs) + temp. flops_per_device is
  XLA's cost analysis (a while loop's body counted once). A compile that does not fit raises
  (the TPU compiler checks HBM itself); see plan() for how that is reported.
  """
  t0 = time.perf_counter()
  lowered = step_fn.trace(*args).lower()
  t1 = time.perf_counter()
  with _no_persistent_cache_write():
    compiled = lowered.compile()
  t2 = time.perf_counter()
  memory = compiled.memory_analysis()
  plan_bytes = dict(argument_bytes=int(memory.argument_size_in_bytes),
                    output_bytes=int(memory.output_size_in_bytes),
                    alias_bytes=int(memory.alias_size_in_bytes),
                    temp_bytes=int(memory.temp_size_in_bytes),
                    generated_code_bytes=int(memory.generated_code_size_in_bytes))
  total = (plan_bytes['argument_bytes'] + plan_bytes['output_bytes'] - plan_bytes['alias_bytes']
           + plan_bytes['temp_bytes'])
  result = dict(plan_bytes, per_core_bytes=total, trace_lower_s=t1 - t0, compile_s=t2 - t1,
                flops_per_device=flops_lib.xla_flops(compiled),
                collectives=collectives(compiled.as_text(), num_devices // num_slices, num_slices))
  if hbm_bytes_per_device:
    result.update(hbm_bytes_per_core=hbm_bytes_per_device, fits=total <= hbm_bytes_per_device)
  return result


# --- this codebase's steps ----------------------------------------------------------------------------

def abstract_train_args(model, tx, config, mesh):
  """(state, batch, rng) of the train step as ShapeDtypeStructs: state replicated, batch sharded."""
  size = config.data.image_size
  n = factories.loader_batch_size(config)
  batch = {'image': jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32),
           'label': jax.ShapeDtypeStruct((n,), jnp.int32)}
  replicated = parallel.replicated_sharding(mesh)
  return (step_lib.abstract_train_state(model, tx, size, mesh),
          abstract(batch, parallel.batch_sharding(mesh)), abstract(jax.random.PRNGKey(0), replicated))


def plan_train_step(model, tx, config, mesh, lr_fn, *, hbm_bytes_per_device=None) -> dict:
  """Compiles config's train step over `mesh`; compile_and_measure's dict plus PGD FLOPs added back."""
  state, batch, rng = abstract_train_args(model, tx, config, mesh)
  step = step_lib.make_train_step(model, tx, config, mesh, lr_fn, config.ema_decay)
  devices = mesh.devices.size
  result = compile_and_measure(step, (state, batch, rng), num_devices=devices,
                               hbm_bytes_per_device=hbm_bytes_per_device,
                               num_slices=parallel.num_slices(mesh))
  n = factories.loader_batch_size(config)
  # HloCostAnalysis counts the PGD fori_loop body once: add iterations 2..K (forward + input gradient).
  pgd_extra = flops_lib.attack_loop_flops(model, config, state.params, state.model_state, n // devices)
  # It also counts the k micro-batches' scan body once (gradient accumulation): k times that, which
  # counts the one optimizer update k times too (a few FLOPs per parameter: negligible).
  k = int(config.grad_accumulation_steps)
  result.update(num_params=sum(math.prod(a.shape) for a in jax.tree.leaves(state.params)),
                param_bytes=tree_bytes(state.params),
                replicated_state_bytes=tree_bytes(state), batch_bytes_per_core=tree_bytes(batch) // devices,
                pgd_extra_flops_per_device=pgd_extra,
                hlo_flops_per_device=result['flops_per_device'],
                flops_per_device=result['flops_per_device'] * k)
  result['flops_per_step'] = (result['flops_per_device'] + pgd_extra) * devices
  result['flops_per_image'] = result['flops_per_step'] / n
  return result


def plan_evaluation(model, config, mesh, *, hbm_bytes_per_device=None) -> dict:
  """Compiles the clean eval step (EMA weights, main BN) at config.eval_batch_size."""
  size = config.data.image_size
  variables = jax.eval_shape(lambda rng: step_lib.init_variables(model, rng, size), jax.random.PRNGKey(0))
  replicated = parallel.replicated_sharding(mesh)
  params = abstract(variables['params'], replicated)
  model_state = abstract({k: v for k, v in variables.items() if k != 'params'}, replicated)
  n = config.eval_batch_size
  batch = abstract({'image': jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32),
                    'label': jax.ShapeDtypeStruct((n,), jnp.int32),
                    'mask': jax.ShapeDtypeStruct((n,), jnp.float32)}, parallel.batch_sharding(mesh))
  step = make_eval_step(model, mesh, num_classes=config.num_classes)
  result = compile_and_measure(step, (params, model_state, batch), num_devices=mesh.devices.size,
                               hbm_bytes_per_device=hbm_bytes_per_device,
                               num_slices=parallel.num_slices(mesh))
  result['flops_per_image'] = result['flops_per_device'] * mesh.devices.size / n
  return result


# libtpu 0.0.42: "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO
# temporaries (70.45G) exceeds available HBM (30.75G)." (binary units); older: "Used X of Y hbm".
_HBM_EXHAUSTED = (re.compile(r'\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)'),
                  re.compile(r'Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm'))


def hbm_exhausted(error: Exception):
  """(required, available) bytes from the TPU compiler's out-of-HBM error, or None."""
  for pattern in _HBM_EXHAUSTED:
    match = pattern.search(str(error))
    if match:
      scale = lambda unit: 1024 ** ' KMGT'.index(unit or ' ')
      return (int(float(match.group(1)) * scale(match.group(2))),
              int(float(match.group(3)) * scale(match.group(4))))
  return None


def plan(config, topology: str, *, eval_step: bool = False) -> dict:
  """Compiles `config`'s train step for TPU slice `topology` ('v4-32'); one dict of facts.

  Batches as training has them: the global batch (loader batch for Fast AdvProp) is sharded over every
  device of the slice; each process feeds global / processes images. The learning-rate schedule does
  not change the program's shape, memory or FLOPs, so a nominal steps-per-epoch builds it.
  """
  tpu = topologies.parse(topology)
  config_lib.validate(config, tpu.devices, tpu.processes, tpu.slices)
  devices = topologies.slice_devices(tpu)
  mesh = parallel.create_mesh(config.bn_group_size, devices=devices)
  model = factories.build_model(config, platform=devices[0].platform)
  tx, lr_fn = factories.build_optimizer(config, 1000.0)
  n = factories.loader_batch_size(config)
  result = dict(tpu.describe(), model=config.model, method=config.method, dtype=config.dtype,
                image_size=config.data.image_size, global_batch=n, per_process_batch=n // tpu.processes,
                per_core_batch=n // tpu.devices, bn_group_size=int(mesh.shape[parallel.BN_AXIS]),
                grad_accumulation_steps=int(config.grad_accumulation_steps),
                depthwise_impl=getattr(model, 'depthwise_impl', None),
                remat=bool(getattr(model, 'remat', False)), peak_flops_per_core=tpu.peak_flops_per_device)
  hbm = tpu.usable_hbm_bytes_per_device
  t = time.perf_counter()
  try:
    result.update(plan_train_step(model, tx, config, mesh, lr_fn, hbm_bytes_per_device=hbm))
  except Exception as e:  # pylint: disable=broad-except
    exhausted = hbm_exhausted(e)
    if exhausted is None:
      raise
    # The TPU compiler refuses a program that does not fit in HBM (after trying to rematerialise):
    # that is the answer. Its figure is what it needed for temporaries alone.
    result.update(fits=False, hbm_bytes_per_core=exhausted[1], temp_bytes_required=exhausted[0],
                  compile_s=time.perf_counter() - t, compile_error=str(e).splitlines()[0])
  if eval_step:
    try:
      result['eval'] = plan_evaluation(model, config, mesh, hbm_bytes_per_device=hbm)
    except Exception as e:  # pylint: disable=broad-except
      if hbm_exhausted(e) is None:
        raise
      result['eval'] = dict(fits=False, compile_error=str(e).splitlines()[0])
  return result
