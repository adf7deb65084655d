"""Builds the committed test fixtures of the timm <-> Flax converter (needs torch + timm; the tests do not).

Run from the repository root with a torch venv, e.g.
  /work/venv-torch/bin/python scripts/make_timm_fixture.py \
      --tfds_labels=/work/venv/lib/python3.11/site-packages/tensorflow_datasets/datasets/imagenet2012/labels.txt

Writes
  tests/fixtures/tiny_timm.safetensors  a reduced tf_efficientnet_b0 (timm names), random weights AND random
                                         BN statistics/affines
  tests/fixtures/tiny_timm_io.npz        a fixed NHWC input in [-1, 1] and timm's eval-mode logits for it
  tests/fixtures/tiny_timm.json          the tiny model's settings (our create_model overrides)
  tests/fixtures/timm_keys.json.gz       timm state_dict name -> shape for tf_efficientnet_b0..b8 and l2
                                         (built on torch's meta device: no weights)
  advprop_jax/imagenet_classes.txt       1000 human-readable ImageNet class names in label-index order
                                         (timm's synset lemmas, order checked against TFDS' imagenet2012 labels)

With --check_export=FILE.safetensors (a file written by advprop_jax.convert / advprop_jax.export from the tiny
fixture) it instead loads FILE into the tiny timm model with load_state_dict(strict=True) and compares logits.
"""
import argparse
import gzip
import json
import os

import numpy as np
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models.efficientnet import _gen_efficientnet

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
# Our create_model('efficientnet-b0', **TINY) must build the same network as timm with these multipliers.
TINY = dict(width=0.25, depth=0.5, num_classes=10)
INPUT_SHAPE = (2, 35, 35, 3)  # odd size: exercises TF 'SAME' padding on every stride-2 layer
MODELS = [f'b{i}' for i in range(9)] + ['l2']


def tiny_timm_model():
  model = _gen_efficientnet('tf_efficientnet_b0', channel_multiplier=TINY['width'],
                            depth_multiplier=TINY['depth'], num_classes=TINY['num_classes'],
                            bn_eps=1e-3, pad_type='same')
  return model.eval()


def randomize(model, generator):
  """Random BN affines and running statistics (the default init would hide layout bugs)."""
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        c = module.num_features
        module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
        module.bias.copy_(torch.randn(c, generator=generator) * 0.2)
        module.running_mean.copy_(torch.randn(c, generator=generator) * 0.2)
        module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
        module.num_batches_tracked.fill_(123)
      elif isinstance(module, torch.nn.Conv2d) and module.bias is not None:  # SE convs
        module.bias.copy_(torch.randn(module.out_channels, generator=generator) * 0.2)
    model.classifier.bias.copy_(torch.randn(TINY['num_classes'], generator=generator) * 0.2)


def make_tiny():
  torch.manual_seed(0)
  generator = torch.Generator().manual_seed(1)
  model = tiny_timm_model()
  randomize(model, generator)
  x = np.random.RandomState(2).uniform(-1, 1, INPUT_SHAPE).astype(np.float32)
  with torch.no_grad():
    logits = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  save_file(state, os.path.join(FIXTURES, 'tiny_timm.safetensors'))
  np.savez(os.path.join(FIXTURES, 'tiny_timm_io.npz'), inputs=x, logits=logits)
  with open(os.path.join(FIXTURES, 'tiny_timm.json'), 'w') as f:
    json.dump(dict(model='efficientnet-b0', timm_model='tf_efficientnet_b0', timm_version=timm.__version__,
                   torch_version=torch.__version__, **TINY), f, indent=1)
  print('tiny model:', sum(v.numel() for v in state.values()), 'numbers; logits', logits[0, :4])


def make_keys():
  keys = {}
  for m in MODELS:
    with torch.device('meta'):
      model = timm.create_model(f'tf_efficientnet_{m}')
    keys[f'efficientnet-{m}'] = [[k, list(v.shape)] for k, v in model.state_dict().items()]
  with gzip.open(os.path.join(FIXTURES, 'timm_keys.json.gz'), 'wt') as f:
    json.dump(dict(timm_version=timm.__version__, keys=keys), f, separators=(',', ':'))
  print('keys:', {m: len(v) for m, v in keys.items()})


def make_classes(tfds_labels):
  info = os.path.join(os.path.dirname(timm.__file__), 'data', '_info')
  with open(os.path.join(info, 'imagenet_synsets.txt')) as f:
    synsets = [line.strip() for line in f if line.strip()]
  lemmas = {}
  with open(os.path.join(info, 'imagenet_synset_to_lemma.txt')) as f:
    for line in f:
      wnid, lemma = line.rstrip('\n').split('\t', 1)
      lemmas[wnid] = lemma.strip()
  assert len(synsets) == 1000, len(synsets)
  if tfds_labels:
    with open(tfds_labels) as f:
      tfds = [line.strip() for line in f if line.strip()]
    assert tfds == synsets, 'timm and TFDS disagree on the ImageNet label order'
  with open(os.path.join(ROOT, 'advprop_jax', 'imagenet_classes.txt'), 'w') as f:
    f.writelines(lemmas[s] + '\n' for s in synsets)


def check_export(path):
  model = tiny_timm_model()
  model.load_state_dict(load_file(path), strict=True)
  io = np.load(os.path.join(FIXTURES, 'tiny_timm_io.npz'))
  with torch.no_grad():
    logits = model(torch.from_numpy(io['inputs']).permute(0, 3, 1, 2)).numpy()
  print('strict load OK; max |logits - fixture logits| =', np.abs(logits - io['logits']).max())


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--tfds_labels', default='', help='TFDS imagenet2012 labels.txt to check the order')
  parser.add_argument('--check_export', default='')
  args = parser.parse_args()
  if args.check_export:
    return check_export(args.check_export)
  os.makedirs(FIXTURES, exist_ok=True)
  make_tiny()
  make_keys()
  make_classes(args.tfds_labels)


if __name__ == '__main__':
  main()
