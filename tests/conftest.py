"""Test set-up: 8 simulated CPU devices, so multi-device code is tested on any machine.

The flag must be set before jax is first imported, which is why it lives here.
"""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402  (after the flag)

# Persistent compilation cache: the suite compiles many small programs; reruns reuse them.
jax.config.update('jax_compilation_cache_dir', os.environ.get(
    'ADVPROP_JAX_TEST_CACHE', os.path.join(os.path.dirname(__file__), '..', '.jax_cache')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
