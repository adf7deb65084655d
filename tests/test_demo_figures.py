"""README states the demo's figures as ranges that CI checks (scripts/check_demo_figures.py)."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    'check_demo_figures', os.path.join(ROOT, 'scripts', 'check_demo_figures.py'))
check_demo_figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_demo_figures)


def test_readme_states_the_ranges_ci_checks():
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  for centre, spread in check_demo_figures.DEMO_RANGES.values():
    assert f'{centre:g} ± {spread:g} %' in readme


def test_a_figure_outside_its_range_fails(tmp_path):
  inside = {key: centre / 100 for key, (centre, _) in check_demo_figures.DEMO_RANGES.items()}
  (tmp_path / 'final_metrics.json').write_text(__import__('json').dumps(inside))
  assert check_demo_figures.main(['check', str(tmp_path)]) == 0
  outside = dict(inside, ema_clean_top1=0.9)
  (tmp_path / 'final_metrics.json').write_text(__import__('json').dumps(outside))
  assert check_demo_figures.main(['check', str(tmp_path)]) == 1
  assert check_demo_figures.main(['check', str(tmp_path / 'missing')]) == 2
