"""advprop_jax: AdvProp (adversarial examples as extra training data) for EfficientNet in JAX/Flax."""
__version__ = '0.1.0'
