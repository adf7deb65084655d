"""benchmarks/throughput.py runs the real train step end to end and reports sane numbers (not speed)."""
import json
import math

import jax
import pytest

from benchmarks import throughput

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


def test_cost_model_ratio():
  runs = [dict(method='vanilla', attack_steps=0, step_ms=10.0, flops_per_step=1.0),
          dict(method='advprop', attack_steps=1, step_ms=25.0, flops_per_step=2.5),
          dict(method='advprop', attack_steps=5, step_ms=80.0, flops_per_step=6.0)]
  rows = throughput.cost_model(runs)
  assert [r['predicted_ratio'] for r in rows] == [3, 7]
  assert rows[0]['measured_ratio'] == pytest.approx(2.5)
  assert rows[1]['measured_over_predicted'] == pytest.approx(8 / 7)
  assert rows[1]['flops_ratio'] == pytest.approx(6.0)


def test_peak_flops_table_and_override():
  class Dev:  # pylint: disable=too-few-public-methods
    platform, device_kind = 'gpu', 'NVIDIA H100 80GB HBM3'
  assert throughput.device_peak_flops(Dev, 'bfloat16')[0] == 989e12
  Dev.platform, Dev.device_kind = 'tpu', 'TPU v5 lite'
  assert throughput.device_peak_flops(Dev, 'bfloat16')[0] == 197e12
  Dev.device_kind = 'TPU v5p'
  assert throughput.device_peak_flops(Dev, 'bfloat16')[0] == 459e12
  Dev.device_kind = 'mystery'
  assert throughput.device_peak_flops(Dev, 'bfloat16')[0] is None
  args = throughput.parse_args(['--peak_flops=1e9', '--remat'])
  assert args.peak_flops == 1e9 and args.remat


@pytest.mark.parametrize('argv', [['--model_overrides={"width": 0.25, "no_such_field": 1}']])
def test_bad_override_is_rejected(argv):
  with pytest.raises(ValueError, match='no_such_field'):
    throughput.main(TINY[1:] + argv, log=lambda _: None)
