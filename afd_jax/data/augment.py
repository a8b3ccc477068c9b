"""Augmentations as TF ops, and the per-example / per-batch stages that apply them.

- `cifar`: zero-pad `crop_padding` pixels on every side, take a random window of the original
  size, mirror it with probability 1/2 if `random_flip` (per batch, vectorised).
- `imagenet`: train: torchvision's RandomResizedCrop to `image_size` (scale (0.08, 1), ratio
  (3/4, 4/3), ten tries then a centre crop) + flip; eval: resize the shorter side to
  round(image_size * 256 / 224), then centre-crop `image_size` (torchvision's Resize + CenterCrop).
- `none`: nothing.
Images whose size varies (image folders, CUB, Dogs) are first resized to `image_size` squared
under `cifar` and `none`. Resized images are rounded back to uint8, as torchvision's PIL path
does. Every kind ends with (x / 255 - mean) / std. Random draws come from stateless keys.

Two options of the ViT recipe (DeiT's), both off by default (`randaugment.py` has the details):
- `randaugment_ops` > 0: timm's RandAugment with 'inc1' ops (DeiT's rand-m9-mstd0.5-inc1 is ops
  2, `randaugment_magnitude` 9, `randaugment_magnitude_std` 0.5; magnitudes act clipped to
  [0, 10], as timm's), per image on the uint8 batch after crop and flip, before normalisation.
- `random_erasing` > 0: timm's RandomErasing in 'pixel' mode with that probability per image
  (DeiT: 0.25), on the normalised batch.
Both run per batch (a per-image map inside it), each image drawing from the batch's key, so
batches stay a pure function of (seed, shard, epoch, step); with both off, no draw is added.
"""
import dataclasses
import math
from typing import Optional, Sequence, Tuple

from afd_jax.data import randaugment
from afd_jax.data.tfimport import tf
from afd_jax.errors import UserError

KINDS = ('cifar', 'imagenet', 'none')
_RANDAUGMENT_DRAWS, _ERASING_DRAWS = 1, 2  # folded into a batch's key (crop and flip use it as is)


@dataclasses.dataclass(frozen=True)
class Augment:
  """One dataset's augmentation, from `config.dataset` and the source's image shape."""
  kind: str
  image_size: int
  padding: int
  flip: bool
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  source_shape: Optional[Tuple[int, int, int]]  # None: sizes vary
  channels: int
  randaugment_ops: int = 0
  randaugment_magnitude: float = 9.0
  randaugment_magnitude_std: float = 0.5
  random_erasing: float = 0.0

  @classmethod
  def from_config(cls, ds_config, source_shape, channels: int) -> 'Augment':
    mean, std = tuple(ds_config.mean), tuple(ds_config.std)
    if ds_config.augment not in KINDS:
      raise UserError(f'dataset.augment={ds_config.augment!r}; expected one of {", ".join(KINDS)}.')
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
      raise UserError(f'dataset.mean {mean} and dataset.std {std} need {channels} values (std > 0) '
                      f'for {ds_config.name}; see afd_jax.data.stats for recommended constants.')
    if ds_config.crop_padding < 0 or ds_config.image_size < 1:
      raise UserError('dataset.crop_padding must be >= 0 and dataset.image_size >= 1.')
    recipe = _vit_recipe(ds_config, channels)
    return cls(ds_config.augment, ds_config.image_size, ds_config.crop_padding,
               ds_config.random_flip, mean, std, source_shape, channels, *recipe)

  @property
  def resizes(self) -> bool:
    """Whether images change size per example (so cannot be batched before that)."""
    return self.kind == 'imagenet' or self.source_shape is None

  @property
  def output_shape(self) -> Tuple[int, int, int]:
    if self.resizes:
      return (self.image_size, self.image_size, self.channels)
    return self.source_shape

  def train_example(self, image, key):
    if self.kind == 'imagenet':
      return random_resized_crop(image, key, self.image_size)
    return resize(image, self.image_size) if self.resizes else image

  def eval_example(self, image):
    if self.kind == 'imagenet':
      return resize_and_center_crop(image, self.image_size)
    return resize(image, self.image_size) if self.resizes else image

  def train_batch(self, images, key):
    padding = self.padding if self.kind == 'cifar' else 0
    flip = self.flip and self.kind != 'none'
    if padding or flip:
      images = crop_flip(images, key, padding, flip)
    if self.randaugment_ops:
      fill = tuple(min(255, round(255 * m)) for m in self.mean)  # timm's fill: the mean colour
      images = randaugment.rand_augment(
          images, tf.random.experimental.stateless_fold_in(key, _RANDAUGMENT_DRAWS),
          self.randaugment_ops, self.randaugment_magnitude, self.randaugment_magnitude_std, fill)
    images = normalize(images, self.mean, self.std)
    if self.random_erasing:
      images = randaugment.random_erasing(
          images, tf.random.experimental.stateless_fold_in(key, _ERASING_DRAWS),
          self.random_erasing)
    return images

  def eval_batch(self, images):
    return normalize(images, self.mean, self.std)


