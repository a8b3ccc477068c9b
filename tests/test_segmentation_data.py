"""Segmentation data: the offline `fashion_mnist_scenes` set (deterministic scenes whose masks
label every drawn garment pixel with its class + 1, background 0), built through TFDS from IDX
files a test writes."""
import gzip

import numpy as np
import tensorflow_datasets as tfds

from afd_jax.data.builders import fashion_mnist_scenes as scenes
from afd_jax.data.builders.fashion_mnist_local import FILES


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


def test_the_builder_writes_image_and_mask_pairs(tmp_path):
  source = tmp_path / 'fashion'
  source.mkdir()
  images, classes = garments()
  for image_file, label_file in FILES.values():
    write_idx(str(source / image_file), images)
    write_idx(str(source / label_file), classes)
  builder = scenes.FashionMnistScenes(data_dir=str(tmp_path / 'tfds'), source_dir=str(source),
                                      scenes={'train': 12, 'test': 5})
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  assert builder.info.metadata['num_classes'] == scenes.NUM_CLASSES
  test = list(tfds.as_numpy(builder.as_dataset(split='test')))
  assert len(test) == 5
  expected_images, expected_masks = scenes.compose_scenes(images, classes, 5,
                                                          scenes.SEEDS['test'])
  for example, image, mask in zip(test, expected_images, expected_masks):
    np.testing.assert_array_equal(example['image'], image)
    np.testing.assert_array_equal(example['segmentation_mask'], mask)
