"""Segmentation data: the offline `fashion_mnist_scenes` set (deterministic scenes whose masks
label every drawn garment pixel with its class + 1, background 0), built through TFDS from IDX
files a test writes; folders of images and PNG masks (paired by name, an unmatched file refused
naming it); every decoded pair checked (a mask of another size, a label above the classes,
each a failure naming the file, in the training stream one UserError line); joint augmentation
that keeps image and mask aligned and the ignore index through resizing and padding;
oxford_iiit_pet's trimaps mapped to pet, background and ignored border."""
import gzip
import re
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds

from afd_jax import data
from afd_jax.data import joint_augment, segmentation_sources
from afd_jax.data.builders import fashion_mnist_scenes as scenes
from afd_jax.data.builders.fashion_mnist_local import FILES
from afd_jax.data.tfimport import tf
from afd_jax.errors import UserError
from afd_jax.pixels import IGNORE_INDEX
from configs import segmentation


def garments(n=6, seed=0):
  rng = np.random.default_rng(seed)
  images = np.zeros((n, 28, 28), np.uint8)
  for i in range(n):  # a bright block per garment, its place and brightness varying
    top, left = rng.integers(0, 14, 2)
    images[i, top:top + 14, left:left + 14] = 100 + 20 * i
  return images, np.arange(n) % 10


def test_scenes_label_every_drawn_pixel_and_nothing_else():
  images, classes = garments()
  a_images, a_masks = scenes.compose_scenes(images, classes, 40, seed=7)
  b_images, b_masks = scenes.compose_scenes(images, classes, 40, seed=7)
  np.testing.assert_array_equal(a_images, b_images)  # a pure function of its inputs and seed
  np.testing.assert_array_equal(a_masks, b_masks)
  assert a_images.shape == a_masks.shape == (40, scenes.SIZE, scenes.SIZE, 1)
  assert a_images.dtype == a_masks.dtype == np.uint8
  assert not np.array_equal(a_masks, scenes.compose_scenes(images, classes, 40, seed=8)[1])
  labelled = a_masks > 0
  # Background is noise at most NOISE; every labelled pixel shows its garment's brightness.
  assert a_images[~labelled].max() <= scenes.NOISE
  for label in np.unique(a_masks[labelled]):
    brightness = 100 + 20 * (label - 1)  # garment label - 1 (classes are 0..5 here)
    np.testing.assert_array_equal(a_images[a_masks == label], brightness)
  counts = [len(np.unique(m)) - 1 for m in a_masks]  # garments' classes per scene (distinct)
  assert 1 <= min(counts) and max(counts) <= scenes.GARMENTS_PER_SCENE[1]
  assert a_masks.max() < scenes.NUM_CLASSES


