"""Re-run the current command with glibc's malloc backing large blocks by transparent huge pages.

XLA:CPU allocates a step's scratch (hundreds of MiB) and its large outputs afresh on every run; glibc
serves such blocks by mmap, so every step page-faults them in 4 KiB at a time (writing one 38 MB
activation: ~14 ms with first-touch page faults, ~2 ms into reused memory). With
GLIBC_TUNABLES=glibc.malloc.hugetlb=1, malloc asks for 2 MiB transparent huge pages (madvise), which cuts
those faults 512-fold and the TLB misses of strided slices (B0 step on 2 cores: ~1500 -> ~1100 ms;
benchmarks/RESULTS.md). glibc reads tunables only at process start, hence the re-exec. No effect where
glibc or THP (`/sys/kernel/mm/transparent_hugepage/enabled` = madvise or always) is missing.

Used by both benchmarks/throughput.py and benchmarks/timm_reference.py, so the two sides of the timm
comparison run in the same environment. No JAX import: the timm venv has none.
"""
import os
import sys

TUNABLE = 'glibc.malloc.hugetlb=1'
OPT_OUT = '--no_hugepages'


def reexec_with_hugepages() -> None:
  """execve()s this command again with TUNABLE added, unless set already, opted out or not Linux."""
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if (not sys.platform.startswith('linux') or 'glibc.malloc.hugetlb' in tunables
      or OPT_OUT in sys.argv[1:]):
    return
  print(f're-running with GLIBC_TUNABLES={TUNABLE} ({OPT_OUT} to measure without)', flush=True)
  env = dict(os.environ, GLIBC_TUNABLES=':'.join(filter(None, (tunables, TUNABLE))))
  # sys.orig_argv keeps the interpreter's own options (-m module, -X ...), sys.argv does not.
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
