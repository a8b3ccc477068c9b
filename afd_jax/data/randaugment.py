"""RandAugment and random erasing as TF ops, drawn from stateless keys.

RandAugment follows timm's `rand_augment_transform('rand-m{M}-n{N}-mstd{S}-inc1')`: N ops per
image, chosen uniformly with replacement from `OPS` (timm's increasing-magnitude set), each applied
with probability 1/2 at a magnitude drawn per op from N(M, S) (uniform on [0, M] if S > 100),
clipped to [0, 10]. The ops are PIL's, which timm calls, on uint8 images; the tests check them
against PIL. Geometric ops sample bilinearly (timm picks bilinear or bicubic at random; DeiT's
recipe uses bicubic) and fill with the dataset mean colour, as timm does. On one channel,
Color is the identity (PIL's too) and Contrast uses the image's own mean. Posterize at magnitude
10 keeps no bits (a black image, as PIL did before it began to refuse 0 bits).

Random erasing follows timm's `RandomErasing(p, mode='pixel')` on normalised images: with
probability p, the first of ten tries whose rectangle (area 0.02-1/3 of the image, aspect ratio
log-uniform on 0.3-1/0.3) fits strictly inside the image is filled with standard normal values
per pixel and channel; no try fitting, no erasing.

Keras 3.15's `keras.layers.RandAugment` and `RandomErasing` are not used: the former has another op
set (no Invert or SolarizeAdd, no per-op probability, uniform "factor" magnitudes) and draws its
sub-layers' randomness from stateful seed generators, so a resumed run would not see the same
images; the latter draws the rectangle's sides independently and a random erasing probability.
"""
import functools
import math
from typing import Sequence

from afd_jax.data.tfimport import tf

OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
       'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing',
       'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel',
       'TranslateYRel')
MAX_LEVEL = 10.0


def _to_uint8(x):
  """Truncated towards zero and clipped, as PIL stores a float result."""
  return tf.cast(tf.clip_by_value(tf.floor(x), 0, 255), tf.uint8)


def _f64(value):
  """float64 without a detour through float32 for Python numbers (tf.cast would take one)."""
  return tf.cast(value, tf.float64) if tf.is_tensor(value) else tf.constant(value, tf.float64)


def _apply_lut(image, lut):
  """image uint8 [H, W, C], lut [C, 256] -> lut[c, image[..., c]] as uint8."""
  lut = tf.cast(lut, tf.uint8)
  by_channel = tf.transpose(tf.cast(image, tf.int32), [2, 0, 1])
  return tf.transpose(tf.gather(lut, by_channel, batch_dims=1), [1, 2, 0])


def auto_contrast(image):
  """PIL's ImageOps.autocontrast: each channel's [min, max] stretched to [0, 255]."""
  x = tf.cast(image, tf.float64)
  lo, hi = tf.reduce_min(x, axis=[0, 1]), tf.reduce_max(x, axis=[0, 1])
  scale = 255.0 / tf.where(hi > lo, hi - lo, 1.0)
  return tf.where(hi > lo, _to_uint8(x * scale - lo * scale), image)


def equalize(image):
  """PIL's ImageOps.equalize: each channel mapped through its cumulative histogram."""
  x = tf.cast(image, tf.int32)
  channels = x.shape[-1]
  flat = tf.reshape(x, [-1, channels]) + 256 * tf.range(channels)
  hist = tf.reshape(tf.math.bincount(tf.reshape(flat, [-1]), minlength=256 * channels,
                                     maxlength=256 * channels), [channels, 256])
  top = tf.gather(hist, tf.reduce_max(tf.reshape(x, [-1, channels]), axis=0), batch_dims=1)
  step = (tf.shape(flat)[0] - top) // 255  # PIL: (count - count of the last used value) // 255
  below = tf.cumsum(hist, axis=1, exclusive=True)
  lut = tf.minimum((step[:, None] // 2 + below) // tf.maximum(step, 1)[:, None], 255)
  lut = tf.where(step[:, None] > 0, lut, tf.range(256)[None])
  return _apply_lut(image, lut)


def invert(image):
  return 255 - image


def posterize(image, bits):
  """PIL's ImageOps.posterize: keep the `bits` (0-8) most significant bits."""
  shift = 8 - tf.cast(bits, tf.int32)
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(x, shift), shift), tf.uint8)


def solarize(image, threshold):
  """PIL's ImageOps.solarize: values >= threshold inverted."""
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x < tf.cast(threshold, tf.int32), x, 255 - x), tf.uint8)


