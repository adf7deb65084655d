"""Config validation helpers: a bad value raises `ConfigError` naming the field and the allowed values.

Validation runs before anything is compiled or written; the CLIs turn a ConfigError into one line on
stderr and exit code 2. Kept apart from config.py so that the method modules, which validate their own
fields, can use it without importing the config schema.
"""


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field (`config.x.y=...`)."""


def get(config, dotted: str):
  """config['a']['b'] for 'a.b'."""
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return value


def require_choice(config, field: str, allowed) -> None:
  value = get(config, field)
  if value not in allowed:
    raise ConfigError(f'config.{field}={value!r} is not allowed; choose one of {tuple(allowed)}')


def require_number(config, field: str, *, low=None, high=None, low_open=False, high_open=False,
                   integer=False) -> None:
  """The value is a number (an integer if asked) in [low, high]; either end may be open or absent."""
  value = get(config, field)
  if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
    raise ConfigError(f'config.{field}={value!r} must be {"an integer" if integer else "a number"}')
  if ((low is not None and (value <= low if low_open else value < low)) or
      (high is not None and (value >= high if high_open else value > high))):
    raise ConfigError(f'config.{field}={value!r} must be {_bounds(low, high, low_open, high_open)}')


def _bounds(low, high, low_open, high_open) -> str:
  if high is None:
    return f'{">" if low_open else ">="} {low}'
  if low is None:
    return f'{"<" if high_open else "<="} {high}'
  return f'in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
