"""The training config schema (the defaults every config file starts from) and its validation.

TF-free, like the step: config files, `plan` and the benchmarks import it without TensorFlow.
`validate` runs before anything is compiled or written: a bad value raises `validation.ConfigError`
naming the field and the allowed values, which the CLIs turn into one line and exit code 2.
"""
import importlib.util

import ml_collections
from ml_collections.config_dict import placeholder

from advprop_jax import best_checkpoint
from advprop_jax import methods
from advprop_jax import models
from advprop_jax import optim
from advprop_jax import topologies
from advprop_jax import validation
from advprop_jax.data import choices as data_choices
from advprop_jax.methods.passes import ATTACK_BN_MODES
from advprop_jax.models.conv import DEPTHWISE_IMPLEMENTATIONS
from advprop_jax.validation import ConfigError, require_choice, require_number  # noqa: F401

PRNG_IMPLS = ('threefry2x32', 'rbg', 'unsafe_rbg')


def model_overrides() -> ml_collections.ConfigDict:
  """Every create_model field a user may set, unset (None = the model's default), so that any of them
  can be set from the command line on any config. Fields of another model family stay None."""
  return ml_collections.ConfigDict(dict(
      width=placeholder(float), depth=placeholder(float), dropout_rate=placeholder(float),
      drop_connect_rate=placeholder(float), stages=placeholder(tuple), stem_features=placeholder(int),
      head_features=placeholder(int), depthwise_impl=placeholder(str), remat=placeholder(bool),
      bn_momentum=placeholder(float), bn_epsilon=placeholder(float),
      stage_sizes=placeholder(tuple), base_width=placeholder(int),  # ResNet
      zero_init_residual=placeholder(bool), stem=placeholder(str),  # ResNet
      stem_stride=placeholder(int)))  # EfficientNet


def data_config() -> ml_collections.ConfigDict:
  """ImageNet / EfficientNet-B0 input defaults (data/input_pipeline.py reads them); configs override.
  Fields that select a behaviour by name: their allowed values and meanings are in data/choices.py."""
  c = ml_collections.ConfigDict()
  # Or any TFDS image-classification name, 'sklearn_digits', or 'image_folder': a tree of images,
  # data_dir=ROOT holding ROOT/<split>/<class>/<image> (data/image_folder.py; its configs set
  # eval_split='test'); num_classes then follows the class folders.
  c.dataset = 'imagenet2012'
  c.data_dir = placeholder(str)  # None: the TFDS default; image_folder: ROOT
  c.train_split = 'train'
  c.eval_split = 'validation'
  c.image_size = 224
  # Eval crop side = int(crop_fraction * min(h, w)). None = the reference's exact S/(S+32) (0.875 at
  # 224), which stays right when only image_size is changed. timm's rounded crop_pct (.882 for B1, ...,
  # models.efficientnet.SCALING) is 1 px off it for 20-53 % of short sides 200-1000. With
  # eval_preprocessing='timm' it is timm's crop_pct (short side resized to floor(S / crop_fraction);
  # None: S + 32).
  c.crop_fraction = placeholder(float)
  c.train_crop = 'inception'  # 'inception' | 'resize' | 'pad_crop' (CIFAR's pad-4 random crop)
  c.random_flip = True
  c.augment = 'autoaugment'  # 'autoaugment' | 'randaugment' | 'none'
  c.randaugment_layers = 2
  c.randaugment_magnitude = 10
  c.normalization = 'minus_one_one'  # 'minus_one_one' (x*2/255-1, AdvProp) | 'imagenet'
  c.cache = False  # cache decoded, unaugmented images (small datasets only)
  c.shuffle_buffer = 16384  # clamped to the process' shard size
  c.skip_decode_errors = False
  # Resize kernel of the train and eval crops: 'tf1_bicubic' (the reference's
  # tf.compat.v1.image.resize_bicubic) | 'tf2_bicubic' (tf.image.resize bicubic; up to ~100 grey levels away).
  c.resize_method = 'tf1_bicubic'
  # Eval transform: 'tf_reference' (center crop, resize_method, no clipping) | 'timm' (short side to
  # floor(S / crop_fraction) with PIL bicubic, center crop S: what timm's numbers for the ported
  # tf_efficientnet_*.ap_in1k weights use).
  c.eval_preprocessing = 'tf_reference'
  # AutoAugment/RandAugment op semantics: 'tf_reference' (what the reference's uint8 TF code computed:
  # Solarize(256) inverts every pixel, RandAugment's Contrast blends towards pixel_count/256, Posterize
  # bits > 8 keeps 1 bit) | 'pil' (PIL's definitions for those ops).
  c.augment_semantics = 'tf_reference'
  # N > 0: the first N examples of train_split are held out of training as the minival
  # (data/minival.py); the periodic evaluation reports it as minival/... instead of the eval split.
  c.minival_examples = 0
  return c


