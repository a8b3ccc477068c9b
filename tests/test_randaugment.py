"""RandAugment and random erasing (afd_jax/data/randaugment.py) and their place in the pipeline:
the ops against PIL (which timm calls), the draws, determinism, exact restarts, defaults."""
import hashlib
import itertools

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')
Image = pytest.importorskip('PIL.Image')  # PIL defines the ops timm applies
from PIL import ImageEnhance, ImageOps  # noqa: E402  pylint: disable=g-import-not-at-top

from afd_jax.data import pipeline, randaugment as ra  # noqa: E402
from afd_jax.data.augment import Augment  # noqa: E402
from afd_jax.errors import UserError  # noqa: E402
from configs.base import get_base_config  # noqa: E402

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
# The first 4 batches (images and labels) of `stream_digest`'s streams, written by the code before
# RandAugment and random erasing existed: the defaults must leave them bit for bit as they were.
DIGESTS = {
    ('cifar', 3): 'f4fa0ae4fd652577450759b2bf5289cfe687722ae238e330223796a65117348c',
    ('imagenet', 1): '1680e3a639c28c41fe057206f9a86434ea8d05982bc036c7a6c7135776100a8f',
}


def image(channels, seed=1, shape=(13, 17)):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, shape + (channels,), np.uint8)
  x[:3] = rng.integers(40, 90, (3, shape[1], channels))  # a low-contrast band
  return x


def pil(x):
  return Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x)


def back(im, like):
  return np.array(im).reshape(like.shape)


def geometric(x, coefficients, fill):
  im = pil(x)
  return back(im.transform(im.size, Image.AFFINE, coefficients, resample=Image.BILINEAR,
                           fillcolor=fill if x.shape[-1] == 3 else fill[0]), x)


def augment(kind='cifar', channels=3, ops=0, erasing=0.0, size=8, **dataset):
  c = get_base_config().dataset
  c.name, c.augment, c.image_size, c.crop_padding = 'fake', kind, size, 2
  c.mean, c.std = MEAN[:channels], STD[:channels]
  c.randaugment_ops, c.random_erasing = ops, erasing
  for k, v in dataset.items():
    c[k] = v
  return Augment.from_config(c, (10, 10, channels), channels)


def stream(aug, channels, start_step=0, n=4):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (24, 10, 10, channels), np.uint8)
  labels = rng.integers(0, 10, 24).astype(np.int32)
  s = pipeline.Stream(seed=3, shard=0, batch_size=8, steps_per_epoch=3, start_step=start_step)
  return list(itertools.islice(pipeline.memory_batches(images, labels, s, aug), n))


@pytest.mark.parametrize('channels', [1, 3])
def test_pixel_ops_equal_pils(channels):
  x = image(channels)
  im = pil(x)
  half = x // 2 + 30
  cases = {
      'autocontrast': (ra.auto_contrast(half), back(ImageOps.autocontrast(pil(half)), x)),
      'equalize': (ra.equalize(x), back(ImageOps.equalize(im), x)),
      'posterize': (ra.posterize(x, 2), back(ImageOps.posterize(im, 2), x)),
      'solarize': (ra.solarize(x, 100), back(ImageOps.solarize(im, 100), x)),
      'color': (ra.color(x, 0.3), back(ImageEnhance.Color(im).enhance(0.3), x)),
      'contrast': (ra.contrast(x, 1.8), back(ImageEnhance.Contrast(im).enhance(1.8), x)),
      'brightness': (ra.brightness(x, 1.3), back(ImageEnhance.Brightness(im).enhance(1.3), x)),
      'sharpness': (ra.sharpness(x, 0.2), back(ImageEnhance.Sharpness(im).enhance(0.2), x)),
      'sharpen': (ra.sharpness(x, 1.9), back(ImageEnhance.Sharpness(im).enhance(1.9), x)),
  }
  for name, (ours, theirs) in cases.items():
    np.testing.assert_array_equal(np.asarray(ours), theirs, err_msg=name)
  assert not np.array_equal(cases['sharpen'][1], x)  # the ops do change the image


@pytest.mark.parametrize('channels', [1, 3])
def test_geometric_ops_equal_pils_bilinear_transform(channels):
  x, fill = image(channels), (128, 100, 60)[:channels]
  cases = {
      'shear_x': (ra.shear_x(x, 0.27, fill), (1, 0.27, 0, 0, 1, 0)),
      'shear_y': (ra.shear_y(x, -0.2, fill), (1, 0, 0, -0.2, 1, 0)),
      'translate_x': (ra.translate_x(x, 17 * 0.31, fill), (1, 0, 17 * 0.31, 0, 1, 0)),
      'translate_y': (ra.translate_y(x, -13 * 0.4, fill), (1, 0, 0, 0, 1, -13 * 0.4)),
  }
  for name, (ours, coefficients) in cases.items():
    np.testing.assert_array_equal(np.asarray(ours), geometric(x, coefficients, fill), name)
  for degrees in (23.0, -7.0):
    theirs = back(pil(x).rotate(degrees, resample=Image.BILINEAR,
                                fillcolor=fill if channels == 3 else fill[0]), x).astype(int)
    diff = np.abs(np.asarray(ra.rotate(x, degrees, fill)).astype(int) - theirs)
    # The sampling points differ from PIL's in the last bits (sin, cos): a few values by one.
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    corner = (0, 0) if degrees > 0 else (0, -1)
    np.testing.assert_array_equal(np.asarray(ra.rotate(x, degrees, fill))[corner], fill)


