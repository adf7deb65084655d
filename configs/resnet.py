"""ResNet-50/101/152/200 (v1.5) with AdvProp / Fast AdvProp on ImageNet (RECIPE §3-4).

    python -m advprop_jax.main --config=configs/resnet.py:50 --workdir=gs://BUCKET/r50
    python -m advprop_jax.main --config=configs/resnet.py:50,fast_advprop --workdir=gs://BUCKET/r50_fast

Recipe of the Fast AdvProp paper: SGD momentum 0.9, weight decay 1e-4, LR 0.1 per 256 images, step decay
x0.1, 105 epochs (boundaries 30/60/90/100: our choice, the paper gives the 87-epoch one); Fast AdvProp is
budget-matched to vanilla: 87 epochs, decay at 25/50/75/83. Weight decay is coupled (PyTorch style: added to
the gradient before momentum) and skips BatchNorm scale/bias (the reference applies it to all params).
Inputs are mean/std normalised (torchvision convention), standard Inception crop + flip, no AutoAugment.
"""
from advprop_jax import config as config_lib

DEPTHS = ('50', '101', '152', '200')
# (epochs, LR step-decay epochs) per method; Fast AdvProp is budget-matched to vanilla's cost.
SCHEDULES = {'fast_advprop': (87.0, (25.0, 50.0, 75.0, 83.0))}
DEFAULT_SCHEDULE = (105.0, (30.0, 60.0, 90.0, 100.0))


def get_config(arg: str = '50'):
  depth, _, method = arg.partition(',')
  if depth not in DEPTHS:
    raise ValueError(f'configs/resnet.py:{arg}: unknown depth; choose one of {DEPTHS}')
  c = config_lib.base_config()
  c.model = f'resnet{depth}'
  c.num_classes = 1000
  c.dtype = 'bfloat16'
  c.data.dataset = 'imagenet2012'
  c.data.image_size = 224
  c.data.crop_fraction = 0.875
  c.data.augment = 'none'
  c.data.normalization = 'imagenet'
  c.method = method or 'advprop'
  c.attack.epsilon_pixels = 1.0  # PGD-1 AdvProp (RECIPE §4: 77.5 top-1 for ResNet-50)
  c.attack.step_size_pixels = 1.0
  c.attack.num_steps = 1
  c.global_batch_size = 1024
  c.optimizer = 'sgd'
  c.momentum = 0.9
  c.base_learning_rate = 0.1  # per 256 images
  c.lr_schedule = 'piecewise'
  c.warmup_epochs = 0.0
  c.num_epochs, c.lr_boundaries_epochs = SCHEDULES.get(c.method, DEFAULT_SCHEDULE)
  c.label_smoothing = 0.0
  c.l2_weight = 0.0
  c.weight_decay = 1e-4
  c.ema_decay = 0.0  # no EMA in this recipe (evaluation then uses the raw weights' copy)
  c.bn_group_size = 0
  c.eval_pgd_epsilons_pixels = (1.0, 4.0)
  c.tpu_slice = 'v4-16'  # 8 chips: 128 images each (python -m advprop_jax.plan checks that it fits)
  return c
