"""The best checkpoint (`config.keep_best_by=<metric>`): which metrics can rank checkpoints, the
keep-N + best policy, and finding the best step again (`--step=best`).

The metric is one of the periodic evaluation's scalars (`periodic_metrics`): the trainer evaluates
before it saves, and with keep_best_by every evaluation step is also a checkpoint step, saved with
{metric: value}. Orbax keeps the value beside the step (`<step>/metrics/`, its own format for
best_fn) and its preservation policy keeps the newest `keep_checkpoints` plus the best one, so
keep-N never deletes the best. What a step directory holds otherwise is checkpoints.py's.
Accuracies rank higher-is-better; losses and errors lower-is-better.

TF-free: config.validate checks keep_best_by with it before anything is compiled or written.
"""
import logging

# The periodic evaluation (clean, EMA weights, main BN): its scalars are <prefix><key>.
PERIODIC_KEYS = ('top1', 'top5', 'loss')
_LOWER_IS_BETTER = ('loss', 'error', 'mce')
BEST = 'best'  # --step=best


def periodic_prefix(config) -> str:
  """'minival/ema_clean_' with a minival (model selection off the test split), else today's
  'eval_ema/' (the eval split)."""
  return 'minival/ema_clean_' if config.data.get('minival_examples', 0) else 'eval_ema/'


def periodic_metrics(config) -> tuple:
  prefix = periodic_prefix(config)
  return tuple(prefix + k for k in PERIODIC_KEYS)


def check(config) -> None:
  """ValueError naming config.keep_best_by unless it is unset or a periodic metric."""
  name = config.get('keep_best_by')
  if name is not None and name not in periodic_metrics(config):
    hint = ('' if config.data.get('minival_examples', 0) else
            '; minival/... metrics need --config.data.minival_examples=N')
    raise ValueError(f'config.keep_best_by={name!r} is not a metric of the periodic evaluation; '
                     f'choose one of {periodic_metrics(config)}{hint}')


def higher_is_better(metric: str) -> bool:
  return not metric.rsplit('/', 1)[-1].endswith(_LOWER_IS_BETTER)


def policy(keep: int, metric=None):
  """(preservation policy, best_fn, best_mode) for orbax: the newest `keep`, plus the best by
  `metric` when one is given (steps saved without it are ranked by recency only)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  (config.py imports us)
  latest = ocp.checkpoint_managers.LatestN(keep)
  if metric is None:
    return latest, None, 'max'
  best_fn = lambda metrics: float(metrics[metric])
  best = ocp.checkpoint_managers.BestN(get_metric_fn=best_fn, reverse=not higher_is_better(metric),
                                       n=1, keep_checkpoints_without_metrics=False)
  return (ocp.checkpoint_managers.AnyPreservationPolicy([latest, best]), best_fn,
          'max' if higher_is_better(metric) else 'min')


def _metrics(manager, step: int):
  try:
    metrics = manager.metrics(step)
  except Exception as e:  # pylint: disable=broad-except  (unreadable: that step goes unranked)
    logging.warning('Checkpoint step %d: its metrics cannot be read (%s)', step, e)
    return None
  return metrics if isinstance(metrics, dict) and metrics else None


def best_step(manager, steps) -> int:
  """The best of `steps` (complete checkpoint steps) by the metric they were saved with (the
  newest step's, if the run changed keep_best_by); FileNotFoundError when none carries one."""
  ranked = {s: m for s in sorted(steps, reverse=True) if (m := _metrics(manager, s)) is not None}
  if not ranked:
    raise FileNotFoundError(f'no best checkpoint recorded in {manager.directory} (the '
                            'run did not set --config.keep_best_by, or has not evaluated yet)')
  name = next(iter(next(iter(ranked.values()))))  # the trainer saves one metric per step
  candidates = {s: float(m[name]) for s, m in ranked.items() if name in m}
  sign = 1.0 if higher_is_better(name) else -1.0
  return max(candidates, key=lambda s: (sign * candidates[s], s))  # ties: the newer


def parse_step(value):
  """--step: None (the newest), 'best', or a step number; ValueError otherwise."""
  if value is None or value == '' or value == BEST:
    return value or None
  try:
    step = int(value)
  except (TypeError, ValueError):
    step = -1
  if step < 0 or str(value).strip() != str(step):
    raise ValueError(f'--step={value}: give a checkpoint step (a number >= 0) or {BEST!r}')
  return step
