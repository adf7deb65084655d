"""Inert stand-in for accelerator images without TensorFlow (benchmarks/gpu_suite.sh puts it on the path
only when the real package is missing). The timed step never touches tf/tfds/clu: its batch is synthetic.
Modules that import them at top level get objects whose every attribute and call is inert."""


class _Inert:
  def __getattr__(self, name):
    return _Inert()

  def __call__(self, *args, **kwargs):
    return _Inert()

  def __getitem__(self, key):
    return _Inert()

  def __or__(self, other):  # `tf.Tensor | None` in annotations
    return _Inert()

  __ror__ = __or__

  def __iter__(self):
    return iter(())

  def __mro_entries__(self, bases):  # `class X(tf.Module)`
    return (object,)


def __getattr__(name):
  return _Inert()
