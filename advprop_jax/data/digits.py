"""`sklearn_digits`: scikit-learn's 1,797 real 8x8 handwritten digits as a TFDS dataset (offline).

The demo and the tests run this through exactly the same pipeline code as ImageNet (TFDS builder,
PNG-encoded images, SkipDecoding, decode, crop, resize), and nothing is downloaded: the pixels ship
inside the scikit-learn wheel.

Format: image uint8 [32, 32, 3], label ClassLabel(10).
  * 8x8 -> 32x32 by NEAREST upsampling (each pixel becomes a 4x4 block): the digits are 8x8 grids of
    ink counts, so interpolating would invent detail; blocks keep the data honest.
  * intensities 0..16 (ink) -> round(v * 255 / 16): bright ink on black, like MNIST.
  * the grey value is replicated to 3 channels so RGB models and RGB augmentations apply unchanged.
Splits: fixed, stratified by label with seed 0: train 1,437 / test 360 examples.
"""
import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
NUM_TRAIN = 1437
NUM_TEST = 360
_SPLIT_SEED = 0


def _split_indices():
  """{'train': indices, 'test': indices} of the stratified, seeded split."""
  from sklearn import datasets, model_selection  # local: only needed when building
  labels = datasets.load_digits().target
  train, test = model_selection.train_test_split(
      np.arange(len(labels)), test_size=NUM_TEST, stratify=labels, random_state=_SPLIT_SEED)
  return {'train': np.sort(train), 'test': np.sort(test)}


def to_rgb32(image8x8):
  """float [8, 8] in 0..16 -> uint8 [32, 32, 3] (nearest upsampling, grey replicated)."""
  scale = IMAGE_SIZE // image8x8.shape[0]
  pixels = np.round(np.asarray(image8x8, np.float64) * (255.0 / 16.0)).astype(np.uint8)
  pixels = np.kron(pixels, np.ones((scale, scale), np.uint8))
  return np.repeat(pixels[:, :, None], 3, axis=2)


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits (UCI optdigits test set), 32x32 RGB."""

  VERSION = tfds.core.Version('1.0.0')
  # No source files and no checksums file. Setting code_path also keeps TFDS 4.9 from probing this
  # module with `importlib_resources`, a package it imports but does not declare as a dependency.
  code_path = None
  RELEASE_NOTES = {'1.0.0': 'Initial release: 32x32x3 PNG, stratified 1437/360 split (seed 0).'}

  def _info(self):
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format='png'),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {name: self._generate_examples(idx) for name, idx in _split_indices().items()}

  def _generate_examples(self, indices):
    from sklearn import datasets
    digits = datasets.load_digits()
    for i in indices:
      # Key = index in load_digits(): stable, so TFDS's deterministic shuffle is reproducible.
      yield int(i), {'image': to_rgb32(digits.images[i]), 'label': int(digits.target[i])}
