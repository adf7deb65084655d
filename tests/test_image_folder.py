"""Issue #26 item 1: a folder of images as a dataset (`--config.data.dataset=image_folder`).

Trees are generated here (JPEG, PNG, and formats preparation re-encodes): each image is one flat
colour whose red level names its class and whose blue level numbers it, so labels, class order and
"every example exactly once" can be read back from the pixels the pipeline yields.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from advprop_jax import cli
from advprop_jax import config as config_lib
from advprop_jax import export
from advprop_jax import main as main_cli
from advprop_jax import predict
from advprop_jax.data import image_folder
from advprop_jax.data import image_folder_tfds
from advprop_jax.data import input_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, 'configs', 'demo.py')
RED = {'cat': 40, 'dog': 130, 'emu': 220}  # class -> red level; sorted names = label order
COUNTS = {'train': 60, 'test': 21}  # per class: 243 images in all


def blue(i):
  return 8 + 4 * i  # 8 .. 244 for 60 images: spaced well beyond JPEG's error on a flat colour


def save(path, red, i):
  """One flat image; the format follows i: JPEG, PNG, palette GIF, TIFF (re-encoded), CMYK JPEG
  (re-encoded: the pipeline's JPEG decoder does not take CMYK)."""
  image = Image.new('RGB', (18 + i % 7, 16 + i % 5), (red, 90, blue(i)))
  kind = i % 10
  if kind == 7:
    image.save(path.with_suffix('.tif'))
  elif kind == 8:
    image.convert('CMYK').save(path.with_suffix('.jpeg'), quality=98)
  elif kind == 9:
    image.save(path.with_suffix('.bmp'))
  elif kind % 2:
    image.save(path.with_suffix('.png'))
  else:
    image.save(path.with_suffix('.jpg'), quality=98)


def make_tree(root, counts=None):
  for split, n in (counts or COUNTS).items():
    for name, red in RED.items():
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(n):
        save(folder / f'{i:03d}', red, i)
  (root / 'train' / 'cat' / '.DS_Store').write_bytes(b'\0\1junk')  # hidden: ignored
  return root


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
  return make_tree(tmp_path_factory.mktemp('images'))


@pytest.fixture(autouse=True)
def tfds_dir(tmp_path, monkeypatch):
  """Prepared copies go to this test's folder, never to ~/tensorflow_datasets."""
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  return tmp_path / 'tfds'


def data_config(root, **fields):
  c = config_lib.data_config()
  c.update(dict(dataset='image_folder', data_dir=str(root), eval_split='test', image_size=16,
                crop_fraction=1.0, train_crop='resize', random_flip=False, augment='none'))
  c.update(fields)
  return c


def decode(images):
  """Flat pixels -> (label by red level, image number by blue level)."""
  mean = images.reshape(len(images), -1, 3).mean(axis=1)
  labels = np.abs(mean[:, :1] - np.array(list(RED.values()))).argmin(axis=1)
  return labels, np.round((mean[:, 2] - 8) / 4).astype(int)


def test_classes_labels_and_exact_eval_over_two_processes(tree):
  c = data_config(tree)
  assert input_pipeline.class_names(c) == ['cat', 'dog', 'emu']
  assert input_pipeline.num_classes(c) == 3
  assert input_pipeline.num_examples(c, 'train') == 3 * COUNTS['train']
  seen = []
  for process in range(2):  # 63 examples, batches of 8: process shares padded to the same length
    batches = list(input_pipeline.eval_dataset(c, per_process_batch_size=8, process_index=process,
                                               process_count=2).as_numpy_iterator())
    assert len(batches) == 4
    for b in batches:
      real = b['mask'] > 0
      labels, numbers = decode(b['image'][real])
      np.testing.assert_array_equal(labels, b['label'][real])  # colour of the folder = its label
      seen += list(zip(labels.tolist(), numbers.tolist()))
  assert sorted(seen) == [(label, i) for label in range(3) for i in range(COUNTS['test'])]

  train = input_pipeline.train_dataset(c, per_process_batch_size=32, seed=0)
  batch = next(train.as_numpy_iterator())
  labels, numbers = decode(batch['image'])
  np.testing.assert_array_equal(labels, batch['label'])
  assert numbers.max() < COUNTS['train'] and len(set(zip(labels, numbers))) == 32


def test_prepared_once_cached_and_redone_when_the_tree_changes(tmp_path, tfds_dir):
  root = make_tree(tmp_path / 'small', {'train': 3, 'test': 1})
  c = data_config(root)
  first = input_pipeline.prepared_builder(c).data_path
  image_folder_tfds._prepared.cache_clear()  # pylint: disable=protected-access
  assert input_pipeline.prepared_builder(c).data_path == first  # found, not prepared again
  assert len(os.listdir(tfds_dir / 'image_folder')) == 2  # the prepared folder and its lock
  save(root / 'test' / 'dog' / '777', RED['dog'], 0)
  image_folder_tfds._prepared.cache_clear()  # pylint: disable=protected-access
  builder = input_pipeline.prepared_builder(c)
  assert builder.data_path != first and builder.info.splits['test'].num_examples == 4


def test_racing_processes_share_one_prepared_copy(tmp_path, tfds_dir):
  root = make_tree(tmp_path / 'small', {'train': 20, 'test': 2})
  script = textwrap.dedent(f'''
      import types
      from advprop_jax.data import image_folder_tfds
      c = types.SimpleNamespace(data_dir={str(root)!r}, train_split='train', eval_split='test')
      print(image_folder_tfds.prepared_builder(c).info.splits['train'].num_examples, flush=True)''')
  env = dict(os.environ, TFDS_DATA_DIR=str(tfds_dir), JAX_PLATFORMS='cpu')
  runs = [subprocess.Popen([sys.executable, '-c', script], cwd=REPO, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
  outputs = [run.communicate(timeout=300) for run in runs]
  for run, (out, err) in zip(runs, outputs):
    assert run.returncode == 0 and out.split()[-1] == '60', err[-2000:]
  # One prepared it (TFDS says so on stdout), the other waited for the lock and found it prepared.
  assert sum('Downloading and preparing' in out for out, _ in outputs) == 1
  prepared = [p for p in os.listdir(tfds_dir / 'image_folder') if not p.startswith('.')]
  assert len(prepared) == 1 and not [p for p in os.listdir(tfds_dir / 'image_folder' / prepared[0] /
                                                           'image_folder') if 'incomplete' in p]


def _bad_not_an_image(root):
  (root / 'test' / 'dog' / 'notes.txt').write_text('not an image')
  return 'test/dog/notes.txt: not an image'


def _bad_truncated_png(root):
  data = (root / 'train' / 'emu' / '001.png').read_bytes()
  (root / 'train' / 'emu' / '001.png').write_bytes(data[:len(data) // 2])
  return 'train/emu/001.png: damaged'


BAD_TREES = {
    'missing root': (lambda root: (os.rename(root, str(root) + '.gone'), 'no such directory')[1]),
    'missing split': (lambda root: (os.rename(root / 'test', root / 'val'),
                                    'test: no such split folder (ROOT holds: train, val)')[1]),
    'eval class absent from train': (lambda root: ((root / 'test' / 'fox').mkdir(),
                                                   save(root / 'test' / 'fox' / '0', 1, 0),
                                                   'has class folder(s) fox that')[2]),
    'train class absent from eval': (lambda root: (os.rename(root / 'test' / 'emu', root / 'x'),
                                                   'train has class folder(s) emu that')[1]),
    'empty class': (lambda root: ([p.unlink() for p in (root / 'train' / 'dog').iterdir()],
                                  'train/dog: empty class folder')[1]),
    'not an image': _bad_not_an_image,
    'damaged image': _bad_truncated_png,
    'file beside the class folders': (lambda root: ((root / 'train' / 'a.jpg').write_bytes(b''),
                                                    'a file where only class folders belong')[1]),
}


@pytest.mark.parametrize('case', sorted(BAD_TREES))
def test_bad_trees_are_one_line_exit_2_nothing_written(case, tmp_path, tfds_dir, capsys):
  root = make_tree(tmp_path / 'images', {'train': 2, 'test': 1})
  needle = BAD_TREES[case](root)
  workdir = tmp_path / 'run'
  status = cli.call(main_cli.define_flags, main_cli.main, 'advprop_jax.main', [
      f'--config={DEMO}', f'--workdir={workdir}', '--config.data.dataset=image_folder',
      f'--config.data.data_dir={root}'])
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert status == 2 and len(err) == 1 and needle in err[0], err
  assert not workdir.exists() and not tfds_dir.exists()  # no checkpoint, no prepared copy


def test_unset_data_dir_and_bad_split_names_are_tree_errors(tmp_path):
  with pytest.raises(image_folder.TreeError, match='config.data.data_dir is not set'):
    image_folder.scan(None, ['train'])
  with pytest.raises(image_folder.TreeError, match="split 'my-test'"):
    image_folder.scan(str(tmp_path), ['my-test'])
  assert image_folder.split_folder('train[:90%]') == 'train'


def test_train_export_predict_end_to_end_with_class_names(tree, tmp_path, tfds_dir, capsys):
  workdir = tmp_path / 'run'
  result = subprocess.run([
      sys.executable, '-m', 'advprop_jax.main', f'--config={DEMO}', f'--workdir={workdir}',
      '--config.data.dataset=image_folder', f'--config.data.data_dir={tree}',
      '--config.method=vanilla', '--config.max_steps=2', '--config.global_batch_size=16',
      '--config.eval_batch_size=32', '--config.data.image_size=16',
      '--config.eval_pgd_epsilons_pixels=()', '--config.model_overrides.stages=((1,3,1,1,16),)',
      '--config.model_overrides.head_features=32'],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='', TFDS_DATA_DIR=str(tfds_dir)))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'config.num_classes=10 -> 3' in result.stderr  # the demo's 10 follows the tree
  assert json.loads((workdir / 'classes.json').read_text()) == ['cat', 'dog', 'emu']
  assert export.run_config(str(workdir))['num_classes'] == 3

  flax_dir, timm_file = tmp_path / 'flax', tmp_path / 'model.safetensors'
  assert export.call([f'--workdir={workdir}', '--format=flax', f'--output={flax_dir}']) == 0
  assert export.read_config(str(flax_dir))['class_names'] == ['cat', 'dog', 'emu']
  assert export.call([f'--workdir={workdir}', '--format=timm', f'--output={timm_file}']) == 0
  from advprop_jax import convert
  assert convert.safetensors_metadata(str(timm_file))['label_names'] == '["cat", "dog", "emu"]'
  image = str(tree / 'test' / 'dog' / '001.png')
  capsys.readouterr()
  for checkpoint in (flax_dir, timm_file):
    assert predict.call([f'--checkpoint={checkpoint}', '--top_k=3', image]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == image and sorted(line.split()[-1] for line in lines[2:5]) == [
        'cat', 'dog', 'emu']


def test_savedmodel_export_carries_the_class_names(tmp_path):
  import tensorflow as tf
  from advprop_jax import workdir as workdir_lib
  from export_fixtures import demo_workdir
  workdir, _ = demo_workdir(tmp_path / 'run')  # the demo's 10 classes
  names = [f'class {i}' for i in range(10)]
  workdir_lib.write_class_names(names, workdir)
  out = tmp_path / 'sm'
  assert export.call([f'--workdir={workdir}', '--format=savedmodel', f'--output={out}',
                      '--platforms=cpu']) == 0
  assert [n.decode() for n in tf.saved_model.load(str(out)).class_names.numpy()] == names