def write_idx(path, array):
  header = b'\0\0\x08' + bytes([array.ndim]) + b''.join(
      int(d).to_bytes(4, 'big') for d in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_the_builder_writes_image_and_mask_pairs_that_its_source_decodes(tmp_path):
  source_dir = tmp_path / 'fashion'
  source_dir.mkdir()
  images, classes = garments()
  for image_file, label_file in FILES.values():
    write_idx(str(source_dir / image_file), images)
    write_idx(str(source_dir / label_file), classes)
  builder = scenes.FashionMnistScenes(data_dir=str(tmp_path / 'tfds'),
                                      source_dir=str(source_dir), scenes={'train': 12, 'test': 5})
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  assert builder.info.metadata['num_classes'] == scenes.NUM_CLASSES
  test = list(tfds.as_numpy(builder.as_dataset(split='test')))
  expected_images, expected_masks = scenes.compose_scenes(images, classes, 5,
                                                          scenes.SEEDS['test'])
  source = segmentation_sources.TfdsMaskSource(builder, scenes.NUM_CLASSES)
  got = decoded(source, 'test')  # decoded and checked as training reads them
  assert len(test) == len(got) == 5
  for example, (image, mask), e_image, e_mask in zip(test, got, expected_images, expected_masks):
    np.testing.assert_array_equal(example['image'], e_image)
    np.testing.assert_array_equal(example['segmentation_mask'], e_mask)
    np.testing.assert_array_equal(image, e_image)
    np.testing.assert_array_equal(mask, e_mask[..., 0])
  names = [r['name'].numpy().decode() for r in source.records('test', index=1, count=2)]
  assert names == ['fashion_mnist_scenes test example 3', 'fashion_mnist_scenes test example 4']

# ---------------------------------------------------------------------------------------------
# Folders of images and PNG masks, and the checks every decoded pair passes.

def write_png(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(tf.io.encode_png(array).numpy())


def mask_folder(root, pairs):
  """root/train/images/<name>.png and root/train/masks/<name>.png for {name: (image, mask)}."""
  for name, (image, mask) in pairs.items():
    if image is not None:
      write_png(root / 'train' / 'images' / f'{name}.png', image)
    if mask is not None:
      write_png(root / 'train' / 'masks' / f'{name}.png', mask[..., None])
  return root


def a_pair(h=6, w=8, label=1, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.full((h, w), label, np.uint8)
  mask[0, 0] = IGNORE_INDEX
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mask


def decoded(source, split='train'):
  return [tuple(np.asarray(x) for x in source.decode(r))
          for r in source.records(split)]


def test_mask_folder_pairs_images_with_masks_by_name(tmp_path):
  pairs = {'b': a_pair(label=2, seed=1), 'a': a_pair(label=0, seed=0)}
  source = segmentation_sources.MaskFolderSource(str(mask_folder(tmp_path, pairs)), 3)
  assert source.size('train') == 2
  got = decoded(source)
  for (image, mask), name in zip(got, ['a', 'b']):  # sorted by name
    np.testing.assert_array_equal(image, pairs[name][0])
    np.testing.assert_array_equal(mask, pairs[name][1])


def test_mask_folder_refuses_an_image_without_a_mask_and_a_mask_without_an_image(tmp_path):
  image, mask = a_pair()
  root = mask_folder(tmp_path / 'one', {'a': (image, mask), 'lonely': (image, None)})
  with pytest.raises(UserError, match=r'lonely\.png has no mask .*masks/lonely\.png'):
    segmentation_sources.MaskFolderSource(str(root), 3)
  root = mask_folder(tmp_path / 'two', {'a': (image, mask), 'orphan': (None, mask)})
  with pytest.raises(UserError, match=r'masks/orphan\.png has no image'):
    segmentation_sources.MaskFolderSource(str(root), 3)
  with pytest.raises(UserError, match='num_classes'):
    segmentation_sources.MaskFolderSource(str(root), 0)


@pytest.mark.parametrize('bad, message', [
    ('size', r'masks/bad\.png: the mask is \[5 8\] \(H, W\), its image \[6 8\]'),
    ('label', r'masks/bad\.png: label 7 is not below the 3 classes nor the ignore index 255'),
])
def test_a_bad_mask_fails_naming_its_file(tmp_path, bad, message):
  image, mask = a_pair()
  mask = mask[:5] if bad == 'size' else np.where(mask == 1, 7, mask).astype(np.uint8)
  root = mask_folder(tmp_path, {'bad': (image, mask)})
  source = segmentation_sources.MaskFolderSource(str(root), 3)
  with pytest.raises(tf.errors.InvalidArgumentError) as info:
    decoded(source)
  assert re.search(message, segmentation_sources.undecodable_message(info.value)), info.value


def test_joint_augmentation_keeps_image_and_mask_aligned_and_the_ignore_index():
  # The image's value is 40 x the label everywhere, so a pixel's label can be read off it.
  mask = np.repeat(np.arange(4, dtype=np.uint8), 8)[None].repeat(20, 0)  # 20 x 32, stripes
  mask[:3, :5] = IGNORE_INDEX
  image = np.repeat((40 * np.minimum(mask, 4))[..., None], 3, -1).astype(np.uint8)
  outs = []
  for seed in range(12):
    key = tf.constant([seed, 1], tf.int64)
    a = [np.asarray(x) for x in joint_augment.train_pair(image, mask, key, crop=16)]
    b = [np.asarray(x) for x in joint_augment.train_pair(image, mask, key, crop=16)]
    np.testing.assert_array_equal(a[0], b[0])  # a pure function of the key
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].shape == (16, 16, 3) and a[1].shape == (16, 16)
    assert set(np.unique(a[1])) <= {0, 1, 2, 3, IGNORE_INDEX}  # nearest: no mixed labels
    # Bilinear images blur at the stripes' edges; inside a stripe (a 3 x 3 neighbourhood of one
    # label, away from the crop's border) the image says the mask's label.
    padded = np.pad(a[1], 1, constant_values=254)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3))
    inside = (windows == a[1][..., None, None]).all((-1, -2)) & (a[1] != IGNORE_INDEX)
    assert inside.sum() >= 16
    np.testing.assert_allclose(a[0][..., 0][inside], 40 * a[1][inside].astype(int), atol=2)
    outs.append(a[1])
  # The draws follow the key (the striped image repeats under some crops, so not every pair
  # of keys differs).
  assert len({o.tobytes() for o in outs}) > len(outs) // 2
  # At scale 0.5 the shorter side (20) becomes 8 < 16: the padded rows are ignored, black.
  small_image, small_mask = (np.asarray(x) for x in joint_augment.train_pair(
      image, mask, tf.constant([0, 1], tf.int64), crop=16, scale=(0.5, 0.5), flip=False))
  assert (small_mask[8:] == IGNORE_INDEX).all() and (small_image[8:] == 0).all()
  assert (small_mask[:8] != IGNORE_INDEX).any()
  image_e, mask_e = (np.asarray(x) for x in joint_augment.eval_pair(image, mask, 16))
  assert image_e.shape == (16, 16, 3) and set(np.unique(mask_e)) <= {0, 1, 2, 3, IGNORE_INDEX}
  same = [np.asarray(x) for x in joint_augment.eval_pair(image[:16, :16], mask[:16, :16], 16)]
  np.testing.assert_array_equal(same[1], mask[:16, :16])



