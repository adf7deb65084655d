"""`plan --fit` (#28 item 3): the smallest gradient accumulation (then remat) whose step fits a
slice, estimated from the first compile's buffer plan and confirmed by one more compile.

The choice logic runs here on recorded buffer plans (no compile); the command line compiles a tiny
model for a v5e slice whose batch does not fit one chip's HBM (libtpu; slow).
"""
import importlib.util
import json

import pytest

from advprop_jax import cli
from advprop_jax import config as config_lib
from advprop_jax import plan_fit

GIB = 2 ** 30
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason='libtpu is not installed (requirements-tpu.txt)')


def test_k_from_one_buffer_plan_is_the_smallest_divisor_whose_estimate_fits():
  # 64 images per core: 40 GiB of temporaries, 1 GiB fixed, 16 GiB of HBM -> 40/k + 1 <= 16: k = 4.
  k = plan_fit.estimate_k([(64, 40 * GIB)], fixed=GIB, hbm=16 * GIB, per_core_batch=64)
  assert k == 4
  # The gradient sum the loop carries counts for k > 1 (40/4 + 1 + 6 > 16 -> k = 8).
  assert plan_fit.estimate_k([(64, 40 * GIB)], fixed=GIB, hbm=16 * GIB, per_core_batch=64,
                             accumulator_bytes=6 * GIB) == 8
  # Only divisors of the per-core batch: 48 images, 40 GiB -> k = 3 (k = 4 would also fit).
  assert plan_fit.estimate_k([(48, 40 * GIB)], fixed=GIB, hbm=16 * GIB, per_core_batch=48) == 3
  # Even one image per micro-batch would not fit.
  assert plan_fit.estimate_k([(4, 400 * GIB)], fixed=GIB, hbm=16 * GIB, per_core_batch=4) is None


def test_a_second_point_gives_the_line_and_a_larger_k():
  # temp(b) = 8 GiB + 0.5 GiB * b: at 64 images 40 GiB; at 16 images (k = 4) 16 GiB, not 10.
  points = [(64, 40 * GIB), (16, 16 * GIB)]
  # k = 8: 8 + 0.5 * 8 + 1 = 13 GiB fits 16; k = 16: 8 + 2 + 1 = 11 GiB is needed for 12.
  assert plan_fit.estimate_k(points, fixed=GIB, hbm=16 * GIB, per_core_batch=64, above=4) == 8
  assert plan_fit.estimate_k(points, fixed=GIB, hbm=12 * GIB, per_core_batch=64, above=4) == 16


