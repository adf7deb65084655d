"""`plan --fit`: the cheapest way to run a config's global batch on a slice that is too small for
it.

The global batch stays (and with it the recipe: learning rate, schedule, steps, BN group). What
changes, in order of cost: nothing, if the step fits; else gradient accumulation k (the same FLOPs,
k smaller micro-batches in sequence), the smallest k that fits; rematerialisation (about a third
more FLOPs) only when no k fits without it.

A compile of a big recipe costs 15-60 min here, so k is not searched. The first compile's buffer
plan says how much of a core's HBM the fixed part takes (state, batch: arguments + outputs -
aliased) and how much the temporaries that grow with the micro-batch (activations, attack); with
temporaries proportional to the micro-batch, the smallest k whose estimate fits is a lower bound on
the answer (real temporaries also hold a part that does not shrink), so one more compile confirms
it. If that one does not fit, its temporaries give a second point of the line temp(b) = c + s b, the
estimate is redone from the line and compiled once more (if the line says no k fits, the compiler's
buffer plans are not that linear at small sizes: the next k tried is then the double). The same with
remat, if needed. So k is the smallest the buffer plans predict, not proven minimal by compiling
k - 1.
"""
import shlex

from advprop_jax import factories

MAX_TRIES = 3  # compiles per remat setting: the first, its estimate, the estimate from the line


def _temp(result: dict):
  """Temporaries per core of a compile: the buffer plan's, or what an out-of-HBM error said."""
  return result.get('temp_bytes') or result.get('temp_bytes_required')


def _fixed(result: dict) -> int:
  """Per-core bytes that do not shrink with the micro-batch: arguments + outputs - aliased (the
  replicated state, donated). Unknown after an out-of-HBM error: 0 (the confirm compile checks)."""
  if 'argument_bytes' not in result:
    return 0
  return result['argument_bytes'] + result['output_bytes'] - result['alias_bytes']


def divisors(n: int) -> list:
  return [k for k in range(1, n + 1) if n % k == 0]


def estimate_k(points, *, fixed: int, hbm: int, per_core_batch: int, accumulator_bytes: int = 0,
               above: int = 0):
  """The smallest k > `above` dividing per_core_batch whose estimated per-core bytes fit `hbm`;
  None when even micro-batches of 1 image would not.

  points: [(micro_batch, temp_bytes)] measured. One point: temporaries proportional to the
  micro-batch. Two or more: the line through the two smallest micro-batches (its slope at least
  0). k > 1 adds `accumulator_bytes` (the gradient sum the accumulation loop carries).
  """
  points = sorted(points)
  if len(points) == 1:
    slope, intercept = points[0][1] / points[0][0], 0.0
  else:
    (b1, t1), (b2, t2) = points[:2]
    slope = max(0.0, (t2 - t1) / (b2 - b1))
    intercept = t1 - slope * b1
  for k in divisors(per_core_batch):
    if k <= above:
      continue
    micro = per_core_batch // k
    total = fixed + intercept + slope * micro + (accumulator_bytes if k > 1 else 0)
    if total <= hbm:
      return k
  return None


def _with(config, k: int, remat: bool):
  c = config.copy_and_resolve_references()
  c.grad_accumulation_steps = k
  c.model_overrides.remat = remat or None  # None: the model's default (no remat)
  return c


def fit(config, topology: str, plan_fn) -> dict:
  """Compiles as few times as it can; returns the chosen compile's result (fits True) with
  `fit_trials`, or the first compile's with fits False and `fit_failure` when nothing fits.
  plan_fn(config, topology) -> plan_core.plan's dict."""
  trials = []

  def compile_(k, remat):
    result = plan_fn(_with(config, k, remat), topology)
    trials.append(dict(grad_accumulation_steps=k, remat=remat, fits=bool(result.get('fits')),
                       per_core_bytes=result.get('per_core_bytes'),
                       temp_bytes=_temp(result), compile_s=result.get('compile_s')))
    return result

  first_k = int(config.grad_accumulation_steps)
  first_remat = bool(config.model_overrides.get('remat'))
  first = compile_(first_k, first_remat)
  for remat in ([first_remat] if first_remat else [False, True]):
    result = first if remat == first_remat else compile_(first_k, remat)
    if result.get('fits'):
      return dict(result, fit_trials=trials)
    per_core = result['per_core_batch']
    points = [(per_core // first_k, _temp(result))]
    k = first_k
    for _ in range(MAX_TRIES - 1):
      tried = k
      k = estimate_k(points, fixed=_fixed(result), hbm=result['hbm_bytes_per_core'],
                     per_core_batch=per_core, accumulator_bytes=result.get('param_bytes', 0),
                     above=tried)
      if k is None and len(points) > 1:
        k = next((d for d in divisors(per_core) if d >= 2 * tried), None)
      if k is None:
        break
      result = compile_(k, remat)
      if result.get('fits'):
        return dict(result, fit_trials=trials)
      points.append((per_core // k, _temp(result)))
  largest = max(t['grad_accumulation_steps'] for t in trials)
  return dict(first, fit_trials=trials, fit_failure=(
      f'nothing fits: the per-core batch {first["per_core_batch"]} of global batch '
      f'{first["global_batch"]} on {topology} does not fit '
      f'{first["hbm_bytes_per_core"] / 2 ** 30:.2f} '
      f'GiB per core with gradient accumulation up to k = {largest}, with remat or without; '
      'a bigger '
      'slice (or more slices) is needed, or a smaller global batch'))


def train_command(config_spec: str, overrides: dict, result: dict) -> str:
  """The command line that trains with the choice: the plan's config and overrides, plus k and
  remat (the slice's processes each run it; see docs/tpu.md)."""
  fields = {k: v for k, v in overrides.items()
            if k not in ('grad_accumulation_steps', 'model_overrides.remat')}
  fields['grad_accumulation_steps'] = result['grad_accumulation_steps']
  if result.get('remat'):
    fields['model_overrides.remat'] = True
  args = ['python', '-m', 'advprop_jax.main', f'--config={config_spec}', '--workdir=WORKDIR']
  args += [f'--config.{k}={v}' for k, v in fields.items()]
  return ' '.join(shlex.quote(a) for a in args)


def micro_batch_note(config, result: dict) -> str:
  """What the choice does to BatchNorm (the recipe's statistics are over smaller batches)."""
  k = result['grad_accumulation_steps']
  loader = factories.loader_batch_size(config)
  micro = loader // result['devices'] // k
  return (f'{k} micro-batch(es) of {micro} images per core; BN statistics over '
          f'{micro * result["bn_group_size"]} images (a {result["bn_group_size"]}-device group)')
