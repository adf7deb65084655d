"""Checks that a finished demo run (README command 1) lands inside the ranges README states.

  python scripts/check_demo_figures.py workdirs/demo

The demo's figures are bit-identical from run to run on one machine, but move with the CPU (XLA's code
for its instruction set), the seed and the device count; README states each as value ± spread, measured
across those (see README, "Quickstart"). CI runs this after the demo: a figure outside its range is a
regression, not a different CPU. Exit 0 inside, 1 outside, 2 when the run has no final metrics.
"""
import json
import os
import sys

# metric -> (centre, half-width) in %: README quotes these, tests/test_demo_figures.py keeps them in step.
DEMO_RANGES = {
    'ema_clean_top1': (98.0, 1.5),   # clean top-1 (EMA weights, main BN) on the 360 test digits
    'ema_pgd4_top1': (96.5, 2.5),    # white-box PGD-4px (5 steps) top-1
}


def check(final: dict) -> list:
  """Lines 'metric value in [low, high]: ok|OUTSIDE' for each DEMO_RANGES metric."""
  lines = []
  for key, (centre, spread) in DEMO_RANGES.items():
    value = 100 * final[key]
    inside = centre - spread <= value <= centre + spread
    lines.append(f'{key} {value:.2f} % in [{centre - spread:g}, {centre + spread:g}]: '
                 f'{"ok" if inside else "OUTSIDE"}')
  return lines


def main(argv) -> int:
  if len(argv) != 2:
    print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
    return 2
  path = os.path.join(argv[1], 'final_metrics.json')
  try:
    with open(path) as f:
      final = json.load(f)
  except (OSError, ValueError) as e:
    print(f'check_demo_figures: {path}: {e}', file=sys.stderr)
    return 2
  missing = [key for key in DEMO_RANGES if key not in final]
  if missing:
    print(f'check_demo_figures: {path} has no {", ".join(missing)}', file=sys.stderr)
    return 2
  lines = check(final)
  print('demo figures: ' + '; '.join(lines))
  return 1 if any(line.endswith('OUTSIDE') for line in lines) else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
