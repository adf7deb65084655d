"""The minival: `data.minival_examples` examples of the training split held out of training, so that
model selection (periodic evaluation, keep_best_by, the sidecar) never touches the test split.

The holdout is the first N records of the training split in TFDS order, and training reads the rest:
both are TFDS slices of the same split (`train[0:N]`, `train[N:1437]`), a pure function of the
prepared dataset and N, so every process, every resume and every process count see the same ones
(the TF reference's --holdout_shards, big_vision's `train[:1%]`). TFDS writers shuffle records by
key hash when a dataset is prepared, so the first N are not sorted by class or file name. A train
split that is itself a slice (`train[:90%]`) is resolved first: the minival is its first N records.
"""
import tensorflow_datasets as tfds

NAME = 'minival'  # the evaluator (evaluators.NAMED) and the scalars' prefix
SPLIT = '@minival'  # the eval split that selects the holdout: never a TFDS split's name (\w+)


def examples(data_config) -> int:
  """N; 0 (none) for configs written before the field existed."""
  return int(data_config.get('minival_examples', 0) or 0)


def _range(builder, split: str):
  """(split name, first, end) of a train split that is one contiguous range of a TFDS split."""
  try:
    parts = tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)
  except (KeyError, ValueError, AssertionError) as e:
    raise ValueError(f'config.data.train_split={split!r}: {e}') from None
  if len(parts) != 1:
    raise ValueError(f'config.data.train_split={split!r}: data.minival_examples needs one range of '
                     "one split (not a '+' of several)")
  part = parts[0]
  total = builder.info.splits[part.splitname].num_examples
  first = 0 if part.from_ is None else part.from_
  return part.splitname, first, total if part.to is None else part.to


def check(data_config, builder) -> None:
  """ValueError naming config.data.minival_examples unless 0 <= N < the train split's size."""
  n = data_config.get('minival_examples', 0)
  if isinstance(n, bool) or not isinstance(n, int) or n < 0:
    raise ValueError(f'config.data.minival_examples={n!r} must be an integer >= 0')
  if n:
    _, first, end = _range(builder, data_config.train_split)
    if n >= end - first:
      raise ValueError(f'config.data.minival_examples={n} must be smaller than the '
                       f'{end - first} examples of train split {data_config.train_split!r} '
                       '(training needs the rest)')


def train_split(data_config, builder) -> str:
  """The split training reads: the train split without the minival."""
  n = examples(data_config)
  if not n:
    return data_config.train_split
  name, first, end = _range(builder, data_config.train_split)
  return f'{name}[{first + n}:{end}]'


def split(data_config, builder) -> str:
  """The minival's TFDS split; ValueError when the config holds none out."""
  n = examples(data_config)
  if not n:
    raise ValueError('no minival: set config.data.minival_examples=N to hold N training examples '
                     'out of training')
  name, first, _ = _range(builder, data_config.train_split)
  return f'{name}[{first}:{first + n}]'


def resolve(data_config, builder, eval_split: str) -> str:
  """An evaluator's split: SPLIT -> the holdout, anything else as it is."""
  return split(data_config, builder) if eval_split == SPLIT else eval_split
