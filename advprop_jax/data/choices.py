"""The names by which a data config selects a behaviour, with what each means. TF-free: config validation
(config.py) and the pipelines (input_pipeline, preprocessing, autoaugment) share these tables.
"""
from advprop_jax.data.normalization import NORMALIZATIONS

# Inception-style random crop | resize the whole image | resize, zero-pad S/8 per side, random S x S
# crop (the standard CIFAR augmentation: Inception crops of 8 % of a 32 px image are too harsh).
TRAIN_CROPS = ('inception', 'resize', 'pad_crop')
AUGMENTS = ('autoaugment', 'randaugment', 'none')  # AutoAugment policy v0 | RandAugment | none

# Resize kernels (data.resize_method), both without antialiasing:
#   'tf1_bicubic'  tf.compat.v1.image.resize_bicubic, the reference's: Keys a = -0.75, no half-pixel
#                  centres (source x = out_x * in / out);
#   'tf2_bicubic'  tf.image.resize(method='bicubic'): half-pixel centres, Keys a = -0.5 (up to ~100
#                  grey levels from the reference; what this project used before issue #17).
RESIZE_METHODS = ('tf1_bicubic', 'tf2_bicubic')
# Eval transforms (data.eval_preprocessing): the reference's crop-then-resize, or timm's.
EVAL_PREPROCESSINGS = ('tf_reference', 'timm')

# AutoAugment/RandAugment op semantics (data.augment_semantics). 'tf_reference' reproduces what the
# reference's TF code did:
#   * Solarize compares uint8 pixels with a uint8 threshold: 256 (level 10; sub-policy
#     (Posterize 0.8 2, Solarize 0.6 10) of v0) wraps to 0, so every pixel becomes 255 - x;
#     RandAugment magnitudes above 10 wrap the same way (threshold mod 256);
#   * Contrast (RandAugment only) blends towards pixel_count / 256 (the reference sums the histogram
#     instead of weighting it), clipped to 255 and truncated;
#   * Posterize with bits > 8 (RandAugment magnitude >= 22.5): the negative shift wraps in uint8 and
#     TF clamps it to 7, keeping one bit.
# 'pil' (this project's behaviour before issue #17): Solarize(256) and Posterize(bits >= 8) are the
# identity as in PIL; Contrast blends towards the mean grey level (tf.image.rgb_to_grayscale, truncated).
AUGMENT_SEMANTICS = ('tf_reference', 'pil')

# config.data.<field> -> its allowed values.
CHOICES = {
    'train_crop': TRAIN_CROPS,
    'augment': AUGMENTS,
    'resize_method': RESIZE_METHODS,
    'eval_preprocessing': EVAL_PREPROCESSINGS,
    'augment_semantics': AUGMENT_SEMANTICS,
    'normalization': NORMALIZATIONS,
}
