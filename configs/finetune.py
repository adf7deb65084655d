"""Transfer recipe: fine-tune pretrained AdvProp EfficientNet weights on another dataset, one
argument per model (b0 ... b8, l2).

    python -m advprop_jax.main --config=configs/finetune.py:b0 --workdir=runs/flowers_b0 \
        --config.init_from=PATH/model.safetensors \
        --config.data.dataset=image_folder --config.data.data_dir=FLOWERS --config.num_classes=5

PATH: timm's tf_efficientnet_b0.ap_in1k model.safetensors (in a Hugging Face hub cache:
~/.cache/huggingface/hub/models--timm--tf_efficientnet_b0.ap_in1k/snapshots/*/model.safetensors),
an original TF AdvProp checkpoint directory, a Flax export or a training workdir
(advprop_jax/init_from.py). Without init_from this recipe trains from scratch (on a short schedule:
not what it is for).

It is the model's 350-epoch recipe (configs/efficientnet.py) with what differs for transfer:
- Published: the EfficientNet paper (Tan & Le 2019, §5.2) fine-tunes its ImageNet checkpoints on
  CIFAR, Birdsnap, Cars, Flowers, Aircraft, Pets and Food-101 with the transfer settings of
  Kornblith et al. 2019 and GPipe (Huang et al. 2018), which tune LR and weight decay per dataset:
  there is no single published LR for every dataset. Li et al. 2020 ("Rethinking the
  hyperparameters for fine-tuning") describe the common practice: the from-scratch recipe with a
  smaller initial LR and a shorter schedule, SGD LR 0.01 with momentum 0.9 being the usual default.
- Kept from pretraining (so that the weights see what they were trained on): the model's
  resolution (B0 224 ... B8 672, L2 800: RECIPE §1, also timm's input size for the .ap_in1k
  weights), inputs in [-1, 1], AutoAugment, label smoothing 0.1, the 1e-5 L2 term, EMA 0.9999 with
  TF's num_updates rule (short runs average over ~1/9 of the steps so far), and AdvProp with the
  model's attacker.
- Our choices, not published numbers (tune them per dataset): SGD with Nesterov momentum 0.9, LR
  0.01 per 256 images, 1 warm-up epoch (the new classifier starts random), cosine decay to 0 over 30
  epochs, batch 256.
Default dataset: TFDS cifar10 (train / test); any dataset works through overrides of config.data and
config.num_classes (a classifier of another size than the source's is re-initialised).
"""
from configs import efficientnet


def get_config(arg: str = 'b0'):
  c = efficientnet.get_config(arg)  # unknown arg: the same one-line error as that recipe
  c.num_classes = 10
  c.data.dataset = 'cifar10'
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.global_batch_size = 256
  c.optimizer = 'sgd'
  c.momentum = 0.9
  c.nesterov = True
  c.base_learning_rate = 0.01  # per 256 images
  c.lr_schedule = 'cosine'
  c.warmup_epochs = 1.0
  c.num_epochs = 30.0
  c.eval_every_epochs = 5.0
  c.checkpoint_every_steps = 1000
  c.init_from_weights = 'ema'
  # The 350-epoch recipe's slice is sized for batch 4096; check a slice for this batch with
  # `python -m advprop_jax.plan --config=configs/finetune.py:bX --topology=v4-8`.
  c.tpu_slice = None
  return c
