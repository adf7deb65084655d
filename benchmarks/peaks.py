"""Peak FLOP/s and peak memory of the device a benchmark runs on (for MFU and the memory column)."""
import math
import resource
import sys
import time

import jax
import jax.numpy as jnp

# Peak dense FLOP/s per device, (device-kind substring, lowercase) -> {dtype: flops}. Published numbers:
# H100/H200 SXM: 989 TFLOP/s bf16 dense tensor core, 67 TFLOP/s fp32 (non-tensor core; 'float32' here
# means XLA's default precision, which on H100 may use TF32 tensor cores: MFU vs 67e12 can exceed 1 then).
# TPUs: the bf16 MXU peak (fp32 matmuls are done as several bf16 passes), used for both dtypes.
PEAK_FLOPS = {
    'h100': {'bfloat16': 989e12, 'float32': 67e12},
    'h200': {'bfloat16': 989e12, 'float32': 67e12},
    'tpu v4': {'bfloat16': 275e12, 'float32': 275e12},
    'tpu v5 lite': {'bfloat16': 197e12, 'float32': 197e12},  # v5e
    'tpu v5e': {'bfloat16': 197e12, 'float32': 197e12},
    'tpu v5p': {'bfloat16': 459e12, 'float32': 459e12},
    'tpu v5': {'bfloat16': 459e12, 'float32': 459e12},  # v5p reports 'TPU v5'
    'tpu v6 lite': {'bfloat16': 918e12, 'float32': 918e12},  # v6e (Trillium)
    'tpu v6e': {'bfloat16': 918e12, 'float32': 918e12},
}
# This 2-core AMD EPYC VM (AVX2+FMA), as measured by measure_cpu_peak() (best of 1024^3 fp32 matmuls
# using both cores, jaxlib 0.10.2): the per-*process* CPU peak, since XLA:CPU is one device for all cores.
CPU_MEASURED_PEAK_FLOPS = {'float32': 87e9, 'bfloat16': 87e9}


def measure_cpu_peak(n: int = 2048, reps: int = 5) -> float:
  """Best fp32 FLOP/s of an n^3 matmul on the default device (all the host's threads), per device."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = math.inf
  for _ in range(reps):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best / jax.local_device_count()


def device_peak_flops(device, dtype: str):
  """(peak FLOP/s per device, source) for `device`, or (None, reason)."""
  kind = device.device_kind.lower()
  if device.platform == 'cpu':
    # The table entry is the whole host's; XLA:CPU devices of one process share its cores.
    n = jax.local_device_count()
    return (CPU_MEASURED_PEAK_FLOPS[dtype] / n,
            f'cpu-as-measured (2-core EPYC VM table entry{f", / {n} devices" if n > 1 else ""})')
  for key in sorted(PEAK_FLOPS, key=len, reverse=True):  # most specific first
    if key in kind:
      return PEAK_FLOPS[key][dtype], f'published {key} {dtype}'
  return None, f'unknown device kind {device.device_kind!r}: pass --peak_flops'


def peak_memory(device):
  """(bytes, source): the device allocator's peak, or the process max RSS where there is none (CPU)."""
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    pass
  if stats and 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device peak_bytes_in_use'
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  rss *= 1 if sys.platform == 'darwin' else 1024  # Linux reports KiB
  return int(rss), 'process max RSS (no device memory_stats on this backend)'