def op(x, name, magnitude, negate=False):
  fill = (128,) * x.shape[-1]
  return np.asarray(ra.apply_op(tf.constant(x), ra.OPS.index(name), magnitude, negate, fill))


@pytest.mark.parametrize('channels', [1, 3])
def test_each_op_does_what_its_name_says(channels):
  x = image(channels)
  w, h = x.shape[1], x.shape[0]
  fill = (128,) * channels
  np.testing.assert_array_equal(op(x, 'Invert', 9), 255 - x)
  np.testing.assert_array_equal(op(x, 'SolarizeIncreasing', 10), 255 - x)  # threshold 0
  np.testing.assert_array_equal(op(x, 'SolarizeIncreasing', 5), np.where(x < 128, x, 255 - x))
  np.testing.assert_array_equal(op(x, 'SolarizeAdd', 10),  # +110 below 128, capped at 255
                                np.where(x < 128, np.minimum(x.astype(int) + 110, 255), x))
  np.testing.assert_array_equal(op(x, 'PosterizeIncreasing', 9), x & 0x80)  # 4 - 3 bits kept
  np.testing.assert_array_equal(op(x, 'PosterizeIncreasing', 10), 0 * x)
  np.testing.assert_array_equal(op(x, 'Rotate', 9, True), np.asarray(ra.rotate(x, -27.0, fill)))
  np.testing.assert_array_equal(op(x, 'ShearX', 5),
                                geometric(x, (1, 5 / 10 * 0.3, 0, 0, 1, 0), fill))
  np.testing.assert_array_equal(op(x, 'TranslateXRel', 10, True),
                                geometric(x, (1, 0, -0.45 * w, 0, 1, 0), fill))
  np.testing.assert_array_equal(op(x, 'TranslateYRel', 4),
                                geometric(x, (1, 0, 0, 0, 1, 4 / 10 * 0.45 * h), fill))
  dimmer = back(ImageEnhance.Brightness(pil(x)).enhance(1 - 9 / 10 * 0.9), x)
  np.testing.assert_array_equal(op(x, 'BrightnessIncreasing', 9, True), dimmer)
  np.testing.assert_array_equal(op(x, 'ContrastIncreasing', 10, True),  # factor 0.1, not 0
                                back(ImageEnhance.Contrast(pil(x)).enhance(0.1), x))
  for name in ra.OPS[3:]:  # magnitude 0 leaves the image as it is, but for Posterize (4 bits)
    expected = x & 0xF0 if name == 'PosterizeIncreasing' else x
    np.testing.assert_array_equal(op(x, name, 0.0, True), expected, err_msg=name)
  np.testing.assert_array_equal(np.asarray(ra.apply_op(x, len(ra.OPS), 9.0, False, fill)), x)
  if channels == 1:  # no colour to take away
    np.testing.assert_array_equal(op(x, 'ColorIncreasing', 10, True), x)


def test_draws_follow_timm():
  """Ops uniform over OPS, each kept with probability 1/2, magnitudes N(9, 0.5) clipped to [0, 10]
  (uniform on [0, M] for a std over 100), signs flipped half the time."""
  key = tf.constant([5, 7], tf.int64)
  branch, magnitude, negate = [np.asarray(v) for v in ra.rand_augment_draws(key, 20000, 2, 9, 0.5)]
  assert branch.shape == magnitude.shape == (20000, 2)
  counts = np.bincount(branch.ravel(), minlength=16) / branch.size
  assert abs(counts[15] - 0.5) < 0.01 and np.all(np.abs(counts[:15] - 0.5 / 15) < 0.005)
  assert abs((magnitude == 10).mean() - 0.0228) < 0.003  # P(N(9, 0.5) > 10)
  assert abs(negate.mean() - 0.5) < 0.01
  _, middle, _ = ra.rand_augment_draws(key, 20000, 2, 5, 0.5)
  assert abs(np.mean(middle) - 5) < 0.01 and abs(np.std(middle) - 0.5) < 0.01
  _, high, _ = ra.rand_augment_draws(key, 20000, 2, 10, 0.5)
  assert np.asarray(high).max() == 10 and abs((np.asarray(high) == 10).mean() - 0.5) < 0.01
  _, uniform, _ = ra.rand_augment_draws(key, 20000, 1, 6, 101)
  assert abs(np.asarray(uniform).mean() - 3) < 0.05 and np.asarray(uniform).max() <= 6


