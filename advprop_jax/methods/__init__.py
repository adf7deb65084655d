"""The training methods: a static table `METHODS = {name: Method}` (see base.Method for the fields).

Everything that depends on the method (the model's BN distributions, the loader batch, validation, the
attacks a step runs, the gradient) asks the record; no other code branches on the method name.
"""
from advprop_jax.methods import advprop
from advprop_jax.methods import afan
from advprop_jax.methods import fast_advprop
from advprop_jax.methods.base import Attack, Method  # noqa: F401  (re-exported)

METHODS = {m.name: m for m in (advprop.VANILLA, advprop.ADV_TRAIN, advprop.ADVPROP,
                               advprop.FINE_GRAINED_ADVPROP, fast_advprop.FAST_ADVPROP, afan.AFAN)}


def get(name: str) -> Method:
  """The record of method `name`; ValueError listing the methods otherwise."""
  if name not in METHODS:
    raise ValueError(f'method={name!r} is not one of {tuple(METHODS)}')
  return METHODS[name]
