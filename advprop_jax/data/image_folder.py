"""`image_folder`: a user's tree of images as a dataset. The tree, its checks and its fingerprint.

    ROOT/<split>/<class>/<image>      e.g. ROOT/train/cat/0001.jpg, ROOT/test/dog/x.png

One folder per split (named by data.train_split / data.eval_split; image-folder configs use
`train` and `test`), one folder per class in each, images directly inside. Classes are the sorted
folder names and must be the same in every split. Names starting with '.' (.DS_Store,
.ipynb_checkpoints) are ignored. A split may carry a TFDS slice, e.g. `train[:90%]`: the folder is
the part before '['.

TF-free (os and PIL only): a bad tree is reported before TensorFlow is touched or anything is
written. Every problem is one `TreeError` line naming the path. image_folder_tfds.py prepares the
checked tree into a cached TFDS dataset, keyed by `fingerprint`.
"""
import dataclasses
import hashlib
import os
import re
from typing import Dict, List, Sequence, Tuple

from PIL import Image, UnidentifiedImageError

NAME = 'image_folder'  # config.data.dataset
# Bump when what preparation writes changes: the fingerprint (so the cache folder) changes with it.
FORMAT_VERSION = '1'
# Formats the pipeline's tf.io.decode_image reads as they are (PIL format names); preparation
# re-encodes anything else PIL can read (TIFF, WebP, CMYK JPEG, ...) to PNG, so every stored image
# decodes.
STORED_AS_IS = {'JPEG': ('L', 'RGB'), 'PNG': None, 'GIF': None, 'BMP': None}
_SPLIT = re.compile(r'^(\w+)(\[.*\])?$')  # TFDS split names are \w+; an optional slice


class TreeError(ValueError):
  """The image folder cannot be a dataset: one line naming the path."""


@dataclasses.dataclass(frozen=True)
class Tree:
  root: str  # absolute
  classes: Tuple[str, ...]  # sorted folder names; label i = classes[i]
  # split folder -> ((path relative to ROOT/split, label, size, mtime_ns), ...) sorted by path
  files: Dict[str, Tuple[Tuple[str, int, int, int], ...]]

  def fingerprint(self) -> str:
    """Changes when a file is added, removed, resized or touched: the tree is then prepared anew."""
    h = hashlib.sha256(f'{FORMAT_VERSION}\0{self.root}\0{self.classes}'.encode())
    for split in sorted(self.files):
      h.update(f'\0{split}'.encode())
      for rel, label, size, mtime in self.files[split]:
        h.update(f'\0{rel}\0{label}\0{size}\0{mtime}'.encode())
    return h.hexdigest()[:16]


def split_folder(split: str) -> str:
  """'train' -> 'train', 'train[:90%]' -> 'train'; TreeError for names TFDS cannot take."""
  match = _SPLIT.match(split or '')
  if not match:
    raise TreeError(f'split {split!r}: an image-folder split is a folder name of letters, digits '
                    "and '_' (optionally with a TFDS slice such as 'train[:90%]')")
  return match.group(1)


def _entries(path: str) -> List[os.DirEntry]:
  try:
    return sorted((e for e in os.scandir(path) if not e.name.startswith('.')), key=lambda e: e.name)
  except OSError as e:
    raise TreeError(f'{path}: cannot list it ({e.strerror or e})') from None


def _class_folders(split_dir: str) -> List[os.DirEntry]:
  folders = []
  for entry in _entries(split_dir):
    if not entry.is_dir():
      raise TreeError(f'{entry.path}: a file where only class folders belong (images go in '
                      f'{split_dir}/<class>/)')
    if not entry.name.isprintable():
      raise TreeError(f'{entry.path}: a class folder name must be printable (no newlines or tabs)')
    folders.append(entry)
  if not folders:
    raise TreeError(f'{split_dir}: no class folders (expected {split_dir}/<class>/<image>)')
  return folders


def scan(root: str, splits: Sequence[str]) -> Tree:
  """The tree of ROOT for these splits (folder names or TFDS split strings), checked: ROOT and each
  split folder exist, every split has the same class folders, none is empty, nothing else is in the
  way. File contents are checked by `image_format` (at preparation: they are read then anyway)."""
  if not root:
    raise TreeError(f"config.data.data_dir is not set: dataset '{NAME}' needs the folder ROOT "
                    'holding ROOT/<split>/<class>/<image>')
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise TreeError(f'image folder {root}: ' + (
        'not a directory' if os.path.exists(root) else 'no such directory'))
  folders = list(dict.fromkeys(split_folder(s) for s in splits))
  classes_of, files = {}, {}
  for folder in folders:
    split_dir = os.path.join(root, folder)
    if not os.path.isdir(split_dir):
      present = ', '.join(e.name for e in _entries(root) if e.is_dir()) or 'no folders'
      raise TreeError(f'{split_dir}: no such split folder (ROOT holds: {present}); set '
                      'config.data.train_split / eval_split to the folder names')
    class_dirs = _class_folders(split_dir)
    classes_of[folder] = [e.name for e in class_dirs]
    files[folder] = []
    for label, class_dir in enumerate(class_dirs):
      images = _entries(class_dir.path)
      if not images:
        raise TreeError(f'{class_dir.path}: empty class folder (no images)')
      for entry in images:
        if entry.is_dir():
          raise TreeError(f'{entry.path}: a folder inside a class folder; images go directly in '
                          f'{class_dir.path}')
        stat = entry.stat()
        files[folder].append((f'{class_dir.name}/{entry.name}', label, stat.st_size,
                              stat.st_mtime_ns))
  reference = folders[0]
  for folder in folders[1:]:
    for a, b in ((folder, reference), (reference, folder)):
      extra = [c for c in classes_of[a] if c not in set(classes_of[b])]
      if extra:
        raise TreeError(f'{os.path.join(root, a)} has class folder(s) {", ".join(extra[:5])} that '
                        f'{os.path.join(root, b)} lacks: every split needs the same classes')
  return Tree(root, tuple(classes_of[reference]), {f: tuple(v) for f, v in files.items()})


def image_format(path: str) -> Tuple[str, str]:
  """(PIL format, mode) read from the file's header, verified; TreeError naming the path if it is
  not an image PIL can read."""
  try:
    with Image.open(path) as image:
      fmt, mode = image.format, image.mode
      image.verify()  # structure (PNG chunk checksums, ...) without decoding every pixel
    return fmt, mode
  except UnidentifiedImageError:
    raise TreeError(f'{path}: not an image (no image format recognised; remove it from the '
                    'image folder)') from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise TreeError(f'{path}: damaged or unreadable image ({getattr(e, "strerror", None) or e})') \
        from None


def stored_as_is(fmt: str, mode: str) -> bool:
  """Whether the pipeline decodes these bytes as they are (else preparation re-encodes as PNG)."""
  return fmt in STORED_AS_IS and (STORED_AS_IS[fmt] is None or mode in STORED_AS_IS[fmt])