def _vit_recipe(ds_config, channels: int) -> Tuple[int, float, float, float]:
  """(randaugment_ops, magnitude, magnitude_std, random_erasing) from `ds_config`, checked."""
  ops = ds_config.get('randaugment_ops', 0)
  magnitude = float(ds_config.get('randaugment_magnitude', 9.0))
  magnitude_std = float(ds_config.get('randaugment_magnitude_std', 0.5))
  erasing = float(ds_config.get('random_erasing', 0.0))
  if isinstance(ops, bool) or not isinstance(ops, int) or ops < 0:
    raise UserError(f'dataset.randaugment_ops={ops!r}; expected an integer >= 0 (0 = off).')
  if not (0 <= magnitude <= 30 and magnitude_std >= 0):
    raise UserError(f'dataset.randaugment_magnitude={magnitude} must lie in [0, 30] and '
                    f'dataset.randaugment_magnitude_std={magnitude_std} be >= 0.')
  if ops and channels not in (1, 3):
    raise UserError(f'dataset.randaugment_ops needs grey or RGB images; {ds_config.name} has '
                    f'{channels} channels.')
  if not 0 <= erasing <= 1:
    raise UserError(f'dataset.random_erasing={erasing} is a probability; expected it in [0, 1].')
  return ops, magnitude, magnitude_std, erasing


def normalize(images, mean: Sequence[float], std: Sequence[float]):
  """uint8 -> float32 (x / 255 - mean) / std, per channel."""
  x = tf.cast(images, tf.float32) / 255.0
  return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def crop_flip(images, key, padding: int, flip: bool):
  """Per image of [B, H, W, C]: a random H x W window of the zero-padded image (offsets uniform in
  [0, 2 * padding]), mirrored left-right with probability 1/2 if `flip`. Two gathers per batch."""
  b, h, w = tf.shape(images)[0], images.shape[1], images.shape[2]
  u = tf.random.stateless_uniform([b, 3], key)
  offsets = tf.cast(tf.floor(u[:, :2] * (2 * padding + 1)), tf.int32)
  if padding:
    images = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
  cols = tf.range(w)
  if flip:
    cols = tf.where(u[:, 2:] < 0.5, w - 1 - cols, cols)
  rows = offsets[:, :1] + tf.range(h)
  cols = offsets[:, 1:] + cols
  images = tf.gather(images, rows, axis=1, batch_dims=1)
  return tf.gather(images, cols, axis=2, batch_dims=1)


def random_resized_crop(image, key, size: int, attempts: int = 10):
  """torchvision's RandomResizedCrop: a random window (`crop_window`), resized to size x size."""
  shape = tf.shape(image)
  u = tf.random.stateless_uniform([attempts, 4], key)
  top, left, height, width = crop_window(shape[0], shape[1], u)
  return _resize_to(image[top:top + height, left:left + width], size, size)


def crop_window(height, width, u, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision's RandomResizedCrop.get_params with its random draws given: row t of u [tries, 4]
  holds try t's uniforms for the area, the log aspect ratio, the top and the left offset. The
  first window that fits wins; if none does, the whole image cut to the nearest allowed aspect
  ratio, centred. Returns int32 (top, left, height, width)."""
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = h * w * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * u[:, 1])
  cw, ch = tf.round(tf.sqrt(area * aspect)), tf.round(tf.sqrt(area / aspect))
  fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
  first = tf.argmax(tf.cast(fits, tf.int32))
  found = tf.reduce_any(fits)
  in_ratio = w / h
  fw = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
  fh = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
  ch, cw = tf.where(found, ch[first], fh), tf.where(found, cw[first], fw)
  top = tf.where(found, tf.floor(u[first, 2] * (h - ch + 1)), tf.floor((h - ch) / 2))
  left = tf.where(found, tf.floor(u[first, 3] * (w - cw + 1)), tf.floor((w - cw) / 2))
  return tuple(tf.cast(v, tf.int32) for v in (top, left, ch, cw))


def resize_and_center_crop(image, size: int):
  """torchvision's Resize(round(size * 256 / 224)) + CenterCrop(size)."""
  short = round(size * 256 / 224)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = short / tf.reduce_min(shape)
  # torchvision: the shorter side becomes `short`, the longer int(short * long / short_in).
  new = tf.where(shape == tf.reduce_min(shape), float(short), tf.floor(shape * scale))
  new = tf.cast(new, tf.int32)
  image = _resize_to(image, new[0], new[1])
  top = tf.cast(tf.round(tf.cast(new[0] - size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new[1] - size, tf.float32) / 2), tf.int32)
  return tf.ensure_shape(image[top:top + size, left:left + size], (size, size, None))


def resize(image, size: int):
  return _resize_to(image, size, size)


def _resize_to(image, height, width):
  """Bilinear with antialiasing (PIL's), rounded back to uint8."""
  x = tf.image.resize(image, tf.stack([height, width]), 'bilinear', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)
