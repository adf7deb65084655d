"""Train-step throughput, compile time, peak memory and MFU of the real training step.

  python -m benchmarks.throughput --model=efficientnet-b0 --method=advprop --batch=16 \
      --image_size=224 --dtype=float32 --steps=5 [--attack_steps=K] [--remat] [--bn_group_size=k] \
      [--model_overrides='{"width": 0.25}'] [--peak_flops=F] [--cpu_devices=N]
  python -m benchmarks.throughput --methods=vanilla,advprop --attack_steps=1,5   # one process, compared

The model, optimizer and step are built exactly as training builds them (factories.build_model /
build_optimizer, step.create_train_state / make_train_step over the mesh of all local devices), from
`advprop_jax.config.base_config()`; the batch is synthetic and already on the mesh, so only the step is
timed (TensorFlow is not needed). Compilation is timed separately (trace+lower, then compile). FLOPs come from XLA's cost analysis
of the compiled step (per-device program); MFU = achieved FLOP/s / the device's peak FLOP/s
(benchmarks/peaks.py, or --peak_flops). `images_per_sec` counts images drawn from the loader (the clean
batch), so methods that do more work per image (AdvProp) compare on the same data. The last line printed
is JSON (a list when several runs are made: one object per run, plus the cost-model comparison).

On a CPU-only host the step runs data-parallel over one XLA:CPU device per core (`--cpu_devices`, default:
one per core when the batch divides) with global BatchNorm (`--bn_group_size=-1`, the CPU default), so
it does exactly the single-device work: XLA:CPU runs the devices' programs concurrently, which keeps
both cores busy through the step's many small, serial ops (B0 vanilla on 2 cores: ~10-20 % faster than
one device with both cores). On Linux the command re-runs itself with GLIBC_TUNABLES=glibc.malloc.hugetlb=1
(benchmarks/hugepages.py; --no_hugepages to opt out): ~25 % faster CPU steps. Both in RESULTS.md.

Cost model (`cost_model`): AdvProp with K PGD steps costs ~(K + 2) x a vanilla step (K attack
forward+backward passes, plus the clean and the adversarial training forward+backward); Fast AdvProp
~1.5x per step, 1.2x per loader image, ~1.0x per budget-matched run.
"""
import argparse
import json
import os
import statistics
import time

from benchmarks import hugepages
from benchmarks import peaks
import jax
import numpy as np

from advprop_jax import config as config_lib
from advprop_jax import factories
from advprop_jax import flops as flops_lib
from advprop_jax import methods
from advprop_jax import parallel
from advprop_jax import step as step_lib


def make_config(args, method: str, attack_steps: int):
  config = config_lib.base_config()
  config.model = args.model
  config.method = method
  config.dtype = args.dtype
  config.num_classes = args.num_classes
  config.global_batch_size = args.batch
  config.data.image_size = args.image_size
  config.bn_group_size = args.bn_group_size
  config.attack.num_steps = attack_steps
  overrides = json.loads(args.model_overrides) if args.model_overrides else {}
  if args.remat:
    overrides['remat'] = True
  config.model_overrides.update(overrides)
  config_lib.validate(config, jax.device_count(), jax.process_count())
  return config


