"""Offline demo: a tiny EfficientNet trained with AdvProp on scikit-learn's handwritten digits.

Runs through the same pipeline, step and checkpointing code as the ImageNet recipes, on CPU in a few
minutes: python -m advprop_jax.main --config=configs/demo.py --workdir=workdirs/demo
"""
import ml_collections

from advprop_jax import config as config_lib


def get_config(method: str = 'advprop'):
  c = config_lib.base_config()
  c.model = 'efficientnet-b0'
  # A tiny B0: 1/4 width, 1/4 depth (one block per stage), light dropout for a small dataset.
  c.model_overrides.width = 0.25
  c.model_overrides.depth = 0.25
  c.model_overrides.dropout_rate = 0.1
  c.model_overrides.drop_connect_rate = 0.1
  # Unset here; declared so tests and users can shrink the model from the command line, e.g.
  # --config.model_overrides.stages='((1,3,1,1,16),(1,3,2,6,24))' --config.model_overrides.head_features=64
  c.model_overrides.stages = ml_collections.config_dict.placeholder(tuple)
  c.model_overrides.head_features = ml_collections.config_dict.placeholder(int)
  c.model_overrides.depthwise_impl = 'auto'
  c.num_classes = 10
  c.dtype = 'float32'
  c.data.dataset = 'sklearn_digits'
  c.data.data_dir = 'workdirs/tensorflow_datasets'
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.image_size = 32
  c.data.crop_fraction = 1.0
  c.data.train_crop = 'resize'
  c.data.random_flip = False  # digits are not mirror-symmetric
  c.data.augment = 'none'
  c.data.shuffle_buffer = 2048
  c.data.cache = True

  c.method = method
  c.attack.epsilon_pixels = 4.0
  c.attack.num_steps = 1
  c.attack.step_size_pixels = 4.0
  c.global_batch_size = 64
  c.num_epochs = 30.0
  c.optimizer = 'rmsprop'
  c.base_learning_rate = 0.064  # per 256 images: 0.016 at batch 64
  c.lr_schedule = 'cosine'
  c.warmup_epochs = 2.0
  c.ema_decay = 0.999
  c.bn_group_size = -1  # global BN: the demo may run on 1 device or 8
  c.eval_batch_size = 120
  c.eval_every_epochs = 10.0
  c.eval_pgd_epsilons_pixels = (4.0,)
  c.eval_pgd_step_size_pixels = 1.0
  c.log_every_steps = 50
  c.checkpoint_every_steps = 200
  c.prng_impl = 'rbg'  # compiles faster on CPU than threefry
  return c
