"""Robustness metrics: ImageNet-C mCE and relative mCE (the corrupted inputs are data/eval_sets.py).

mCE form used (documented in the report): AlexNet's published errors are taken as per-corruption
averages over the 5 severities (Hendrycks & Dietterich 2019), so
    CE_c     = mean_s err(c, s) / AlexNet_avg(c)
    relCE_c  = (mean_s err(c, s) - clean_err) / (AlexNet_avg(c) - AlexNet_clean_err)
    mCE      = mean_c CE_c,   relative mCE = mean_c relCE_c.
With all 5 severities this equals the paper's sum_s / sum_s form exactly (same denominators).
"""
from typing import Dict, Optional

import numpy as np

# AlexNet top-1 error (fraction), averaged over severities 1..5; Hendrycks & Dietterich 2019.
ALEXNET_ERR = {
    'gaussian_noise': .886, 'shot_noise': .894, 'impulse_noise': .923, 'defocus_blur': .820,
    'glass_blur': .826, 'motion_blur': .786, 'zoom_blur': .798, 'snow': .867, 'frost': .827,
    'fog': .819, 'brightness': .565, 'contrast': .853, 'elastic_transform': .646, 'pixelate': .718,
    'jpeg_compression': .607,
}
ALEXNET_CLEAN_ERR = .4348
IMAGENET_C_TYPES = tuple(ALEXNET_ERR)


def mce(errors: Dict[str, Dict[int, float]], clean_err: float,
        reference: Optional[Dict[str, float]] = None,
        reference_clean_err: float = ALEXNET_CLEAN_ERR) -> dict:
  """errors[c][s] (fractions) -> per-corruption mean error, CE, relative CE and their means.

  Without `reference` (no AlexNet numbers, e.g. the digits suite) only the mean corruption error and
  its difference to clean are reported.
  """
  out = {'clean_error': clean_err, 'per_corruption': {}}
  means = {c: float(np.mean(list(by_s.values()))) for c, by_s in errors.items()}
  out['mean_corruption_error'] = float(np.mean(list(means.values()))) if means else float('nan')
  out['mean_corruption_error_minus_clean'] = out['mean_corruption_error'] - clean_err
  for c, m in means.items():
    row = {'mean_error': m}
    if reference is not None:
      row['ce'] = m / reference[c]
      row['relative_ce'] = (m - clean_err) / (reference[c] - reference_clean_err)
    out['per_corruption'][c] = row
  if reference is not None and means:
    out['mce'] = float(np.mean([r['ce'] for r in out['per_corruption'].values()]))
    out['relative_mce'] = float(np.mean([r['relative_ce'] for r in out['per_corruption'].values()]))
  return out