def fake_plan(temps, hbm=16 * GIB, per_core=64):
  """plan_core.plan stand-in: temporaries by (k, remat); fixed 1 GiB; records its calls."""
  calls = []

  def plan(config, topology):
    k, remat = config.grad_accumulation_steps, bool(config.model_overrides.remat)
    calls.append((k, remat))
    temp = temps(per_core // k, remat)
    total = GIB + temp
    return dict(topology=topology, fits=total <= hbm, per_core_bytes=total, temp_bytes=temp,
                argument_bytes=GIB, output_bytes=GIB, alias_bytes=GIB, hbm_bytes_per_core=hbm,
                per_core_batch=per_core, global_batch=per_core * 4, devices=4, slices=1,
                grad_accumulation_steps=k, remat=remat, param_bytes=0, bn_group_size=1,
                compile_s=1.0)
  return plan, calls


def config():
  c = config_lib.base_config()
  c.global_batch_size = 256
  return c


def test_fit_estimates_then_confirms_in_two_compiles():
  plan, calls = fake_plan(lambda b, remat: b * GIB // 2)  # proportional: 32 GiB at 64 images
  result = plan_fit.fit(config(), 'v5litepod-4', plan)
  assert calls == [(1, False), (4, False)]
  assert result['fits'] and result['grad_accumulation_steps'] == 4 and not result['remat']
  assert [t['fits'] for t in result['fit_trials']] == [False, True]


def test_fit_corrects_the_estimate_once_from_two_points():
  plan, calls = fake_plan(lambda b, remat: 8 * GIB + b * GIB // 2)  # a part that does not shrink
  result = plan_fit.fit(config(), 'v5litepod-4', plan)
  assert calls == [(1, False), (4, False), (8, False)]  # 8 + 8 + 1 > 16; then 8 + 4 + 1 fits
  assert result['fits'] and result['grad_accumulation_steps'] == 8


def test_fit_takes_remat_only_when_no_k_fits_without_it():
  plan, calls = fake_plan(lambda b, remat: (2 if remat else 20) * GIB + b * GIB // 8)
  result = plan_fit.fit(config(), 'v5litepod-4', plan)
  # Without remat even 1 image per micro-batch needs 20 GiB: the estimate k = 2 fails, the line
  # through it says no k fits, the double k = 4 fails too; then remat, which fits at k = 1.
  assert calls == [(1, False), (2, False), (4, False), (1, True)]
  assert result['fits'] and result['remat'] and result['grad_accumulation_steps'] == 1


def test_fit_says_plainly_when_nothing_fits():
  plan, _ = fake_plan(lambda b, remat: 100 * GIB)
  result = plan_fit.fit(config(), 'v5litepod-4', plan)
  assert not result['fits'] and result['fit_failure'].startswith('nothing fits')
  assert [(t['grad_accumulation_steps'], t['remat']) for t in result['fit_trials']] == [
      (1, False), (8, False), (16, False), (1, True), (8, True), (16, True)]  # 3 each, no more


def test_the_train_command_keeps_the_overrides_and_adds_the_choice():
  command = plan_fit.train_command('configs/efficientnet.py:b0', {
      'data.data_dir': '/data', 'grad_accumulation_steps': 1},
      dict(grad_accumulation_steps=4, remat=True))
  assert command == ('python -m advprop_jax.main --config=configs/efficientnet.py:b0 '
                     '--workdir=WORKDIR --config.data.data_dir=/data '
                     '--config.grad_accumulation_steps=4 --config.model_overrides.remat=True')


# A v5e chip of 10 MiB. The tiny step's buffer plan at 256 images per core (libtpu
# 0.0.42, measured):
# 13.7 MB at k = 1, 13.2 MB at k = 2, 8.1 MB at k = 4 -- so the k = 1 estimate (2) is corrected.
SMALL_HBM = 10 * 2 ** 20


@pytest.mark.slow
@needs_libtpu
def test_plan_fit_on_a_small_hbm_slice_picks_accumulation_and_the_command(capsys, tmp_path,
                                                                          monkeypatch):
  import dataclasses
  from advprop_jax import plan
  from advprop_jax import topologies
  small = dataclasses.replace(topologies.CHIPS['v5e'], usable_hbm_bytes_per_device=SMALL_HBM)
  monkeypatch.setitem(topologies.CHIPS, 'v5e', small)
  monkeypatch.setitem(topologies._BY_PREFIX, 'v5litepod', small)  # pylint: disable=protected-access
  argv = ['--config=configs/demo.py', '--config.dtype=bfloat16', '--config.data.image_size=16',
          '--config.model_overrides.stages=((1,3,1,1,16),)',
          '--config.model_overrides.head_features=32',
          '--config.global_batch_size=1024', '--topology=v5litepod-4', '--fit',
          f'--output={tmp_path}',
          '--train_examples=1797']
  status = cli.call(plan.define_flags, plan.main, 'advprop_jax.plan', argv)
  out, _ = capsys.readouterr()
  assert status == 0, out[-3000:]
  result = json.loads(out.strip().splitlines()[-1])
  trials = result['fit_trials']
  # the batch does not fit
  assert trials[0]['grad_accumulation_steps'] == 1 and not trials[0]['fits']
  assert result['fits'] and result['grad_accumulation_steps'] > 1 and not result['remat']
  assert result['slices'] == 1 and result['global_batch'] == 1024  # the batch is kept
  assert result['per_core_bytes'] <= SMALL_HBM and len(trials) <= 3  # estimated, not searched
  k = result['grad_accumulation_steps']
  assert result['train_command'].endswith(f'--config.grad_accumulation_steps={k}')
  assert '--config.global_batch_size=1024' in result['train_command']
  assert f'FIT: grad_accumulation_steps={k}' in out
  # FLOPs of the k micro-batches, not of one (XLA counts a loop's body once).
  assert result['flops_per_device'] == result['hlo_flops_per_device'] * k
