"""See benchmarks/stubs/tensorflow."""
from benchmarks.stubs.tensorflow import __getattr__  # noqa: F401
