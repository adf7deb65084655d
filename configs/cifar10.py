"""CIFAR-10 from scratch on the JPEG image-folder tree, one argument per method (issue #26 item 3).

    tar xzf ../shared/datasets/cifar10-jpeg.tar.gz -C /tmp/cifar10
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m advprop_jax.main \
        --config=configs/cifar10.py:vanilla --workdir=workdirs/cifar10_vanilla \
        --config.data.data_dir=/tmp/cifar10

Argument: any method name (vanilla, adv_train, advprop, fine_grained_advprop, fast_advprop, afan;
default vanilla). The two-device XLA flag only splits each step over both CPU cores (BN is global,
so the maths is that of one device; benchmarks/throughput.py: 10-20 % faster on 2 cores).

Model: EfficientNet-B0 at width 0.5 / depth 0.5 (10 blocks, channels 8 ... 160, head 640) with a
stride-1 stem (model_overrides.stem_stride=1; 663,530 parameters, 10 classes). B0's five stride-2
layers leave 1x1 features at 32 px; without the stem's stride the last stage sees 2x2 and the first
32x32, the resolution ladder B0 has at 128 px. Chosen by the CPU time the real training step costs
per image on this 2-core machine (benchmarks/RESULTS.md, "CIFAR-10 from scratch"): a ResNet with a
CIFAR stem costs ~3x more per image (XLA:CPU's dense 3x3 convolutions on 16-64 channels at 32x32),
too slow for enough epochs in 40 minutes. Idle, this model trains 400-700 img/s on the two cores
(~470 on average): the 25 epochs (1.25 M images, 4,882 steps of 256) with 25 evaluations of the
10,000 test images took 48 minutes and reached 78.5 % EMA clean top-1 (RESULTS), short of the 85 %
goal; the curve flattens from epoch 19 (a model too small rather than a schedule too short).

Recipe (our choices for a short schedule, not published numbers): SGD, Nesterov momentum 0.9, LR
0.2 per 256 images, 1 warm-up epoch, cosine to 0, coupled weight decay 1e-4 on non-BN weights
instead of the TF L2 term, label smoothing 0.1, dropout 0.1 and no drop-connect (a short run
underfits rather than overfits), EMA 0.99 (~half an epoch), batch 256. Augmentation: CIFAR's
standard pad-4 random crop and flip (data.train_crop='pad_crop'); AutoAugment and Inception crops
(8 % of a 32 px image) hurt at this length. Inputs in [-1, 1]; eval on the whole 32 px image.
Attacks (AdvProp family): PGD-1 of 1 pixel (RECIPE §3: B0's attacker); Fast AdvProp gets the same
number of epochs x 0.83 (its paper's 87 / 105 budget match). Final white-box PGD eval at 1 pixel.
"""
import ml_collections

from advprop_jax import config as config_lib
from advprop_jax import methods

NUM_EPOCHS = 25.0
# Fast AdvProp costs ~1.2x a vanilla step per loader image: fewer epochs, same budget (RECIPE §4).
EPOCHS = {'fast_advprop': NUM_EPOCHS * 87 / 105}


def get_config(method: str = 'vanilla'):
  if method not in methods.METHODS:
    raise ValueError(f'configs/cifar10.py:{method}: unknown method; choose one of '
                     f'{tuple(methods.METHODS)}')
  c = config_lib.base_config()
  c.model = 'efficientnet-b0'
  c.model_overrides.width = 0.5
  c.model_overrides.depth = 0.5
  c.model_overrides.stem_stride = 1
  c.model_overrides.dropout_rate = 0.1
  c.model_overrides.drop_connect_rate = 0.0
  c.num_classes = 10
  c.data.dataset = 'image_folder'
  c.data.data_dir = '/tmp/cifar10'  # the README's extraction folder; override with your ROOT
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.image_size = 32
  c.data.crop_fraction = 1.0  # eval: the whole image, no center crop
  c.data.train_crop = 'pad_crop'
  c.data.augment = 'none'
  c.data.cache = True  # 50,000 decoded 32 px images: 150 MB of host RAM
  c.data.shuffle_buffer = 50000

  c.method = method
  c.attack.epsilon_pixels = 1.0
  c.attack.step_size_pixels = 1.0
  c.attack.num_steps = 1
  c.global_batch_size = 256
  c.num_epochs = EPOCHS.get(method, NUM_EPOCHS)
  c.optimizer = 'sgd'
  c.momentum = 0.9
  c.nesterov = True
  c.base_learning_rate = 0.2  # per 256 images
  c.lr_schedule = 'cosine'
  c.warmup_epochs = 1.0
  c.l2_weight = 0.0
  c.weight_decay = 1e-4
  c.ema_decay = 0.99
  c.bn_group_size = -1  # global BN: the same model on 1 device or 2
  c.eval_batch_size = 500
  c.eval_every_epochs = 1.0
  c.eval_pgd_epsilons_pixels = (1.0,)
  # Corruptions (evaluate / ablation): CIFAR-10-C's severities, made for 32 px (not ImageNet-C's).
  c.evaluate = ml_collections.ConfigDict({'corruptions': {'constants': 'cifar10_c'}})
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.prng_impl = 'rbg'  # compiles faster on CPU than threefry
  return c
