"""Command line: `python -m advprop_jax.main --config=configs/efficientnet.py:b0 --workdir=DIR`.

Any config field can be overridden, e.g. `--config.method=vanilla --config.global_batch_size=1024`.
Training resumes automatically from the newest checkpoint in DIR; Ctrl-C, SIGTERM or SIGHUP saves a
checkpoint and exits. Bad flags and config values exit with code 2 and one line naming the field,
before anything is compiled or written; a write that fails (disk full, no permission) with code 3
and one line naming the file and the newest complete checkpoint; a diverged loss with code 1.

Multi-host: on TPU VMs every process finds the others itself (`--distributed=auto`), across
the slices of a Cloud TPU multislice job too (the mesh then has a slice axis: parallel.py).
Elsewhere start one process per host (or several on one machine, `python -m
advprop_jax.launch_local`) with
`--distributed=yes --coordinator_address=HOST:PORT --num_processes=N --process_id=I`; SLURM and Open MPI
jobs need only `--distributed=yes`. `--process_is_slice` makes each process a slice of its own (N
local processes stand in for N slices: the multislice code path without TPUs).
"""
import functools
import glob
import logging
import os
import sys

from absl import flags
import jax
from ml_collections import config_flags

from advprop_jax import checkpoints
from advprop_jax import cli
from advprop_jax import config as config_lib
from advprop_jax import trainer
from advprop_jax import workdir as workdir_lib
from advprop_jax.data import input_pipeline


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = dict(flag_values=flag_values)
  config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py[:arg]).',
                                  lock_config=True, **fv)
  flags.DEFINE_string('workdir', None, 'Directory (local or gs://) for checkpoints and metrics.', **fv)
  flags.DEFINE_enum('distributed', 'auto', ['auto', 'yes', 'no'],
                    'Call jax.distributed.initialize(): auto = on multi-host TPU VMs.', **fv)
  flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0 (with --distributed=yes; '
                      'unset: detected on TPU VMs, SLURM, Open MPI).', **fv)
  flags.DEFINE_integer('num_processes', None, 'Processes of the job (with --coordinator_address).', **fv)
  flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1.', **fv)
  flags.DEFINE_integer('heartbeat_timeout_seconds', 100, 'Multi-host: a process that stops answering '
                       'for this long ends the job (with an error on every other process).', **fv)
  flags.DEFINE_bool('process_is_slice', False, 'Each process is one slice of a multislice job (its '
                    'devices a slice: BN groups stay inside it), standing in for TPU slices in '
                    'local '
                    'multi-process runs; TPU devices say their slice themselves.', **fv)
  flags.DEFINE_bool('allow_schedule_change', False, 'Resume a run whose checkpoint was written with '
                    'another batch size / learning rate / epochs / seed (refused otherwise).', **fv)
  flags.mark_flags_as_required(['config', 'workdir'], **fv)


def _multihost_tpu() -> bool:
  return len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1 or _tpu_slices() > 1


def _tpu_slices() -> int:
  """Slices of a Cloud TPU multislice job (1 elsewhere). Several single-host slices have one worker
  each, so TPU_WORKER_HOSTNAMES alone would leave each slice training by itself. The count is in
  MEGASCALE_NUM_SLICES: in the environment, or on a TPU VM in its `tpu-env` metadata, where
  jax.distributed's own cluster detection reads it."""
  value = os.environ.get('MEGASCALE_NUM_SLICES')
  on_tpu_vm = (os.environ.get('TPU_ACCELERATOR_TYPE') or glob.glob('/dev/accel*') or
               glob.glob('/dev/vfio/[0-9]*'))
  if value is None and on_tpu_vm:  # ask the VM's metadata server (only a TPU VM has one to ask)
    try:
      from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=g-import-not-at-top
      value = cloud_tpu_cluster.get_tpu_env_value('MEGASCALE_NUM_SLICES')
    except Exception:  # pylint: disable=broad-except  (no metadata server: not multislice)
      value = None
  try:
    return int(value or 1)
  except ValueError:
    return 1


