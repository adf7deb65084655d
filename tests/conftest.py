"""Test set-up: 8 simulated CPU devices, so multi-device code is tested on any machine.

The flag must be set before jax is first imported, which is why it lives here.
"""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# libtpu (requirements-tpu.txt) only compiles here; let a plan running beside the tests load it too.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import jax  # noqa: E402  (after the flag)

# Persistent compilation cache: the suite compiles many small programs; reruns reuse them.
jax.config.update('jax_compilation_cache_dir', os.environ.get(
    'ADVPROP_JAX_TEST_CACHE', os.path.join(os.path.dirname(__file__), '..', '.jax_cache')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)

import pytest  # noqa: E402


def tiny_efficientnet(**overrides):
  """A few-block EfficientNet that compiles in seconds: the B0 builder with small multipliers."""
  from advprop_jax.models import create_model
  from advprop_jax.models.efficientnet import B0_STAGES
  kwargs = dict(width=0.25, depth=0.25, dropout_rate=0.0, drop_connect_rate=0.0,
                stages=B0_STAGES[:3], head_features=64, depthwise_impl='grouped')
  kwargs.update(overrides)
  num_classes = kwargs.pop('num_classes', 10)
  return create_model('efficientnet-b0', num_classes=num_classes, **kwargs)


@pytest.fixture(scope='session')
def tiny_model_factory():
  return tiny_efficientnet
