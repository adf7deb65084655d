"""advprop_jax: AdvProp (adversarial examples as extra training data) for EfficientNet in JAX/Flax."""
import os

from advprop_jax import quiet_tensorflow

# TensorFlow serves only as the input pipeline: keep its C++ start-up logging quiet unless the user asked
# for it. Set here because it must precede TF's first import, wherever that happens.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# TF_CPP_MIN_LOG_LEVEL does not reach the lines TF's C++ code logs while it loads (on AVX-512 CPUs
# 'oneDNN custom operations are on', twice, each after absl's 'All log messages before
# absl::InitializeLog()' line): the first `import tensorflow` runs with stderr held back instead.
quiet_tensorflow.install()

__version__ = '0.1.0'
