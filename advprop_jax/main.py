"""Command line: `python -m advprop_jax.main --config=configs/efficientnet.py:b0 --workdir=DIR`.

Any config field can be overridden, e.g. `--config.method=vanilla --config.global_batch_size=1024`.
Training resumes automatically from the newest checkpoint in DIR. Bad config values exit with code 2
and a message naming the field, before anything is compiled or written.
"""
import logging
import os
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from advprop_jax import checkpoints
from advprop_jax import config as config_lib
from advprop_jax import trainer
from advprop_jax.data import input_pipeline

FLAGS = flags.FLAGS


def define_flags():
  """The CLI's flags, defined when it runs (so that every CLI module can be imported side by side)."""
  config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py[:arg]).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory (local or gs://) for checkpoints and metrics.')
  flags.DEFINE_enum('distributed', 'auto', ['auto', 'yes', 'no'],
                    'Call jax.distributed.initialize(): auto = on multi-host TPU VMs.')
  flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(logging.Filter):
  """Drops INFO chatter of orbax / tfds (every save is logged ~20 times); warnings still pass."""

  def filter(self, record):
    noisy = any(part in record.pathname for part in ('/orbax/', '/tensorflow_datasets/'))
    return record.levelno >= logging.WARNING or not noisy


def _multihost_tpu() -> bool:
  return len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  for handler in logging.getLogger().handlers + logging.getLogger('absl').handlers:
    handler.addFilter(_QuietLibraries())
  input_pipeline.keep_tf_off_accelerators()
  if FLAGS.distributed == 'yes' or (FLAGS.distributed == 'auto' and _multihost_tpu()):
    jax.distributed.initialize()
  logging.info('JAX process %d of %d, %d local / %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  try:
    final = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except config_lib.ConfigError as e:
    print(f'Config error: {e}', file=sys.stderr)
    sys.exit(2)
  except checkpoints.CheckpointMismatchError as e:
    print(f'Checkpoint error: {e}', file=sys.stderr)
    sys.exit(2)
  except trainer.NonFiniteLossError as e:
    print(f'Training stopped: {e}', file=sys.stderr)
    sys.exit(1)
  if jax.process_index() == 0 and 'preempted_at_step' not in final:
    print(trainer.format_final_table(FLAGS.config, final))


def run():
  """Console-script entry point."""
  define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