def base_config() -> ml_collections.ConfigDict:
  """EfficientNet-B0 with AdvProp and the TF 350-epoch recipe (RECIPE §2); config files override."""
  c = ml_collections.ConfigDict()
  c.model = 'efficientnet-b0'
  c.model_overrides = model_overrides()
  c.num_classes = 1000
  c.dtype = 'float32'  # activations; 'bfloat16' on TPU. Weights and BN statistics stay float32.
  c.data = data_config()

  c.method = 'advprop'  # a name of advprop_jax.methods.METHODS
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
  # k > 1: each step runs its per-device batch as k micro-batches in sequence and averages their
  # gradients (one update; same global batch, schedule and data). BN batch statistics are then
  # per micro-batch: like k-times smaller BN groups (step.accumulate).
  c.grad_accumulation_steps = 1

  c.eval_pgd_epsilons_pixels = ()  # white-box PGD evaluation (main BN) at the end of training
  c.eval_pgd_step_size_pixels = 1.0
  c.eval_batch_size = 1024
  c.eval_every_epochs = 10.0
  c.log_every_steps = 100
  # K > 0: every K steps, TensorBoard images of the step's first training images, their adversarial
  # versions and the amplified perturbations (image_summaries.py); 0 builds nothing.
  c.log_images_every_steps = 0
  c.checkpoint_every_steps = 2000
  c.keep_checkpoints = 3
  # A periodic-evaluation metric (e.g. 'minival/ema_clean_top1'): the best checkpoint by it is kept
  # beside the newest keep_checkpoints (best_checkpoint.py); every evaluation step is then saved.
  c.keep_best_by = placeholder(str)
  c.seed = 0
  c.prng_impl = 'threefry2x32'  # 'rbg' compiles faster on CPU
  c.profile_steps = ()  # (start, stop): capture a profiler trace into workdir
  c.max_steps = placeholder(int)  # stop early (debugging, demos)
  # The Cloud TPU slice a recipe is sized for (`v4-32`, `v5litepod-16`, ...): the default --topology of
  # `python -m advprop_jax.plan`, which checks by compiling that the step fits it. Training ignores it.
  c.tpu_slice = placeholder(str)
  # Fine-tuning: a NEW run starts from these weights (a workdir, a Flax export, a timm .safetensors/.pth,
  # a TF checkpoint directory; advprop_jax/init_from.py). Ignored when the workdir has a checkpoint.
  c.init_from = placeholder(str)
  c.init_from_weights = 'ema'  # of a workdir / TF checkpoint source: 'ema' (shadow) or 'raw' weights
  return c


