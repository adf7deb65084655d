"""Pretrained weights in and out: timm EfficientNet / ResNet and TF-reference EfficientNet checkpoints <-> Flax.

See docs/weights.md. Public API:
  timm_to_flax(state_dict, model_name, **kw) -> variables     flax_to_timm(variables, model_name, **kw) -> dict
  load_state_dict(path) (safetensors, or torch weights_only)    load_timm_checkpoint(path, model_name, **kw)
  save_timm_safetensors(variables, model_name, path, metadata)  tf_checkpoint_to_flax(path, model_name, **kw)
  safetensors_metadata(path): a .safetensors header's metadata   num_classes_of(variables): classifier size
  timm_mapping(model_name_or_module, **overrides) / tf_mapping(...): the name <-> Flax path tables
  main_distribution(variables): drop auxiliary-BN variables (what inference/export needs)
"""
from advprop_jax.convert.mapping import Entry, abstract_variables, main_distribution, resolve_model
from advprop_jax.convert.tf_checkpoint import tf_checkpoint_to_flax
from advprop_jax.convert.timm import (flax_to_timm, load_state_dict, load_timm_checkpoint, num_classes_of,
                                      safetensors_metadata, save_timm_safetensors, timm_to_flax)
from advprop_jax.convert import mapping as _mapping


def timm_mapping(model_name, *, num_classes=None, **overrides):
  """[Entry(name=timm name, path=Flax path, kind, shape, foreign_shape)] for the model's main distribution."""
  return _mapping.entries(resolve_model(model_name, num_classes, **overrides), 'timm')


def tf_mapping(model_name, *, num_classes=None, **overrides):
  """As timm_mapping, with TF-reference names (without the 'efficientnet-bX/' scope); EfficientNet only."""
  return _mapping.entries(resolve_model(model_name, num_classes, **overrides), 'tf')


__all__ = ['Entry', 'abstract_variables', 'flax_to_timm', 'load_state_dict', 'load_timm_checkpoint',
           'main_distribution', 'num_classes_of', 'safetensors_metadata', 'save_timm_safetensors',
           'tf_checkpoint_to_flax', 'tf_mapping', 'timm_mapping', 'timm_to_flax']
