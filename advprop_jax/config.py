"""The training config schema (defaults every config file starts from) and its validation.

Validation runs before anything is compiled or written: a bad value raises `ConfigError` naming the
field and the allowed values, and main.py turns it into exit code 2.
"""
import ml_collections

from advprop_jax import attacks
from advprop_jax import layers
from advprop_jax import objectives
from advprop_jax import optim
from advprop_jax.data import input_pipeline
from advprop_jax.models import model_names


class ConfigError(ValueError):
  pass


def base_config() -> ml_collections.ConfigDict:
  """EfficientNet-B0 with AdvProp and the TF 350-epoch recipe (RECIPE §2); config files override."""
  c = ml_collections.ConfigDict()
  c.model = 'efficientnet-b0'
  c.model_overrides = ml_collections.ConfigDict()  # any create_model field: width, depth, remat, ...
  c.num_classes = 1000
  c.dtype = 'float32'  # activations; 'bfloat16' on TPU. Weights and BN statistics stay float32.
  c.data = input_pipeline.default_data_config()

  c.method = 'advprop'
  c.clean_weight = 1.0
  c.adv_weight = 1.0
  c.attack = ml_collections.ConfigDict(dict(
      epsilon_pixels=1.0,  # L-inf radius on the 0..255 scale
      step_size_pixels=1.0,
      num_steps=0,  # 0: the paper's rule, eps + 1 (1 when eps = 1)
      random_start=0.0,  # probability that a sample starts at a random point of the ball
      targeted=True,  # towards a random wrong label (reference AdvProp code)
      bn_mode='eval',  # auxiliary BN during the attack: 'eval' running / 'train' batch statistics
  ))
  c.fine_grained_epsilons_pixels = (1.0, 2.0, 3.0, 4.0)  # fine_grained_advprop: one aux BN each
  c.fast_advprop = ml_collections.ConfigDict(dict(adv_fraction=0.2, noise_weight=0.5, adv_weight=0.5))
  c.afan = ml_collections.ConfigDict(dict(stage=1, num_steps=5, step_size=0.5 / 255, epsilon=0.0,
                                          pono_mix=0.0))

  c.global_batch_size = 2048
  c.num_epochs = 350.0
  c.optimizer = 'rmsprop'
  c.base_learning_rate = 0.016  # per 256 images; scaled linearly with global_batch_size
  c.lr_schedule = 'exponential'
  c.warmup_epochs = 5.0
  c.lr_decay_epochs = 2.4
  c.lr_decay_rate = 0.97
  c.lr_boundaries_epochs = ()
  c.momentum = 0.9
  c.nesterov = False
  c.rmsprop_decay = 0.9
  c.rmsprop_epsilon = 1e-3
  c.label_smoothing = 0.1
  c.l2_weight = 1e-5  # on sum(v**2)/2 of non-BN variables, inside the loss (TF recipe)
  c.weight_decay = 0.0  # decoupled, non-BN variables (SGD recipes)
  c.ema_decay = 0.9999
  c.bn_group_size = 0  # 0: TF rule (per device up to 8 devices), -1: global, k: groups of k

  c.eval_pgd_epsilons_pixels = ()  # white-box PGD evaluation (main BN) at the end of training
  c.eval_pgd_step_size_pixels = 1.0
  c.eval_batch_size = 1024
  c.eval_every_epochs = 10.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.keep_checkpoints = 3
  c.seed = 0
  c.prng_impl = 'threefry2x32'  # 'rbg' compiles faster on CPU
  c.profile_steps = ()  # (start, stop): capture a profiler trace into workdir
  c.max_steps = ml_collections.config_dict.placeholder(int)  # stop early (debugging, demos)
  return c


def _choice(config, field, allowed):
  value = config
  for part in field.split('.'):
    value = value[part]
  if value not in allowed:
    raise ConfigError(f'config.{field}={value!r} is not allowed; choose one of {tuple(allowed)}')


def _positive(config, field, value, allow_zero=False):
  if not (value >= 0 if allow_zero else value > 0):
    raise ConfigError(f'config.{field}={value!r} must be {">= 0" if allow_zero else "> 0"}')