def run_one(args, method: str, attack_steps: int, log=print) -> dict:
  """Builds the training step for one (method, attack_steps) and measures it."""
  config = make_config(args, method, attack_steps)
  mesh = parallel.create_mesh(config.bn_group_size)
  model = factories.build_model(config)
  tx, lr_fn = factories.build_optimizer(config, 1000)
  rng = jax.random.PRNGKey(0)
  state = step_lib.create_train_state(model, tx, rng, config.data.image_size, mesh)
  step_fn = step_lib.make_train_step(model, tx, config, mesh, lr_fn, config.ema_decay)

  n = factories.loader_batch_size(config)
  data_rng = np.random.default_rng(0)
  size = config.data.image_size
  batch = jax.device_put(
      {'image': data_rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32),
       'label': data_rng.integers(0, config.num_classes, (n,)).astype(np.int32)},
      parallel.batch_sharding(mesh))
  step_rng = jax.random.PRNGKey(1)

  t0 = time.perf_counter()
  lowered = step_fn.lower(state, batch, step_rng)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  xla_flops = flops_lib.xla_flops(compiled)  # per-device program
  flops = xla_flops + flops_lib.attack_loop_flops(model, config, state.params, state.model_state,
                                                  n // len(mesh.devices.flat))
  temp_bytes = footprint = None
  try:
    ma = compiled.memory_analysis()
    temp_bytes = int(ma.temp_size_in_bytes)
    # What the step program holds at once by XLA's buffer plan: inputs + outputs (less those donated
    # into outputs) + scratch. Per run, unlike the allocator's peak, which is the process's so far.
    footprint = int(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
                    + ma.temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    pass
  if args.compile_only:
    log(f'[{method} compile only] trace+lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s, '
        f'XLA footprint {(footprint or 0) / 2**20:.0f} MiB')
    return dict(model=args.model, method=method, batch=n, image_size=size, dtype=args.dtype,
                trace_lower_s=t1 - t0, compile_s=t2 - t1, xla_footprint_bytes=footprint,
                compiled_temp_bytes=temp_bytes)

  times = []
  for i in range(args.warmup + args.steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch, step_rng)
    jax.block_until_ready((state, metrics))
    if i >= args.warmup:
      times.append(time.perf_counter() - t)
  loss = float(metrics['loss'])
  step_s = statistics.median(times)
  device = jax.local_devices()[0]
  num_dev = len(mesh.devices.flat)
  peak, peak_src = (args.peak_flops, '--peak_flops') if args.peak_flops else \
      peaks.device_peak_flops(device, args.dtype)
  achieved = flops / step_s  # per device
  mem, mem_src = peaks.peak_memory(device)
  result = dict(
      model=args.model, method=method, attack_steps=attack_steps,
      batch=n, image_size=size, dtype=args.dtype, remat=bool(config.model_overrides.get('remat', False)),
      devices=num_dev, bn_group_size=int(mesh.shape[parallel.BN_AXIS]), device_kind=device.device_kind,
      images_per_sec=n / step_s, step_ms=step_s * 1e3, step_ms_min=min(times) * 1e3,
      step_ms_all=[round(t * 1e3, 1) for t in times],
      trace_lower_s=t1 - t0, compile_s=t2 - t1,
      peak_bytes=mem, peak_bytes_source=mem_src, compiled_temp_bytes=temp_bytes,
      xla_footprint_bytes=footprint,
      flops_per_step=flops * num_dev, xla_cost_analysis_flops=xla_flops * num_dev,
      achieved_flops_per_sec=achieved * num_dev,
      peak_flops_per_device=peak, peak_flops_source=peak_src,
      mfu=achieved / peak if peak else float('nan'), loss=loss,
      load_average=os.getloadavg()[0], xla_flags=os.environ.get('XLA_FLAGS', ''),
      glibc_tunables=os.environ.get('GLIBC_TUNABLES', ''))
  log(f'[{method}{f" PGD-{attack_steps}" if attack_steps else ""}] {n / step_s:.2f} img/s, '
      f'step {step_s * 1e3:.1f} ms (median of {len(times)}, min {min(times) * 1e3:.1f}), '
      f'trace+lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s, peak mem {mem / 2**20:.0f} MiB '
      f'({mem_src}), XLA temp {0 if temp_bytes is None else temp_bytes / 2**20:.0f} MiB, '
      f'{flops * num_dev / 1e9:.1f} GFLOP/step, {achieved * num_dev / 1e9:.1f} GFLOP/s, '
      f'MFU {result["mfu"]:.3f} vs {peak_src}, loss {loss:.3f}, load avg {result["load_average"]:.2f}')
  return result


def cost_model(results) -> list:
  """Each method's step time vs vanilla's, next to what its Method record's cost model predicts.

  AdvProp PGD-K: (K + 2) forward+backward passes per clean image. Fast AdvProp: its loader batch is
  n_clean + n_adv images and it trains on n_clean clean + n_adv attacked + n_adv adversarial ones, all
  with parameter gradients: 1.5x vanilla's passes at the default fraction. The paper's "same budget" is
  per run: per loader image that is 1.2x, and the budget-matched schedule of configs/resnet.py trains 87
  instead of 105 epochs, so a run costs step ratio x (vanilla batch / loader batch) x (87 / 105).
  """
  vanilla = [r for r in results if r['method'] == 'vanilla']
  if not vanilla:
    return []
  base = vanilla[0]
  rows = []
  for r in results:
    config = config_lib.base_config()
    config.method, config.global_batch_size = r['method'], base['batch']
    config.attack.num_steps = r['attack_steps']
    predicted = methods.get(r['method']).relative_cost(config)
    if r is base or predicted is None:
      continue
    measured = r['step_ms'] / base['step_ms']
    per_image = measured * base['batch'] / r['batch']
    epochs = recipe_epoch_ratio(r['method'])
    rows.append(dict(method=r['method'], attack_steps=r['attack_steps'], measured_ratio=measured,
                     flops_ratio=r['flops_per_step'] / base['flops_per_step'], predicted_ratio=predicted,
                     measured_over_predicted=measured / predicted, per_loader_image_ratio=per_image,
                     epoch_ratio=epochs, per_run_ratio=per_image * epochs))
  return rows


def recipe_epoch_ratio(method: str) -> float:
  """Epochs of `method`'s run over vanilla's in configs/resnet.py (Fast AdvProp: budget-matched 87/105)."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'resnet.py')
  return (config_lib.load_file(path, f'50,{method}').num_epochs /
          config_lib.load_file(path, '50,vanilla').num_epochs)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='efficientnet-b0')
  p.add_argument('--method', default='advprop', help='one method (see --methods)')
  p.add_argument('--methods', default=None, help='comma-separated methods, run in one process')
  p.add_argument('--attack_steps', default='1',
                 help='PGD steps (comma-separated list: one advprop run each); 0 = the paper rule')
  p.add_argument('--batch', type=int, default=16, help='global batch (images from the loader)')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--num_classes', type=int, default=1000)
  p.add_argument('--steps', type=int, default=5, help='timed steps')
  p.add_argument('--warmup', type=int, default=1, help='untimed steps after compiling')
  p.add_argument('--remat', action='store_true', help='model override remat=True')
  p.add_argument('--bn_group_size', type=int, default=None,
                 help='default: -1 (global BN: the single-device statistics) on CPU, 0 (the TF rule of '
                      'the recipe) on accelerators')
  p.add_argument('--cpu_devices', type=int, default=0,
                 help='XLA:CPU devices to split a CPU-only host into (one per core is fastest); 0 = one '
                      'per core when every run\'s loader batch divides, else 1. Must be set before JAX '
                      'starts: ignored (with a message) when called in a process that already has, and '
                      'when XLA_FLAGS forces a device count')
  p.add_argument('--model_overrides', default='', help='JSON dict of create_model overrides')
  p.add_argument('--peak_flops', type=float, default=None, help='peak FLOP/s per device (MFU)')
  p.add_argument('--compile_only', action='store_true',
                 help='build and compile only (no steps): fills a persistent compilation cache '
                      '(JAX_COMPILATION_CACHE_DIR) so several configs can compile in parallel, then be '
                      'timed one by one')
  p.add_argument('--no_hugepages', action='store_true',
                 help='run as started: do not re-exec with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 '
                      '(huge pages for host buffers: ~25 %% faster CPU steps for B0; see RESULTS.md)')
  p.add_argument('--measure_peak', action='store_true',
                 help='measure this CPU\'s fp32 matmul peak and use it for MFU')
  return p.parse_args(argv)


def host_cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def _uses_attack_steps(method: str) -> bool:
  """Whether `method`'s attacks change with config.attack.num_steps (PGD methods; not vanilla, Fast
  AdvProp's single step or A-FAN's feature attack)."""
  def attacks(k):
    config = config_lib.base_config()
    config.method, config.attack.num_steps = method, k
    return methods.get(method).attacks(config)
  return attacks(1) != attacks(2)


def split_cpu_devices(args, method_names, log=print) -> None:
  """Makes JAX expose `args.cpu_devices` CPU devices (0: one per core if the batches divide).

  Only the CPU backend is affected: on an accelerator host the mesh is the accelerators whatever this
  sets. Must run before the first JAX computation.
  """
  n = args.cpu_devices
  if n == 0:
    n = host_cores()
    for name in method_names:
      config = config_lib.base_config()
      config.method, config.global_batch_size = name, args.batch
      if factories.loader_batch_size(config) % n:
        n = 1
  if n == jax.config.jax_num_cpu_devices or 'xla_force_host_platform_device_count' in \
      os.environ.get('XLA_FLAGS', ''):
    return
  try:
    jax.config.update('jax_num_cpu_devices', n)
  except RuntimeError:  # backends already up (the harness called from a test or a notebook)
    if args.cpu_devices:
      log(f'--cpu_devices={args.cpu_devices} ignored: JAX already started with '
          f'{jax.local_device_count()} devices')


def main(argv=None, log=print) -> list:
  args = parse_args(argv)
  method_names = (args.methods or args.method).split(',')
  split_cpu_devices(args, method_names, log)
  if args.bn_group_size is None:
    args.bn_group_size = -1 if jax.default_backend() == 'cpu' else 0
  if args.measure_peak:
    args.peak_flops = peaks.measure_cpu_peak()
    log(f'measured peak: {args.peak_flops / 1e9:.1f} GFLOP/s per device (fp32 2048^3 matmul, best of 5)')
  ks = [int(k) for k in str(args.attack_steps).split(',')]
  runs = []
  for name in method_names:
    # Only the methods whose attacks run config.attack.num_steps PGD steps vary with K.
    for k in (ks if _uses_attack_steps(name) else [0]):
      runs.append((name, k))
  results = [run_one(args, m, k, log=log) for m, k in runs]
  if args.compile_only:
    log(json.dumps(results))
    return results
  comparison = cost_model(results)
  for row in comparison:
    attack = f' PGD-{row["attack_steps"]}' if row['attack_steps'] else ''
    log(f'{row["method"]}{attack}: {row["measured_ratio"]:.2f}x vanilla step time; cost model '
        f'{row["predicted_ratio"]:.2f}x passes -> measured/predicted {row["measured_over_predicted"]:.2f}; '
        f'XLA FLOPs {row["flops_ratio"]:.2f}x; per loader image {row["per_loader_image_ratio"]:.2f}x; '
        f'per recipe run ({row["epoch_ratio"]:.3f} of the epochs) {row["per_run_ratio"]:.2f}x')
  out = results[0] if len(results) == 1 else dict(runs=results, cost_model=comparison)
  if len(results) > 1:  # headline keys of the first run, so every output has them at the top level
    out.update({k: results[0][k] for k in ('images_per_sec', 'step_ms', 'compile_s', 'peak_bytes',
                                           'mfu')})
  log(json.dumps(out))
  return results


if __name__ == '__main__':
  hugepages.reexec_with_hugepages()
  main()