def load_file(path: str, arg=None) -> ml_collections.ConfigDict:
  """get_config(arg) of a config file (what --config=path:arg selects), outside the command line."""
  spec = importlib.util.spec_from_file_location('advprop_jax_config_file', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def set_overrides(config) -> dict:
  """The model overrides a config sets (its unset placeholders dropped), as a plain dict."""
  return without_unset(config.model_overrides.to_dict())


def without_unset(overrides) -> dict:
  """create_model overrides without the None placeholders (configs declare unset fields as None so that
  the command line may set them, e.g. configs/demo.py's stages/head_features); also for a run's JSON."""
  return {k: v for k, v in dict(overrides or {}).items() if v is not None}


def validate(config, num_devices: int, process_count: int = 1, num_slices: int = 1) -> None:
  """Raises ConfigError naming the first bad field; called before any compilation or disk write.
  num_slices: TPU slices (multislice) the devices form; a BN group must lie inside one."""
  require_choice(config, 'model', models.model_names())
  require_choice(config, 'method', tuple(methods.METHODS))
  require_choice(config, 'dtype', ('float32', 'bfloat16'))
  require_choice(config, 'optimizer', optim.OPTIMIZERS)
  require_choice(config, 'lr_schedule', optim.SCHEDULES)
  require_choice(config, 'attack.bn_mode', ATTACK_BN_MODES)
  for field, allowed in data_choices.CHOICES.items():
    require_choice(config, f'data.{field}', allowed)
  require_choice(config, 'prng_impl', PRNG_IMPLS)
  require_choice(config, 'init_from_weights', ('ema', 'raw'))
  _validate_model(config)
  for field in ('num_classes', 'global_batch_size', 'eval_batch_size', 'log_every_steps',
                'checkpoint_every_steps', 'keep_checkpoints', 'data.image_size'):
    require_number(config, field, low=1, integer=True)
  for field in ('num_epochs', 'eval_every_epochs'):
    require_number(config, field, low=0, low_open=True)
  # LR 0 is allowed: BN recalibration, or checking that init_from loads the weights unchanged.
  for field in ('base_learning_rate', 'warmup_epochs', 'label_smoothing', 'l2_weight', 'weight_decay',
                'clean_weight', 'adv_weight'):
    require_number(config, field, low=0)
  require_number(config, 'attack.epsilon_pixels', low=0, high=255)
  require_number(config, 'attack.step_size_pixels', low=0, high=255, low_open=True)
  require_number(config, 'eval_pgd_step_size_pixels', low=0, high=255, low_open=True)
  require_number(config, 'attack.num_steps', low=0, integer=True)  # 0: the paper rule eps + 1
  require_number(config, 'attack.random_start', low=0, high=1)
  require_number(config, 'ema_decay', low=0, high=1, high_open=True)
  for eps in config.eval_pgd_epsilons_pixels:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 255:
      raise ConfigError(f'config.eval_pgd_epsilons_pixels={tuple(config.eval_pgd_epsilons_pixels)}: '
                        'each must be a number in (0, 255] (pixels)')
  if config.tpu_slice is not None:
    try:
      topologies.parse(config.tpu_slice)
    except ValueError as e:
      raise ConfigError(f'config.tpu_slice={config.tpu_slice!r}: {e}') from e
  if config.max_steps is not None:
    require_number(config, 'max_steps', low=1, integer=True)
  for field in ('global_batch_size', 'eval_batch_size'):
    batch = validation.get(config, field)
    for count, what in ((num_devices, 'device'), (process_count, 'process')):
      if batch % count:
        raise ConfigError(f'config.{field}={batch} is not divisible by the {what} count {count}')
  k = config.bn_group_size
  per_slice = num_devices // num_slices
  if not (k in (0, -1) or (isinstance(k, int) and k > 0 and per_slice % k == 0)):
    where = (f'device count {num_devices}' if num_slices == 1 else
             f'device count of a slice, {per_slice} ({num_slices} slices; a BN group never spans '
             'slices)')
    raise ConfigError(f'config.bn_group_size={k} must divide the {where} '
                      '(or be 0 for TF\'s rule, -1 for global BN)')
  if config.profile_steps and (len(config.profile_steps) != 2 or
                               not 0 <= config.profile_steps[0] < config.profile_steps[1]):
    raise ConfigError(f'config.profile_steps={config.profile_steps} must be (start, stop) with '
                      '0 <= start < stop')
  require_number(config, 'grad_accumulation_steps', low=1, integer=True)
  require_number(config, 'data.minival_examples', low=0, integer=True)  # (< split size: trainer)
  try:
    best_checkpoint.check(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  require_number(config, 'log_images_every_steps', low=0, integer=True)
  methods.get(config.method).validate(config, num_devices)  # the loader batch is valid after it
  _validate_grad_accumulation(config, num_devices)


def _validate_grad_accumulation(config, num_devices: int) -> None:
  k = config.grad_accumulation_steps
  loader = methods.get(config.method).loader_batch_size(config)
  if loader % num_devices == 0 and (loader // num_devices) % k:  # else a check above said why
    raise ConfigError(f'config.grad_accumulation_steps={k} must divide the per-device batch '
                      f'{loader // num_devices} ({loader} images per step over {num_devices} devices)')


def _validate_model(config) -> None:
  overrides = set_overrides(config)
  if 'depthwise_impl' in overrides:
    require_choice(config, 'model_overrides.depthwise_impl', DEPTHWISE_IMPLEMENTATIONS)
  try:
    models.check_overrides(config.model, overrides)
  except ValueError as e:
    raise ConfigError(f'config.model_overrides: {e}') from e