def solarize_add(image, addition, threshold: int = 128):
  """timm's solarize_add: `addition` added (capped at 255) to values below `threshold`."""
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x < threshold, tf.minimum(x + tf.cast(addition, tf.int32), 255), x),
                 tf.uint8)


def _grey(image):
  """PIL's convert('L') (ITU-R 601-2 luma, rounded), int32 [H, W, 1]; a grey image as it is."""
  x = tf.cast(image, tf.int32)
  if x.shape[-1] == 1:
    return x
  luma = x[..., :1] * 19595 + x[..., 1:2] * 38470 + x[..., 2:3] * 7471 + 32768
  return tf.bitwise.right_shift(luma, 16)


def _blend(degenerate, image, factor):
  """PIL's Image.blend(degenerate, image, factor), in float32 as PIL computes it."""
  d = tf.cast(degenerate, tf.float32)
  return _to_uint8(d + tf.cast(factor, tf.float32) * (tf.cast(image, tf.float32) - d))


def color(image, factor):
  """PIL's ImageEnhance.Color (0: grey, 1: the image); the identity on one channel."""
  if image.shape[-1] == 1:
    return image
  return _blend(tf.broadcast_to(_grey(image), tf.shape(image)), image, factor)


def contrast(image, factor):
  """PIL's ImageEnhance.Contrast: blend with the grey image's mean, rounded."""
  mean = tf.floor(tf.reduce_mean(tf.cast(_grey(image), tf.float64)) + 0.5)
  return _blend(tf.fill(tf.shape(image), tf.cast(mean, tf.float32)), image, factor)


def brightness(image, factor):
  """PIL's ImageEnhance.Brightness: blend with black."""
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """PIL's ImageEnhance.Sharpness: blend with ImageFilter.SMOOTH (3x3, centre 5, the rest 1, /13,
  rounded; border pixels kept)."""
  x = tf.cast(image, tf.int32)
  h, w = tf.shape(x)[0], tf.shape(x)[1]
  total = 4 * x[1:-1, 1:-1]
  for dy in range(3):
    for dx in range(3):
      total += x[dy:h - 2 + dy, dx:w - 2 + dx]
  smooth = tf.pad(tf.cast(tf.round(tf.cast(total, tf.float64) / 13), tf.int32),
                  [[1, 1], [1, 1], [0, 0]])
  rows, cols = tf.range(h)[:, None, None], tf.range(w)[None, :, None]
  border = (rows == 0) | (rows == h - 1) | (cols == 0) | (cols == w - 1)
  return _blend(tf.where(border, x, smooth), image, factor)


def affine(image, coefficients, fill):
  """PIL's Image.transform(AFFINE, (a, b, c, d, e, f), BILINEAR, fillcolor=fill): output pixel
  centre (x, y) samples the input at (a x + b y + c, d x + e y + f) (pixel corners at integers),
  edge pixels clamped; points outside the image take `fill` (one value per channel)."""
  a, b, c, d, e, f = [_f64(v) for v in coefficients]
  x = tf.cast(image, tf.float64)
  h, w = tf.shape(x)[0], tf.shape(x)[1]
  ys, xs = tf.meshgrid(tf.cast(tf.range(h), tf.float64) + 0.5,
                       tf.cast(tf.range(w), tf.float64) + 0.5, indexing='ij')
  x_in, y_in = a * xs + b * ys + c, d * xs + e * ys + f
  wf, hf = tf.cast(w, tf.float64), tf.cast(h, tf.float64)
  inside = (x_in >= 0) & (x_in < wf) & (y_in >= 0) & (y_in < hf)
  x_in, y_in = x_in - 0.5, y_in - 0.5
  x0, y0 = tf.floor(x_in), tf.floor(y_in)
  dx, dy = (x_in - x0)[..., None], (y_in - y0)[..., None]

  def pixel(yi, xi):
    yi = tf.clip_by_value(tf.cast(yi, tf.int32), 0, h - 1)
    xi = tf.clip_by_value(tf.cast(xi, tf.int32), 0, w - 1)
    return tf.gather_nd(x, tf.stack([yi, xi], axis=-1))

  top = pixel(y0, x0) + (pixel(y0, x0 + 1) - pixel(y0, x0)) * dx
  bottom = pixel(y0 + 1, x0) + (pixel(y0 + 1, x0 + 1) - pixel(y0 + 1, x0)) * dx
  value = top + (bottom - top) * dy
  fill = tf.constant(fill, tf.float64)
  return tf.ensure_shape(_to_uint8(tf.where(inside[..., None], value, fill)), image.shape)


