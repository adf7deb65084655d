"""advprop_jax: AdvProp (adversarial examples as extra training data) for EfficientNet in JAX/Flax."""
import os

# TensorFlow serves only as the input pipeline: keep its C++ start-up logging quiet unless the user asked
# for it. Set here because it must precede TF's first import, wherever that happens.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

__version__ = '0.1.0'
