"""FLOPs of a compiled train step, counting every PGD iteration (TF-free; benchmarks and `plan` use it).

XLA's HloCostAnalysis counts a while loop's body once, whatever its trip count, and attacks.pgd runs
K > 1 steps in a fori_loop. One iteration is a forward + input-gradient pass of the attacked model (plus
an elementwise update), so the step's FLOPs are XLA's count plus (K - 1) such passes per attack; a
pass's FLOPs come from the cost analysis of that pass alone (lowered, not compiled: cheap).
"""
import jax
import jax.numpy as jnp

from advprop_jax import methods
from advprop_jax.methods.passes import cross_entropy


def xla_flops(compiled_or_lowered) -> float:
  """XLA's cost-analysis FLOPs of a compiled (or lowered) program; NaN when it reports none."""
  analysis = compiled_or_lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get('flops', float('nan')))


def _shapes(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def attack_loop_flops(model, config, params, model_state, per_device_batch: int) -> float:
  """FLOPs per device that XLA's count of one train step leaves out: PGD iterations 2..K of each attack
  of `config.method` (methods.Attack records), on a shard of `per_device_batch` loader images."""
  params, model_state = _shapes(params), _shapes(model_state)
  size, train = config.data.image_size, config.attack.bn_mode == 'train'
  extra = 0.0
  for attack in methods.get(config.method).attacks(config):
    if attack.num_steps <= 1:
      continue
    n = max(1, round(per_device_batch * attack.batch_fraction))
    stage = {'from_stage': attack.from_stage} if attack.from_stage else {}
    x = jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32)
    if attack.from_stage:  # the attacked feature's shape
      x = jax.eval_shape(lambda p, s, z: model.apply(
          {'params': p, **s}, z, train=False, distribution=attack.distribution,
          to_stage=attack.from_stage), params, model_state, x)
    labels = jax.ShapeDtypeStruct((n,), jnp.int32)

    def input_grad(p, s, z, y, distribution=attack.distribution, stage=stage):
      def loss(z):
        logits = model.apply({'params': p, **s}, z, train=train, distribution=distribution,
                             rngs={'dropout': jax.random.PRNGKey(0)}, **stage)
        return jnp.sum(cross_entropy(logits, y, config.num_classes))
      return jax.grad(loss)(z)

    lowered = jax.jit(input_grad).lower(params, model_state, x, labels)
    extra += (attack.num_steps - 1) * xla_flops(lowered)
  return extra
