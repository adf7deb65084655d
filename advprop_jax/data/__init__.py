"""Input data: TFDS pipelines (input_pipeline), EfficientNet preprocessing, AutoAugment/RandAugment, the
offline `sklearn_digits` dataset, robustness eval sets. Only `normalization` is TF-free; import the modules
themselves (this package imports nothing, so TF-free code can use `advprop_jax.data.normalization`)."""