def rotate(image, degrees, fill):
  """PIL's Image.rotate(degrees) about the centre, counter-clockwise, same size."""
  angle = -_f64(degrees) * (math.pi / 180)
  cos, sin = tf.cos(angle), tf.sin(angle)
  cx = tf.cast(tf.shape(image)[1], tf.float64) / 2
  cy = tf.cast(tf.shape(image)[0], tf.float64) / 2
  return affine(image, (cos, sin, cx - cos * cx - sin * cy,
                        -sin, cos, cy + sin * cx - cos * cy), fill)


def shear_x(image, factor, fill):
  return affine(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(image, factor, fill):
  return affine(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0), fill)


def translate_x(image, pixels, fill):
  """Samples `pixels` to the right: the content moves left for pixels > 0."""
  return affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), fill)


def translate_y(image, pixels, fill):
  return affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), fill)


def _signed(level, negate):
  return tf.where(negate, -level, level)


def _enhance_factor(m, negate):
  """timm's _enhance_increasing_level_to_arg: 1 -/+ 0.9 m / 10, at least 0.1."""
  return tf.maximum(1.0 + _signed(m / MAX_LEVEL * 0.9, negate), 0.1)


def _width(image):
  return tf.cast(tf.shape(image)[1], tf.float64)


def _height(image):
  return tf.cast(tf.shape(image)[0], tf.float64)


# Each op as (image, magnitude in [0, 10] (float64), negate (bool), fill) -> image, with timm's
# magnitude -> argument maps ('inc1': stronger with the magnitude).
_OP_FNS = {
    'AutoContrast': lambda x, m, n, fill: auto_contrast(x),
    'Equalize': lambda x, m, n, fill: equalize(x),
    'Invert': lambda x, m, n, fill: invert(x),
    'Rotate': lambda x, m, n, fill: rotate(x, _signed(m / MAX_LEVEL * 30, n), fill),
    'PosterizeIncreasing': lambda x, m, n, fill: posterize(x, 4 - tf.floor(m / MAX_LEVEL * 4)),
    'SolarizeIncreasing': lambda x, m, n, fill: solarize(
        x, 256 - tf.minimum(tf.floor(m / MAX_LEVEL * 256), 256.0)),
    'SolarizeAdd': lambda x, m, n, fill: solarize_add(
        x, tf.minimum(tf.floor(m / MAX_LEVEL * 110), 128.0)),
    'ColorIncreasing': lambda x, m, n, fill: color(x, _enhance_factor(m, n)),
    'ContrastIncreasing': lambda x, m, n, fill: contrast(x, _enhance_factor(m, n)),
    'BrightnessIncreasing': lambda x, m, n, fill: brightness(x, _enhance_factor(m, n)),
    'SharpnessIncreasing': lambda x, m, n, fill: sharpness(x, _enhance_factor(m, n)),
    'ShearX': lambda x, m, n, fill: shear_x(x, _signed(m / MAX_LEVEL * 0.3, n), fill),
    'ShearY': lambda x, m, n, fill: shear_y(x, _signed(m / MAX_LEVEL * 0.3, n), fill),
    'TranslateXRel': lambda x, m, n, fill: translate_x(
        x, _signed(m / MAX_LEVEL * 0.45, n) * _width(x), fill),
    'TranslateYRel': lambda x, m, n, fill: translate_y(
        x, _signed(m / MAX_LEVEL * 0.45, n) * _height(x), fill),
}


def apply_op(image, index, magnitude, negate, fill: Sequence[float]):
  """OPS[index] at `magnitude` (0-10), its sign flipped if `negate`; index len(OPS): none."""
  magnitude = _f64(magnitude)
  branches = [functools.partial(_OP_FNS[name], image, magnitude, negate, fill) for name in OPS]
  return tf.switch_case(tf.convert_to_tensor(index, tf.int32), branches + [lambda: image])