@pytest.mark.parametrize('channels', [1, 3])
def test_rand_augment_is_a_function_of_its_key(channels):
  images = np.stack([image(channels, seed) for seed in range(12)])
  run = tf.function(lambda key: ra.rand_augment(images, key, 2, 9, 0.5, (128,) * channels))
  a, again = run(tf.constant([1, 2], tf.int64)), run(tf.constant([1, 2], tf.int64))
  other = run(tf.constant([1, 3], tf.int64))
  assert a.shape == images.shape and a.dtype == tf.uint8
  np.testing.assert_array_equal(a, again)
  assert not np.array_equal(a, other)
  changed = [not np.array_equal(y, x) for x, y in zip(images, np.asarray(a))]
  assert sum(changed) >= 6  # no op at all for 1/4 of the images, on average


def test_random_erasing_erases_a_rectangle_of_noise_with_its_probability():
  images = tf.zeros([4000, 16, 16, 3]) + 7.0
  erase = tf.function(ra.random_erasing)
  erased = np.asarray(erase(images, tf.constant([3, 4], tf.int64), 0.25))
  mask = erased != 7.0
  assert (mask.any(axis=-1) == mask.all(axis=-1)).all()  # every channel of a pixel
  hit = mask.any(axis=(1, 2, 3))
  assert abs(hit.mean() - 0.25) < 0.025
  for m in mask[hit][:200, ..., 0]:
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    assert m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all() and m.sum() == rows.size * cols.size
    assert rows.size < 16 and cols.size < 16  # strictly inside, as timm's
    assert 0.02 * 256 * 0.6 <= m.sum() <= 256 / 3 * 1.4  # target area, rounded sides
  noise = erased[mask]
  assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
  np.testing.assert_array_equal(erase(images, tf.constant([3, 4], tf.int64), 0.25), erased)
  assert not np.array_equal(erase(images, tf.constant([3, 5], tf.int64), 0.25), erased)
  always = np.asarray(erase(images[:500], tf.constant([1, 1], tf.int64), 1.0))
  assert (always != 7.0).any(axis=(1, 2, 3)).mean() > 0.99


@pytest.mark.parametrize('kind,channels', [('cifar', 3), ('imagenet', 1)])
def test_restart_with_both_on_gives_the_same_batches(kind, channels):
  aug = augment(kind, channels, ops=2, erasing=0.25, randaugment_magnitude=9.0)
  full = stream(aug, channels, n=8)
  resumed = stream(aug, channels, start_step=4, n=4)  # from inside epoch 1 into epoch 2
  for a, b in zip(full[4:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  plain = stream(augment(kind, channels), channels, n=1)[0]['image']
  assert not np.array_equal(full[0]['image'], plain)  # the two are on


@pytest.mark.parametrize('kind,channels', list(DIGESTS))
def test_defaults_leave_the_streams_as_they_were(kind, channels):
  aug = augment(kind, channels)
  assert (aug.randaugment_ops, aug.random_erasing) == (0, 0.0)
  h = hashlib.sha256()
  for batch in stream(aug, channels):
    h.update(batch['image'].tobytes())
    h.update(batch['label'].tobytes())
  assert h.hexdigest() == DIGESTS[kind, channels]


@pytest.mark.parametrize('setting,value,words', [
    ('randaugment_ops', -1, 'randaugment_ops=-1'),
    ('randaugment_ops', 1.5, 'randaugment_ops=1.5'),
    ('randaugment_magnitude', 31.0, 'randaugment_magnitude=31.0'),
    ('randaugment_magnitude', -0.5, 'randaugment_magnitude=-0.5'),
    ('randaugment_magnitude_std', -1.0, 'randaugment_magnitude_std=-1.0'),
    ('random_erasing', -0.1, 'random_erasing=-0.1'),
    ('random_erasing', 1.5, 'random_erasing=1.5'),
])
def test_bad_settings_are_refused_in_one_line(setting, value, words):
  c = get_base_config().dataset
  c.name = 'fake'
  c.mean, c.std = MEAN, STD
  with c.ignore_type():
    c[setting] = value
  with pytest.raises(UserError, match=words) as e:
    Augment.from_config(c, (10, 10, 3), 3)
  assert '\n' not in str(e.value)


def test_randaugment_on_other_channel_counts_is_refused():
  c = get_base_config().dataset
  c.name, c.mean, c.std, c.randaugment_ops = 'fake', (0.5,) * 2, (0.2,) * 2, 2
  with pytest.raises(UserError, match='grey or RGB'):
    Augment.from_config(c, (10, 10, 2), 2)