def test_oxford_pets_trimaps_become_pet_background_and_ignored_border():
  """oxford_iiit_pet through TFDS (mock data: no download): 2 classes of RGB images; a trimap's
  1 (pet), 2 (background), 3 (border) decode to 1, 0 and the ignore index."""
  config = types.SimpleNamespace(name='oxford_iiit_pet', data_dir='', folder='',
                                 get=lambda key, default=None: default)
  with tfds.testing.mock_data(num_examples=3):
    source = segmentation_sources.open_source(config)
    assert (source.num_classes, source.channels, source.size('test')) == (2, 3, 3)
    trimap = np.array([[1, 2, 3], [3, 2, 1]], np.uint8)
    record = {'image': tf.io.encode_png(np.zeros((2, 3, 3), np.uint8)),
              'mask': tf.io.encode_png(trimap[..., None]), 'name': tf.constant('pet')}
    _, mask = source.decode(record)
  np.testing.assert_array_equal(mask, [[1, 0, IGNORE_INDEX], [IGNORE_INDEX, 0, 1]])


def folder_config(root, batch_size):
  config = segmentation.get_config('data=folder,method=teacher')
  config.dataset.folder, config.dataset.num_classes, config.dataset.image_size = str(root), 3, 8
  config.batch_size = config.eval_batch_size = batch_size
  config.dataset.eval_split = 'train'
  return config


def test_the_training_stream_is_exact_from_any_step_and_over_shards(tmp_path):
  """Batch k of a stream started at step k equals batch k of one started at 0; with two shards
  the two processes' halves make the one-process batch."""
  root = mask_folder(tmp_path, {f'{i}': a_pair(seed=i, label=i % 3) for i in range(8)})
  config = folder_config(root, 4)
  config.dataset.num_shards = 2
  info = data.dataset_info(config)
  stream = lambda start, index=0, count=1: data.train_iterator(
      config, info, start_step=start, process_index=index, process_count=count)
  from_zero = [next(b) for b in [stream(0)] for _ in range(5)]
  from_three = stream(3)
  for k in (3, 4):  # into the second epoch (2 steps per epoch)
    batch = next(from_three)
    for key in ('image', 'label'):
      np.testing.assert_array_equal(batch[key], from_zero[k][key])
  halves = [next(stream(1, p, 2)) for p in (0, 1)]
  for key in ('image', 'label'):
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), from_zero[1][key])


def test_a_bad_mask_in_the_training_stream_is_one_user_error_naming_its_file(tmp_path):
  image, mask = a_pair()
  pairs = {f'{i}': a_pair(seed=i) for i in range(3)}
  pairs['2'] = (image, np.where(mask == 1, 9, mask).astype(np.uint8))  # label 9 of 3 classes
  config = folder_config(mask_folder(tmp_path, pairs), 3)
  info = data.dataset_info(config)
  assert info.dense and info.image_shape == (8, 8, 3) and info.num_train == 3
  stream = data.train_iterator(config, info, start_step=0, process_index=0, process_count=1)
  with pytest.raises(UserError, match=r'^\S+/train/masks/2\.png: label 9 is not below the 3 '
                                      r'classes nor the ignore index 255$'):
    next(stream)