def rand_augment_draws(key, batch, num_ops: int, magnitude: float, magnitude_std: float,
                       prob: float = 0.5):
  """Each image's RandAugment draws, [batch, num_ops] each: the op's index into OPS (len(OPS)
  where it is skipped, with probability 1 - prob), its magnitude and whether its sign flips."""
  u = tf.random.stateless_uniform([batch, num_ops, 4], tf.random.experimental.stateless_fold_in(
      key, 0), dtype=tf.float64)
  choice = tf.minimum(tf.cast(tf.floor(u[..., 0] * len(OPS)), tf.int32), len(OPS) - 1)
  branch = tf.where(u[..., 1] < prob, choice, len(OPS))
  if magnitude_std > 100:  # timm: uniform on [0, magnitude]
    magnitudes = u[..., 3] * magnitude
  else:
    normal = tf.random.stateless_normal([batch, num_ops], tf.random.experimental.stateless_fold_in(
        key, 1), dtype=tf.float64)
    magnitudes = magnitude + magnitude_std * normal
  return branch, tf.clip_by_value(magnitudes, 0.0, MAX_LEVEL), u[..., 2] > 0.5


def rand_augment(images, key, num_ops: int, magnitude: float, magnitude_std: float,
                 fill: Sequence[float], prob: float = 0.5):
  """RandAugment on uint8 [B, H, W, C]; image i takes row i of `rand_augment_draws(key)`."""
  draws = rand_augment_draws(key, tf.shape(images)[0], num_ops, magnitude, magnitude_std, prob)

  def one(args):
    image, branches, magnitudes, negates = args
    def step(k, image):  # a graph loop: the ops' graphs are built once, not num_ops times
      return k + 1, apply_op(image, branches[k], magnitudes[k], negates[k], fill)
    return tf.while_loop(lambda k, _: k < num_ops, step, (0, image))[1]

  return tf.map_fn(one, (images,) + draws,
                   fn_output_signature=tf.TensorSpec(images.shape[1:], tf.uint8))


def erasing_boxes(key, batch, height, width, probability: float, area=(0.02, 1 / 3),
                  min_aspect: float = 0.3, attempts: int = 10):
  """timm's RandomErasing draws for `batch` images: int32 [batch, 4] (top, rows, left, columns),
  rows = columns = 0 where an image keeps its pixels."""
  hf, wf = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  u = tf.random.stateless_uniform([batch, 2 * attempts + 3], key, dtype=tf.float64)
  target = hf * wf * (area[0] + (area[1] - area[0]) * u[:, 1:1 + attempts])
  log_lo, log_hi = math.log(min_aspect), math.log(1 / min_aspect)
  aspect = tf.exp(log_lo + (log_hi - log_lo) * u[:, 1 + attempts:1 + 2 * attempts])
  rows, cols = tf.round(tf.sqrt(target * aspect)), tf.round(tf.sqrt(target / aspect))
  fits = (cols < wf) & (rows < hf)  # strictly, as timm's
  first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
  rows, cols = tf.gather(rows, first, batch_dims=1), tf.gather(cols, first, batch_dims=1)
  top = tf.floor(u[:, -2] * (hf - rows + 1))
  left = tf.floor(u[:, -1] * (wf - cols + 1))
  erase = (u[:, 0] < probability) & tf.reduce_any(fits, axis=1)
  rows, cols = tf.where(erase, rows, 0.0), tf.where(erase, cols, 0.0)
  return tf.cast(tf.stack([top, rows, left, cols], axis=1), tf.int32)


def random_erasing(images, key, probability: float):
  """timm's RandomErasing(probability, mode='pixel') on float [B, H, W, C]; image i takes row i
  of `erasing_boxes` and noise from the i-th seed drawn from `key`."""
  shape = tf.shape(images)
  h, w = shape[1], shape[2]
  boxes = erasing_boxes(tf.random.experimental.stateless_fold_in(key, 0), shape[0], h, w,
                        probability)
  seeds = tf.random.stateless_uniform([shape[0], 2], tf.random.experimental.stateless_fold_in(
      key, 1), minval=None, maxval=None, dtype=tf.int64)

  def erase(args):  # noise for the rectangle only, placed by padding
    image, seed, (y, rows, x, cols) = args[0], args[1], tf.unstack(args[2])

    def fill():
      noise = tf.random.stateless_normal(tf.stack([rows, cols, shape[3]]), seed, dtype=image.dtype)
      noise = tf.pad(noise, [[y, h - y - rows], [x, w - x - cols], [0, 0]])
      rr, cc = tf.range(h)[:, None, None], tf.range(w)[None, :, None]
      return tf.where((rr >= y) & (rr < y + rows) & (cc >= x) & (cc < x + cols), noise, image)

    return tf.cond(rows > 0, fill, lambda: image)

  return tf.map_fn(erase, (images, seeds, boxes),
                   fn_output_signature=tf.TensorSpec(images.shape[1:], images.dtype))