def validate(config, num_devices: int, process_count: int = 1) -> None:
  """Raises ConfigError naming the first bad field; called before any compilation or disk write."""
  _choice(config, 'model', model_names())
  _choice(config, 'method', objectives.METHODS)
  _choice(config, 'dtype', ('float32', 'bfloat16'))
  _choice(config, 'optimizer', optim.OPTIMIZERS)
  _choice(config, 'lr_schedule', optim.SCHEDULES)
  _choice(config, 'attack.bn_mode', objectives.ATTACK_BN_MODES)
  _choice(config, 'data.normalization', attacks.NORMALIZATIONS)
  _choice(config, 'data.augment', ('autoaugment', 'randaugment', 'none'))
  _choice(config, 'data.train_crop', ('inception', 'resize'))
  _choice(config, 'prng_impl', ('threefry2x32', 'rbg', 'unsafe_rbg'))
  _choice(config, 'model_overrides.depthwise_impl', layers.DEPTHWISE_IMPLEMENTATIONS) \
      if 'depthwise_impl' in config.model_overrides else None
  for field in ('num_classes', 'global_batch_size', 'num_epochs', 'base_learning_rate',
                'eval_batch_size', 'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
                'data.image_size', 'attack.step_size_pixels', 'eval_every_epochs'):
    value = config
    for part in field.split('.'):
      value = value[part]
    _positive(config, field, value)
  for field in ('warmup_epochs', 'label_smoothing', 'l2_weight', 'weight_decay', 'clean_weight',
                'adv_weight'):
    _positive(config, field, config[field], allow_zero=True)
  if config.method in ('adv_train', 'advprop'):
    _positive(config, 'attack.epsilon_pixels', config.attack.epsilon_pixels)
  if config.method == 'fine_grained_advprop':
    if not config.fine_grained_epsilons_pixels:
      raise ConfigError('config.fine_grained_epsilons_pixels must list at least one epsilon')
    for eps in config.fine_grained_epsilons_pixels:
      _positive(config, 'fine_grained_epsilons_pixels', eps)
  if config.attack.num_steps < 0:
    raise ConfigError(f'config.attack.num_steps={config.attack.num_steps} must be >= 1 '
                      '(or 0 for the paper rule eps + 1)')
  if not 0.0 <= config.attack.random_start <= 1.0:
    raise ConfigError(f'config.attack.random_start={config.attack.random_start} must be a '
                      'probability in [0, 1]')
  if not 0.0 < config.fast_advprop.adv_fraction < 1.0:
    raise ConfigError(f'config.fast_advprop.adv_fraction={config.fast_advprop.adv_fraction} must be '
                      'in (0, 1)')
  if not 0.0 <= config.ema_decay < 1.0:
    raise ConfigError(f'config.ema_decay={config.ema_decay} must be in [0, 1)')
  for field, batch in (('global_batch_size', config.global_batch_size),
                       ('eval_batch_size', config.eval_batch_size)):
    if batch % num_devices:
      raise ConfigError(f'config.{field}={batch} is not divisible by the device count {num_devices}')
    if batch % process_count:
      raise ConfigError(f'config.{field}={batch} is not divisible by the process count '
                        f'{process_count}')
  if config.method == 'fast_advprop':  # the loader draws 1/(1 - adv_fraction) x the batch
    loader = int(round(config.global_batch_size / (1.0 - config.fast_advprop.adv_fraction)))
    if loader % num_devices:
      raise ConfigError(f'config.global_batch_size={config.global_batch_size} with '
                        f'config.fast_advprop.adv_fraction={config.fast_advprop.adv_fraction} gives a '
                        f'loader batch of {loader}, not divisible by the device count {num_devices}')
  k = config.bn_group_size
  if not (k in (0, -1) or (k > 0 and num_devices % k == 0)):
    raise ConfigError(f'config.bn_group_size={k} must divide the device count {num_devices} '
                      '(or be 0 for TF\'s rule, -1 for global BN)')
  if config.profile_steps and (len(config.profile_steps) != 2 or
                               not 0 <= config.profile_steps[0] < config.profile_steps[1]):
    raise ConfigError(f'config.profile_steps={config.profile_steps} must be (start, stop) with '
                      '0 <= start < stop')