def _initialize_distributed(flag_values):
  explicit = (flag_values.coordinator_address, flag_values.num_processes, flag_values.process_id)
  if any(v is not None for v in explicit):
    if flag_values.distributed != 'yes':
      cli.fail('--coordinator_address/--num_processes/--process_id need --distributed=yes')
    if any(v is None for v in explicit):
      cli.fail('--coordinator_address, --num_processes and --process_id go together (or none of them: '
               'detected on TPU VMs, SLURM, Open MPI)')
    if not (flag_values.num_processes >= 1 and 0 <= flag_values.process_id < flag_values.num_processes):
      cli.fail(f'--process_id={flag_values.process_id} must be in '
               f'[0, --num_processes={flag_values.num_processes})')
  if flag_values.distributed == 'yes' or (flag_values.distributed == 'auto' and _multihost_tpu()):
    jax.distributed.initialize(coordinator_address=flag_values.coordinator_address,
                               num_processes=flag_values.num_processes, process_id=flag_values.process_id,
                               heartbeat_timeout_seconds=flag_values.heartbeat_timeout_seconds)


def _peer_lost(error: Exception):
  """Ends this process of a multi-host job whose collective failed: another process has stopped.

  One line, then os._exit: the interpreter's normal exit would run JAX's distributed shutdown, whose
  barrier cannot complete without the lost process and aborts with a C++ stack dump.
  """
  first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  cli.error('advprop_jax.main', f'process {jax.process_index()} of {jax.process_count()}: a collective '
            f'with the other processes failed ({first}); another process of this job has stopped, so '
            'this one stops too. Restart every process to resume from the last checkpoint.')
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(1)  # pylint: disable=protected-access


def main(argv, flag_values: flags.FlagValues = flags.FLAGS, exit_at_once_after_stop=False) -> int:
  """exit_at_once_after_stop: the command line's choice (run()); in-process callers (tests) go on."""
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; flags are --name=value')
  input_pipeline.keep_tf_off_accelerators()
  _initialize_distributed(flag_values)
  logging.info('JAX process %d of %d, %d local / %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  try:
    final = trainer.train_and_evaluate(
        flag_values.config, flag_values.workdir,
        allow_schedule_change=flag_values.allow_schedule_change,
        on_stop=_exit_after_stop if exit_at_once_after_stop else None,
        process_is_slice=flag_values.process_is_slice)
  except config_lib.ConfigError as e:
    cli.fail(f'Config error: {e}')
  except (checkpoints.CheckpointMismatchError, workdir_lib.WorkdirError) as e:
    cli.fail(f'Workdir error: {e}')
  except checkpoints.CheckpointWriteError as e:  # names the step, the reason, the newest complete
    cli.fail(e, code=cli.WRITE_FAILED)
  except trainer.NonFiniteLossError as e:
    cli.fail(f'Training stopped: {e}', code=1)
  except KeyboardInterrupt:
    cli.fail('Interrupted twice: stopped without saving; rerun to resume from the last checkpoint.',
             code=130)
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    _peer_lost(e)
  if jax.process_index() == 0 and 'preempted_at_step' not in final:
    if final.get('already_finished'):
      print(f'This run already finished (step {final["step"]}); its final metrics:')
    print(trainer.format_final_table(flag_values.config, final))


def _exit_after_stop():
  """Ends a run stopped by a signal, its checkpoint saved, at once: the interpreter's teardown (of
  tf.data's in-flight work: tens of seconds on a busy host) would outlast a scheduler's grace period.
  Multi-host: after JAX's shutdown barrier, so that no process sees another one vanish."""
  if jax.process_count() > 1:
    jax.distributed.shutdown()
  logging.shutdown()  # flushes the log handlers
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)  # pylint: disable=protected-access


def run():
  """Console-script entry point."""
  cli.run(functools.partial(main, exit_at_once_after_stop=True), 'advprop_jax.main', __doc__,
          define_flags)


if __name__ == '__main__':
  run()
