"""The 350-epoch EfficientNet B0-B8 / L2 AdvProp recipe (RECIPE §2-3), one argument per model.

    python -m advprop_jax.main --config=configs/efficientnet.py:b3 --workdir=gs://BUCKET/b3
    --config.method=vanilla|adv_train|advprop|fine_grained_advprop|fast_advprop|afan switches method.

Batch and LR: the model cards' LR 0.256 for B0-B7 is 0.016 per 256 images at global batch 4096; B8's
0.128 is the same rule at batch 2048 (the reference code's batch). bfloat16 activations (TPU).

Attacker per model: the paper uses PGD with eps in {1, 2, 3, 4} pixels and n = eps + 1 iterations of
1 pixel, larger models preferring stronger attackers ("roughly B0 eps 1 ... B7 eps 4"); the exact per
model choice is not public. We grow eps with model size: B0-B1 1, B2-B3 2, B4-B5 3, B6-B8 and L2 4.
"""
from advprop_jax import config as config_lib
from advprop_jax.models import efficientnet

EPSILON_PIXELS = dict(b0=1.0, b1=1.0, b2=2.0, b3=2.0, b4=3.0, b5=3.0, b6=4.0, b7=4.0, b8=4.0,
                      l2=4.0)
GLOBAL_BATCH = dict(b8=2048, l2=2048)  # others: 4096
# The Cloud TPU v4 slice each recipe is sized for (config.tpu_slice; `python -m advprop_jax.plan` compiles
# the step for it and says whether it fits). v4 devices are chips (megacore, 30.75 GiB usable HBM). Sized
# from B0 AdvProp's compiled plan (12.6 GiB per device at 256 images of 224 px) scaled by width x depth x
# pixels, so that every device holds 8-256 images; benchmarks/RESULTS.md has what each plan measured.
TPU_SLICE = dict(b0='v4-32', b1='v4-32', b2='v4-32', b3='v4-64', b4='v4-128', b5='v4-256', b6='v4-512',
                 b7='v4-512', b8='v4-512', l2='v4-512')
# Activation rematerialisation where the plan (or its estimate) exceeds HBM without it: L2 AdvProp at 8
# images per device needs 74.7 GiB of temporaries (compiled for v4-512; 28.2 GiB in all with remat);
# B7/B8 ~2x the HBM from shapes (12.3 / 9.3 GiB compiled with remat).
REMAT = ('b7', 'b8', 'l2')


def get_config(arg: str = 'b0'):
  if arg not in EPSILON_PIXELS:
    raise ValueError(f'configs/efficientnet.py:{arg}: unknown model; choose one of '
                     f'{sorted(EPSILON_PIXELS)}')
  name = f'efficientnet-{arg}'
  scaling = efficientnet.SCALING[name]
  c = config_lib.base_config()
  c.model = name
  c.num_classes = 1000
  c.dtype = 'bfloat16'
  c.data.dataset = 'imagenet2012'
  c.data.image_size = scaling.resolution
  c.data.crop_fraction = None  # the reference's exact S/(S+32); SCALING holds timm's rounded crop_pct
  c.data.train_crop = 'inception'
  c.data.augment = 'autoaugment'  # policy v0
  c.data.normalization = 'minus_one_one'
  c.method = 'advprop'
  c.attack.epsilon_pixels = EPSILON_PIXELS[arg]
  c.attack.step_size_pixels = 1.0
  c.attack.num_steps = 0  # eps + 1 (1 for eps = 1)
  c.global_batch_size = GLOBAL_BATCH.get(arg, 4096)
  c.num_epochs = 350.0
  c.optimizer = 'rmsprop'
  c.base_learning_rate = 0.016
  c.lr_schedule = 'exponential'
  c.warmup_epochs = 5.0
  c.lr_decay_epochs = 2.4
  c.lr_decay_rate = 0.97
  c.label_smoothing = 0.1
  c.l2_weight = 1e-5
  c.ema_decay = 0.9999
  c.bn_group_size = 0  # TF rule
  c.eval_batch_size = 1024
  c.eval_every_epochs = 10.0
  c.eval_pgd_epsilons_pixels = (1.0, 4.0)
  c.checkpoint_every_steps = 2000
  c.tpu_slice = TPU_SLICE[arg]
  c.model_overrides.remat = arg in REMAT
  return c
