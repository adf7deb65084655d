"""timm's evaluation transform in TF ops, for data_config.eval_preprocessing='timm'.

timm evaluates the ported AdvProp weights (tf_efficientnet_b*.ap_in1k) with torchvision on PIL images:
  Resize(floor(S / crop_pct)) of the SHORT side (long side int(size * long / short)), PIL bicubic;
  CenterCrop(S) with offsets int(round((h - S) / 2)) (Python rounding, half to even);
  x / 255, mean = std = .5.
This differs from the TF reference (crop first, then TF1 bicubic of the crop): the pixel grid, the kernel
(Pillow's a = -0.5, widened by the downscale factor, i.e. antialiased) and uint8 rounding all differ.

`pil_bicubic_resize` is Pillow's 8-bit two-pass resampler (libImaging/Resample.c) re-expressed with TF
ops so it runs inside tf.data: float64 filter weights normalised per output pixel, converted to 22-bit
fixed point, one pass, round and clip to uint8, then the other pass (Pillow 13's order). It equals
PIL.Image.resize(..., BICUBIC) bit for bit (tests/test_data.py checks it against the installed Pillow).
"""
import tensorflow as tf

_PRECISION_BITS = 22  # Pillow: 32 - 8 - 2 fractional bits for 8-bit images
_SUPPORT = 2.0  # bicubic support, in input pixels at scale 1


def _bicubic(x):
  """Pillow's bicubic filter, Keys a = -0.5 (float64)."""
  a = -0.5
  x = tf.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return tf.where(x < 1.0, near, tf.where(x < 2.0, far, tf.zeros_like(x)))


def _coefficients(in_size, out_size, first, count):
  """Taps of output pixels first .. first+count-1 of an in_size -> out_size resample.

  Returns (index [count, k] int32 of input pixels, weight [count, k] int32 fixed point); taps past
  an output pixel's support have weight 0 and a clamped index.
  """
  in_f = tf.cast(in_size, tf.float64)
  scale = in_f / tf.cast(out_size, tf.float64)
  filterscale = tf.maximum(scale, 1.0)
  support = _SUPPORT * filterscale
  ksize = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
  center = (tf.cast(tf.range(first, first + count), tf.float64) + 0.5) * scale
  # C casts truncate toward zero, as tf.cast does.
  xmin = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)
  xmax = tf.minimum(tf.cast(center + support + 0.5, tf.int32), in_size) - xmin  # taps used
  taps = tf.range(ksize)[None, :]
  used = taps < xmax[:, None]
  x = tf.cast(taps + xmin[:, None], tf.float64)
  weight = tf.where(used, _bicubic((x - center[:, None] + 0.5) / filterscale), 0.0)
  total = tf.reduce_sum(weight, axis=1, keepdims=True)
  weight = tf.where(total != 0.0, weight / tf.where(total != 0.0, total, 1.0), weight)
  fixed = weight * float(1 << _PRECISION_BITS)
  fixed = tf.cast(tf.where(fixed < 0.0, fixed - 0.5, fixed + 0.5), tf.int32)  # round half away
  index = tf.minimum(taps + xmin[:, None], in_size - 1)
  return index, fixed


def _pass(image, index, weight, axis):
  """One 8-bit pass along `axis` (0 rows, 1 columns) of an int32 [h, w, 3] image -> uint8 range."""
  gathered = tf.gather(image, index, axis=axis)  # axis 1: [h, n, k, 3]; axis 0: [n, k, w, 3]
  if axis == 1:
    acc = tf.einsum('hnkc,nk->hnc', gathered, weight)
  else:
    acc = tf.einsum('nkwc,nk->nwc', gathered, weight)
  acc = acc + (1 << (_PRECISION_BITS - 1))
  return tf.clip_by_value(tf.bitwise.right_shift(acc, _PRECISION_BITS), 0, 255)


def pil_bicubic_resize(image, height, width, rows=None, cols=None):
  """PIL Image.resize((width, height), BICUBIC) of a uint8 [h, w, 3] image; uint8 result.

  rows / cols = (first, count) compute only that window of the output (same values as cropping the
  full result), which is all timm's center crop keeps.
  """
  shape = tf.shape(image)
  in_h, in_w = shape[0], shape[1]
  first_row, num_rows = rows if rows is not None else (0, height)
  first_col, num_cols = cols if cols is not None else (0, width)
  row_index, row_weight = _coefficients(in_h, height, first_row, num_rows)
  col_index, col_weight = _coefficients(in_w, width, first_col, num_cols)

  # Each pass rounds to 8 bits, so the order matters. A pass whose size does not change is skipped
  # (it would be the identity).
  def horizontal(x):
    return tf.cond(tf.equal(in_w, width), lambda: x[:, first_col:first_col + num_cols],
                   lambda: _pass(x, col_index, col_weight, axis=1))

  def vertical(x):
    return tf.cond(tf.equal(in_h, height), lambda: x[first_row:first_row + num_rows],
                   lambda: _pass(x, row_index, row_weight, axis=0))

  # Pillow >= 13 resamples vertically first when the height shrinks by more than twice as many
  # pixels as the width (older Pillow: always horizontally first; the two differ by a grey level
  # at some pixels of such, rare, very tall images).
  vertical_first = (in_h > height) & (in_h - height > 2 * (in_w - width))
  x = tf.cast(image, tf.int32)
  out = tf.cond(vertical_first, lambda: horizontal(vertical(x)), lambda: vertical(horizontal(x)))
  return tf.cast(out, tf.uint8)


def resize_shorter_and_center_crop(image, image_size, scale_size):
  """timm eval geometry on a decoded uint8 [h, w, 3] image -> uint8 [S, S, 3]; scale_size is timm's
  floor(S / crop_pct)."""
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  # torchvision Resize(int): short side -> scale_size, long side int(scale_size * long / short).
  new_h = tf.where(w <= h, (scale_size * h) // w, scale_size)
  new_w = tf.where(w <= h, scale_size, (scale_size * w) // h)
  # torchvision CenterCrop: int(round((size - S) / 2)) with Python's half-to-even rounding.
  top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float64) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float64) / 2.0), tf.int32)
  out = pil_bicubic_resize(image, new_h, new_w, rows=(top, image_size), cols=(left, image_size))
  return tf.ensure_shape(out, [image_size, image_size, 3])
