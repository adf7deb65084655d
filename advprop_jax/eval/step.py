"""The evaluation step (TF-free): main BN, eval mode, summed metrics of padded, masked batches."""
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from advprop_jax import attacks
from advprop_jax import parallel
from advprop_jax.methods.passes import Passes, cross_entropy
from advprop_jax.models.batchnorm import CLEAN

SUMS = ('count', 'top1', 'top5', 'loss')


def make_eval_step(model, mesh, *, num_classes: int, attack_settings: Optional[dict] = None,
                   class_indices: Optional[Sequence[int]] = None) -> Callable:
  """Compiled `(params, model_state, batch) -> sums` over the mesh: the clean BN in eval mode.

  batch = {'image', 'label', 'mask' (0 for padding)}; returned sums: 'count', 'top1', 'top5', 'loss'.
  attack_settings (methods.passes.attack_settings): top-1/top-5 are measured on white-box PGD examples
  against the same model (untargeted, no random start, running statistics).
  class_indices: the logits are restricted to these classes (ImageNet-A/-R: their 200 classes), and a
  label outside the subset counts as an error.
  """
  axes = parallel.DATA_AXES
  passes = Passes(model)
  num_outputs = num_classes
  if class_indices is not None:
    subset = jnp.asarray(np.asarray(class_indices, np.int32))
    position = np.full([num_classes], -1, np.int32)
    position[np.asarray(class_indices)] = np.arange(len(class_indices))
    position = jnp.asarray(position)
    num_outputs = len(class_indices)

  def logits_fn(params, model_state, x):
    return passes(params, model_state, x, distribution=CLEAN, train=False)[0].astype(jnp.float32)

  def per_device(params, model_state, batch):
    x, labels = batch['image'], batch['label'].astype(jnp.int32)
    mask = batch['mask'].astype(jnp.float32)
    if attack_settings is not None:
      settings = dict(attack_settings, targeted=False, random_start=0.0)
      loss_fn = lambda z: jnp.sum(cross_entropy(logits_fn(params, model_state, z), labels, num_classes)
                                  * mask)
      x = attacks.pgd(loss_fn, x, **settings)
    logits = logits_fn(params, model_state, x)
    if class_indices is not None:
      logits = jnp.take(logits, subset, axis=-1)
      labels = jnp.take(position, labels)
    top = lax.top_k(logits, min(5, num_outputs))[1]
    sums = dict(count=jnp.sum(mask), top1=jnp.sum((top[:, 0] == labels) * mask),
                top5=jnp.sum(jnp.any(top == labels[:, None], -1) * mask),
                loss=jnp.sum(cross_entropy(logits, jnp.maximum(labels, 0), num_outputs) * mask))
    return lax.psum(sums, axes)

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(axes)), out_specs=P(),
                          check_vma=False)
  return jax.jit(sharded)
