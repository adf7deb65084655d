"""Evaluation outputs: eval_metrics.json, report.md (with the paper's B7 figures) and PNG plots."""
import json
import os

import jax
from matplotlib.figure import Figure  # no pyplot: files only, no GUI backend or global figure state

# RECIPE §3, EfficientNet-B7 vanilla -> AdvProp.
PAPER_B7 = {'imagenet_c_mce': (59.4, 52.9), 'imagenet_a_top1': (37.7, 44.7),
            'stylized_top1': (21.8, 26.6)}


def _pct(x) -> str:
  return f'{100 * x:.2f}'


def report_markdown(meta, results) -> str:
  lines = [f'# Evaluation: {meta["model"]} ({meta.get("method")}) on {meta["dataset"]}', '',
           f'workdir `{meta["workdir"]}`, {"EMA" if meta["ema"] else "raw"} weights, ' + (
               'main (clean) BN.' if meta.get('bn', 'clean') == 'clean' else
               f'through the auxiliary BN of distribution {meta["bn"]!r} (not the inference BN).'),
           '', '| evaluator | status | top-1 (%) | top-5 (%) | examples |', '|---|---|---|---|---|']
  for name, r in results.items():
    if r['status'] != 'ok':
      lines.append(f'| {name} | skipped: {r["reason"]} | | | |')
    elif 'top1' in r:
      lines.append(f'| {name} | ok | {_pct(r["top1"])} | {_pct(r["top5"])} | {r["count"]} |')
    else:
      lines.append(f'| {name} | ok | see below | | |')
  pgd = results.get('pgd', {})
  if pgd.get('status') == 'ok':
    lines += ['', '## White-box PGD (untargeted, L-inf, main BN)', '',
              '| eps (pixels) | steps | top-1 (%) |', '|---|---|---|']
    lines += [f'| {e} | {r["num_steps"]} | {_pct(r["top1"])} |'
              for e, r in pgd['by_epsilon_pixels'].items()]
  cor = results.get('corruptions', {})
  if cor.get('status') == 'ok':
    lines += ['', f'## Corruptions: {cor["suite"]}', '',
              f'clean error {_pct(cor["clean_error"])}%, mean corruption error '
              f'{_pct(cor["mean_corruption_error"])}% '
              f'({_pct(cor["mean_corruption_error_minus_clean"])} points above clean).']
    if 'mce' in cor:
      lines += ['', f'**mCE {_pct(cor["mce"])}**, relative mCE {_pct(cor["relative_mce"])} '
                '(CE_c = mean_s err / AlexNet mean_s err, AlexNet per-corruption averages of '
                'Hendrycks & Dietterich 2019; relative uses AlexNet clean error 43.48%).']
    sevs = sorted({s for by_s in cor['by_type_and_severity'].values() for s in by_s})
    lines += ['', '| corruption | ' + ' | '.join(f'err s{s} (%)' for s in sevs) + ' | mean | CE |',
              '|---|' + '---|' * (len(sevs) + 2)]
    for c, by_s in cor['by_type_and_severity'].items():
      row = cor['per_corruption'][c]
      lines.append(f'| {c} | ' + ' | '.join(_pct(1 - by_s[s]['top1']) if s in by_s else ''
                                             for s in sevs) +
                   f' | {_pct(row["mean_error"])} | {_pct(row["ce"]) if "ce" in row else "-"} |')
  if meta['model'] == 'efficientnet-b7':
    ours = {'imagenet_c_mce': 100 * cor['mce'] if 'mce' in cor else None,
            'imagenet_a_top1': 100 * results['imagenet_a']['top1']
            if results.get('imagenet_a', {}).get('status') == 'ok' else None,
            'stylized_top1': 100 * results['stylized']['top1']
            if results.get('stylized', {}).get('status') == 'ok' else None}
    lines += ['', '## Paper reference (AdvProp, EfficientNet-B7)', '',
              '| metric | paper vanilla | paper AdvProp | ours |', '|---|---|---|---|']
    lines += [f'| {k} | {v[0]} | {v[1]} | {"n/a" if ours[k] is None else f"{ours[k]:.1f}"} |'
              for k, v in PAPER_B7.items()]
  return '\n'.join(lines) + '\n'


def write_outputs(output, meta, results):
  """OUTPUT/eval_metrics.json, report.md and the plots (process 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(output, exist_ok=True)
  plots = write_plots(results, output)
  with open(os.path.join(output, 'eval_metrics.json'), 'w') as f:
    json.dump(dict(meta=meta, results=results, plots=plots), f, indent=2, sort_keys=True, default=str)
  with open(os.path.join(output, 'report.md'), 'w') as f:
    f.write(report_markdown(meta, results))


def write_plots(results, output) -> list:
  written = []
  pgd = results.get('pgd', {})
  if pgd.get('status') == 'ok':
    eps = [float(e) for e in pgd['by_epsilon_pixels']]
    acc = [100 * r['top1'] for r in pgd['by_epsilon_pixels'].values()]
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    ax.plot(eps, acc, 'o-')
    ax.set(xlabel='PGD epsilon (pixels)', ylabel='top-1 (%)', title='White-box PGD')
    ax.grid(True)
    fig.savefig(os.path.join(output, 'pgd_accuracy.png'), dpi=100, bbox_inches='tight')
    written.append('pgd_accuracy.png')
  cor = results.get('corruptions', {})
  if cor.get('status') == 'ok':
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for c, by_s in cor['by_type_and_severity'].items():
      ax.plot([int(s) for s in by_s], [100 * (1 - r['top1']) for r in by_s.values()], 'o-', label=c)
    ax.axhline(100 * cor['clean_error'], color='k', ls='--', label='clean')
    ax.set(xlabel='severity', ylabel='top-1 error (%)', title='Error per corruption and severity')
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True)
    fig.savefig(os.path.join(output, 'corruption_error.png'), dpi=100, bbox_inches='tight')
    written.append('corruption_error.png')
  return written
