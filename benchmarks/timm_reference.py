"""The PyTorch/timm reference the CPU acceptance of the performance issue compares against.

  python benchmarks/timm_reference.py [--batch=16] [--image_size=224] [--steps=4] [--threads=N]
      [--no_hugepages]

Needs torch and timm, which are NOT in requirements.txt (this script is the only user; install them in a
separate venv). Times, on the same machine and batch as benchmarks/throughput.py, timm's
`tf_efficientnet_b0` (TF 'SAME' padding, BN eps 1e-3) in float32 with RMSProp(TF-style) steps:
  * vanilla: forward + backward + optimizer step on the batch;
  * advprop PGD-K: K attack iterations (forward + input gradient, weights frozen), then forward + backward
    of the clean and of the adversarial batch, then the optimizer step. timm has no auxiliary BN; the two
    passes through one BN set do the same arithmetic (a per-distribution BN only selects other scale/bias
    vectors), so this is the same work as our AdvProp step.
Prints one JSON line per method with images_per_sec (clean images, as benchmarks/throughput.py) and step_ms.
"""
import argparse
import json
import os
import statistics
import time

import hugepages  # benchmarks/hugepages.py: this script runs by path, not as a module
import timm
import torch
import torch.nn.functional as F


def make_steps(model, optimizer, attack_steps, eps, step_size):
  def vanilla(x, y):
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y, label_smoothing=0.1).backward()
    optimizer.step()

  def advprop(x, y):
    model.requires_grad_(False)  # attack: input gradients only
    x_adv = x.detach().clone()
    for _ in range(attack_steps):
      x_adv.requires_grad_(True)
      grad, = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction='sum'), x_adv)
      x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), x - eps), x + eps).clamp(-1, 1)
    model.requires_grad_(True)
    optimizer.zero_grad(set_to_none=True)
    loss = (F.cross_entropy(model(x), y, label_smoothing=0.1)
            + F.cross_entropy(model(x_adv), y, label_smoothing=0.1))
    loss.backward()
    optimizer.step()
  return vanilla, advprop


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--steps', type=int, default=4)
  parser.add_argument('--attack_steps', type=int, default=1)
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  parser.add_argument(hugepages.OPT_OUT, action='store_true',
                      help='run without GLIBC_TUNABLES=' + hugepages.TUNABLE)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model = timm.create_model('tf_efficientnet_b0', pretrained=False, num_classes=1000).train()
  optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-3, momentum=0.9)
  x = torch.rand(args.batch, 3, args.image_size, args.image_size) * 2 - 1
  y = torch.randint(0, 1000, (args.batch,))
  eps = step = 1 * 2 / 255  # 1 pixel in [-1, 1] units
  vanilla, advprop = make_steps(model, optimizer, args.attack_steps, eps, step)
  for name, step_fn in (('vanilla', vanilla), (f'advprop PGD-{args.attack_steps}', advprop)):
    step_fn(x, y)  # warm-up
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      step_fn(x, y)
      times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    print(json.dumps(dict(framework=f'torch {torch.__version__} timm {timm.__version__}', method=name,
                          batch=args.batch, image_size=args.image_size, threads=args.threads,
                          images_per_sec=args.batch / step_s, step_ms=1000 * step_s,
                          step_ms_all=[round(1000 * t, 1) for t in times],
                          load_average=os.getloadavg()[0],
                          glibc_tunables=os.environ.get('GLIBC_TUNABLES', ''))))


if __name__ == '__main__':
  hugepages.reexec_with_hugepages()  # the same malloc environment as benchmarks/throughput.py
  main()
