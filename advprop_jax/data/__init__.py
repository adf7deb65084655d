"""Input pipelines (TFDS + tf.data), EfficientNet preprocessing, AutoAugment/RandAugment, and the
offline `sklearn_digits` dataset. The training loop and evaluator use only the names below."""
from advprop_jax.data.input_pipeline import (default_data_config, eval_dataset, global_batches,
                                             num_classes, num_examples, train_dataset)

__all__ = ['default_data_config', 'eval_dataset', 'global_batches', 'num_classes', 'num_examples',
           'train_dataset']
