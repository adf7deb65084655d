"""A checked image folder (data/image_folder.py) prepared once as a TFDS dataset, and cached.

Why a builder of ours rather than `tfds.folder_dataset.ImageFolder`: ImageFolder lists and reads
the tree afresh at every start, serves no sub-splits (tfds.split_for_jax_process, the per-process
shards, needs them), gives records no tfds_id, and silently drops files that do not end in
.jpg/.jpeg/.png. Ours writes the images once into TFRecords; from then on the tree is served like
any prepared TFDS dataset (ImageNet's code path): the same per-process sharding, exact evaluation,
caching and resume.

Records: {'image': the file's bytes as they are (JPEG, PNG, GIF, BMP), other formats PIL reads
re-encoded as lossless RGB PNG; 'label': ClassLabel(names=the sorted class folders)}. Split names
are the split folders' names.

Cache: <TFDS data dir>/image_folder/<fingerprint>/ (TFDS data dir: $TFDS_DATA_DIR, else
~/tensorflow_datasets), one folder per state of the tree (image_folder.Tree.fingerprint: paths,
sizes, modification times), so an edited tree is prepared anew; older folders may be deleted.
Processes of a multi-process run share it safely: on one machine they take turns on a lock file (one
prepares, the others then find it prepared), and TFDS writes under a temporary name renamed into
place when complete, so processes on machines sharing the folder never read half a dataset (one
rename wins).
"""
import fcntl
import functools
import io
import logging
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from advprop_jax.data import image_folder


def cache_root() -> str:
  tfds_dir = os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'  # TFDS's own default
  return os.path.join(os.path.expanduser(tfds_dir), image_folder.NAME)


class ImageFolderDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One checked tree; not registered: it is built from a Tree, never looked up by name."""

  name = image_folder.NAME
  VERSION = tfds.core.Version('1.0.0')
  code_path = None  # no checksums file (TFDS 4.9 would probe the module with importlib_resources)

  def __init__(self, tree: image_folder.Tree, *, data_dir: str, formats=None):
    self._tree = tree
    self._formats = formats  # (folder, rel path) -> (PIL format, mode); None: reading only
    super().__init__(data_dir=data_dir)

  def _info(self):
    return self.dataset_info_from_configs(
        description=f'Image folder {self._tree.root}',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(names=list(self._tree.classes)),
        }),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {folder: self._generate_examples(folder) for folder in self._tree.files}

  def _generate_examples(self, folder):
    for rel, label, _, _ in self._tree.files[folder]:
      path = os.path.join(self._tree.root, folder, rel)
      fmt, mode = self._formats[(folder, rel)]
      if image_folder.stored_as_is(fmt, mode):
        with open(path, 'rb') as f:
          data = f.read()
      else:  # a format the pipeline's decoder does not read: lossless RGB PNG
        data = _png(path)
      # Key: the path inside the split, stable, so TFDS's deterministic shuffle is reproducible.
      yield rel, {'image': data, 'label': label}


def _png(path) -> bytes:
  buffer = io.BytesIO()
  try:
    with Image.open(path) as image:
      _to_rgb(image).save(buffer, format='PNG')
  except (OSError, SyntaxError, ValueError) as e:  # its header was fine, its pixels are not
    raise image_folder.TreeError(f'{path}: damaged or unreadable image ({e})') from None
  return buffer.getvalue()


def _to_rgb(image):
  if image.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I'):  # 16-bit: scale (PIL's convert clips)
    pixels = np.clip(np.round(np.asarray(image, np.float64) / 257.0), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, 'L')
  return image.convert('RGB')


def _is_prepared(builder) -> bool:
  # Asked first: TFDS's is_prepared() warns 'Variant folder ... has no dataset_info.json' when there
  # is no folder yet, i.e. on every first preparation.
  return (builder.data_path / 'dataset_info.json').exists() and builder.is_prepared()


def prepared_builder(data_config) -> tfds.core.DatasetBuilder:
  """The prepared dataset of config.data_dir's tree (checked, and prepared if not cached yet)."""
  splits = (data_config.train_split, data_config.eval_split)
  return _prepared(data_config.data_dir, tuple(dict.fromkeys(splits)), cache_root())


@functools.lru_cache(maxsize=8)  # a run asks several times (sizes, classes, train, eval): scan once
def _prepared(root, splits, cache):
  tree = image_folder.scan(root, splits)
  data_dir = os.path.join(cache, tree.fingerprint())
  builder = ImageFolderDataset(tree, data_dir=data_dir)
  if _is_prepared(builder):
    return builder
  # Check every file before anything is written: a bad file stops here, naming its path.
  formats = {(folder, rel): image_folder.image_format(os.path.join(tree.root, folder, rel))
             for folder, entries in tree.files.items() for rel, *_ in entries}
  try:
    _prepare_once(tree, data_dir, formats, cache)
  except OSError as e:  # full disk, no permission: one line (the CLIs' ValueError path)
    raise ValueError(f'cannot prepare image folder {tree.root} into {data_dir} '
                     f'({e.strerror or e}): TFDS_DATA_DIR must be a writable folder with room '
                     'for a copy of the images') from e
  return ImageFolderDataset(tree, data_dir=data_dir)


def _prepare_once(tree, data_dir, formats, cache):
  local = '://' not in cache  # object stores (gs://) have no flock: only the rename guards them
  if local:
    os.makedirs(cache, exist_ok=True)
  lock_path = os.path.join(cache, f'.{tree.fingerprint()}.lock') if local else os.devnull
  with open(lock_path, 'a') as lock:
    if local:
      fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    builder = ImageFolderDataset(tree, data_dir=data_dir, formats=formats)
    if _is_prepared(builder):  # another process of this machine prepared it meanwhile
      return
    logging.info('Preparing image folder %s (%s) into %s', tree.root,
                 ', '.join(f'{f}: {len(v)} images' for f, v in tree.files.items()), data_dir)
    tfds.disable_progress_bar()
    try:
      builder.download_and_prepare()
    except OSError:
      if not _is_prepared(ImageFolderDataset(tree, data_dir=data_dir)):
        raise  # else a process on another machine renamed its copy into place first
