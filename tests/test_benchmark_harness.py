"""benchmarks/throughput.py runs the real train step end to end and reports sane numbers (not speed)."""
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import pytest

from benchmarks import peaks
from benchmarks import throughput

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEYS = ('images_per_sec', 'step_ms', 'compile_s', 'peak_bytes', 'mfu')
TINY = ['--model_overrides=' + json.dumps(dict(width=0.25, depth=0.25, depthwise_impl='grouped',
                                               head_features=64, drop_connect_rate=0.0)),
        '--image_size=32', '--batch=8', '--steps=2', '--num_classes=10']


def _positive_finite(record, keys):
  for key in keys:
    value = record[key]
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


def test_harness_json_line():
  lines = []
  (result,) = throughput.main(TINY + ['--method=advprop', '--attack_steps=2'], log=lines.append)
  out = json.loads(lines[-1])  # the last printed line is the JSON summary
  _positive_finite(out, KEYS + ('flops_per_step', 'achieved_flops_per_sec', 'trace_lower_s'))
  assert out['method'] == 'advprop' and out['attack_steps'] == 2
  assert out['devices'] == jax.device_count() and out['batch'] == 8 and math.isfinite(out['loss'])
  # XLA counts the PGD fori_loop body once; the harness adds the second iteration back.
  assert result['flops_per_step'] > result['xla_cost_analysis_flops'] > 0


@pytest.mark.slow  # a fresh process and its compile: ~1 min
def test_cpu_host_split_into_devices_with_global_bn():
  """--cpu_devices splits the CPU into devices (a fresh process: JAX fixes the count at start-up) and
  the CPU default is global BN, so the split step computes the single-device statistics."""
  env = dict(os.environ, XLA_FLAGS=re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                                          os.environ.get('XLA_FLAGS', '')))
  proc = subprocess.run([sys.executable, '-m', 'benchmarks.throughput', *TINY, '--method=vanilla',
                         '--cpu_devices=2', '--steps=1', '--warmup=0'],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=True)
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['devices'] == 2 and out['bn_group_size'] == 2, out
  # The host's peak is shared by its devices.
  assert out['peak_flops_per_device'] == peaks.CPU_MEASURED_PEAK_FLOPS['float32'] / 2


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc tunables are Linux-only')
def test_hugepages_reexec_sets_the_tunable_once_and_keeps_the_command():
  script = ('import os, sys; from benchmarks import hugepages; hugepages.reexec_with_hugepages(); '
            'print("TUNABLES=" + os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:])')
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}

  def run(*args):
    return subprocess.run([sys.executable, '-c', script, *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60, check=True).stdout
  out = run('--steps=3')
  assert 're-running' in out and "TUNABLES=glibc.malloc.hugetlb=1 ['--steps=3']" in out, out
  assert "TUNABLES= ['--no_hugepages']" in run('--no_hugepages')


def test_cost_model_ratio():
  runs = [dict(method='vanilla', attack_steps=0, batch=16, step_ms=10.0, flops_per_step=1.0),
          dict(method='advprop', attack_steps=1, batch=16, step_ms=25.0, flops_per_step=2.5),
          dict(method='advprop', attack_steps=5, batch=16, step_ms=80.0, flops_per_step=6.0)]
  rows = throughput.cost_model(runs)
  assert [r['predicted_ratio'] for r in rows] == [3, 7]
  assert rows[0]['measured_ratio'] == pytest.approx(2.5)
  assert rows[1]['measured_over_predicted'] == pytest.approx(8 / 7)
  assert rows[1]['flops_ratio'] == pytest.approx(6.0)


def test_cost_model_fast_advprop_per_run():
  # 16 clean + 4 attacked + 4 adversarial passes vs 16; the run is 87 of 105 epochs (configs/resnet.py).
  runs = [dict(method='vanilla', attack_steps=0, batch=16, step_ms=10.0, flops_per_step=1.0),
          dict(method='fast_advprop', attack_steps=0, batch=20, step_ms=15.0, flops_per_step=1.5)]
  (row,) = throughput.cost_model(runs)
  assert row['predicted_ratio'] == pytest.approx(1.5) and row['measured_ratio'] == pytest.approx(1.5)
  assert row['per_loader_image_ratio'] == pytest.approx(1.2)
  assert row['epoch_ratio'] == pytest.approx(87 / 105)
  assert row['per_run_ratio'] == pytest.approx(1.2 * 87 / 105)


def test_peak_flops_table_and_override():
  class Dev:  # pylint: disable=too-few-public-methods
    platform, device_kind = 'gpu', 'NVIDIA H100 80GB HBM3'
  assert peaks.device_peak_flops(Dev, 'bfloat16')[0] == 989e12
  Dev.platform, Dev.device_kind = 'tpu', 'TPU v5 lite'
  assert peaks.device_peak_flops(Dev, 'bfloat16')[0] == 197e12
  Dev.device_kind = 'TPU v5p'
  assert peaks.device_peak_flops(Dev, 'bfloat16')[0] == 459e12
  Dev.device_kind = 'mystery'
  assert peaks.device_peak_flops(Dev, 'bfloat16')[0] is None
  args = throughput.parse_args(['--peak_flops=1e9', '--remat'])
  assert args.peak_flops == 1e9 and args.remat


@pytest.mark.parametrize('argv', [['--model_overrides={"width": 0.25, "no_such_field": 1}']])
def test_bad_override_is_rejected(argv):
  with pytest.raises(ValueError, match='no_such_field'):
    throughput.main(TINY[1:] + argv, log=lambda _: None)


def test_compile_only_reports_compile_and_footprint_without_steps():
  lines = []
  (result,) = throughput.main(TINY + ['--method=vanilla', '--compile_only'], log=lines.append)
  _positive_finite(result, ('compile_s', 'xla_footprint_bytes', 'compiled_temp_bytes'))
  assert 'step_ms' not in result and json.loads(lines[-1])[0]['method'] == 'vanilla'


def test_step_memory_counts_state_and_remat_residuals():
  from benchmarks import memory
  kwargs = dict(model_name='efficientnet-b0', image_size=32, batch=2, dtype='float32', num_classes=1000)
  plain = memory.step_memory(method='vanilla', remat=False, **kwargs)
  remat = memory.step_memory(method='vanilla', remat=True, **kwargs)
  advprop = memory.step_memory(method='advprop', remat=False, **kwargs)
  assert plain['num_params'] == 5_288_548  # RECIPE's B0 count: vanilla has the clean BN only
  # params, EMA params, gradients and TF-RMSProp's two slots are five fp32 copies of the params.
  assert plain['state_bytes'] >= 5 * 4 * plain['num_params']
  assert plain['batch_bytes'] == 2 * 32 * 32 * 3 * 4 + 2 * 4
  # remat keeps only each block's input (and the stem/head's): a small fraction of the activations.
  act = 'activation_residual_bytes'
  assert 0 < remat[act] < 0.2 * plain[act] < plain['residual_bytes']
  # AdvProp keeps both training passes' activations (plus the adversarial batch).
  assert advprop[act] > 1.9 * plain[act]
