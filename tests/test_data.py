"""Input pipelines (afd_jax.data): TFDS (mocked), our offline builders, image folders, sharding,
determinism and resume, the augmentations against NumPy re-statements, and the user errors."""
import contextlib
import itertools
import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

import afd_jax.data as data
from afd_jax.data import stats
from afd_jax.errors import UserError
from configs.base import get_base_config

tf = pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')

REPO = pathlib.Path(__file__).resolve().parents[1]
FASHION_DIR = '/usr/share/datasets/fashion-mnist'


def make_config(name, **dataset):
  c = get_base_config()
  c.batch_size, c.eval_batch_size = 64, 256
  c.dataset.name = name
  for k, v in dataset.items():
    c.dataset[k] = v
  return c


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def train(config, info=None, start_step=0, process_index=0, process_count=1):
  info = info or data.dataset_info(config)
  return data.train_iterator(config, info, start_step=start_step, process_index=process_index,
                             process_count=process_count)


def evaluate(config, process_index=0, process_count=1):
  info = data.dataset_info(config, process_count=process_count)
  return list(data.eval_iterator(config, info, process_index=process_index,
                                 process_count=process_count))


def normalised_range(config):
  mean, std = np.array(config.dataset.mean), np.array(config.dataset.std)
  return ((0 - mean) / std).min() - 1e-5, ((1 - mean) / std).max() + 1e-5


def check_batch(batch, config, info, batch_size):
  lo, hi = normalised_range(config)
  assert batch['image'].shape == (batch_size,) + info.image_shape
  assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
  assert lo <= batch['image'].min() and batch['image'].max() <= hi
  assert 0 <= batch['label'].min() and batch['label'].max() < info.num_classes


@contextlib.contextmanager
def no_network():
  """Any attempt to open a connection fails."""
  def refuse(*args, **kwargs):
    raise OSError('networking is disabled in this test')
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, 'connect', refuse)
    mp.setattr(socket, 'getaddrinfo', refuse)
    yield


def digits_config(digits_dir, **dataset):
  return make_config('digits', data_dir=digits_dir, mean=stats.DIGITS_MEAN, std=stats.DIGITS_STD,
                     **dataset)


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  with no_network():
    data.dataset_info(digits_config(path))
  return path


@pytest.fixture(scope='session')
def fashion_info(tmp_path_factory):
  if not os.path.isdir(FASHION_DIR):
    pytest.skip(f'{FASHION_DIR} not found: `apt-get install dataset-fashion-mnist` provides it')
  config = make_config('fashion_mnist_local', data_dir=str(tmp_path_factory.mktemp('tfds')),
                       mean=stats.FASHION_MNIST_MEAN, std=stats.FASHION_MNIST_STD)
  with no_network():
    return config, data.dataset_info(config)


def write_image_folder(root, counts, seed=0):
  """root/<split>/<class>/<i>.png|jpg, random sizes, some grey; counts: {split: {class: n}}."""
  rng = np.random.default_rng(seed)
  for split, classes in counts.items():
    for c, n in classes.items():
      os.makedirs(root / split / c)
      for i in range(n):
        image = rng.integers(0, 256, (rng.integers(10, 30), rng.integers(10, 30), 1 + 2 * (i % 2)),
                             np.uint8)
        encoded = tf.io.encode_png(image) if i % 3 else tf.io.encode_jpeg(image)
        (root / split / c / f'{i}.{"png" if i % 3 else "jpg"}').write_bytes(encoded.numpy())
  return root


@pytest.fixture
def image_folder(tmp_path):
  return write_image_folder(tmp_path / 'folder', {
      'train': {'cat': 4, 'dog': 3, 'owl': 3}, 'test': {'cat': 2, 'dog': 1, 'owl': 2}})


def test_importing_the_package_does_not_import_tensorflow():
  code = ('import sys, afd_jax.data, afd_jax.data.stats; '
          'print(sorted({m.split(".")[0] for m in sys.modules} & {"tensorflow", '
          '"tensorflow_datasets"}))')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == '[]'
  imports_tf = re.compile(r'^\s*(import|from)\s+tensorflow', re.MULTILINE)
  outside = [p for p in (REPO / 'afd_jax').rglob('*.py') if 'data' not in p.relative_to(
      REPO / 'afd_jax').parts and imports_tf.search(p.read_text())]
  assert not outside, f'TensorFlow imported outside afd_jax/data: {outside}'


@pytest.mark.parametrize('name,augment', [
    ('cifar10', 'cifar'), ('cifar100', 'cifar'), ('imagenet2012', 'imagenet'),
    ('caltech_birds2011', 'imagenet'), ('stanford_dogs', 'imagenet')])
def test_tfds_datasets_with_mock_data(name, augment, tmp_path):
  config = make_config(name, augment=augment, image_size=24, data_dir=str(tmp_path),
                       eval_split='validation' if name == 'imagenet2012' else 'test')
  config.batch_size, config.eval_batch_size = 8, 4
  num_classes = {'cifar10': 10, 'cifar100': 100, 'imagenet2012': 1000,
                 'caltech_birds2011': 200, 'stanford_dogs': 120}[name]
  with tfds.testing.mock_data(num_examples=13):
    info = data.dataset_info(config)
    assert (info.num_classes, info.num_train, info.num_eval) == (num_classes, 13, 13)
    assert info.image_shape == ((32, 32, 3) if augment == 'cifar' else (24, 24, 3))
    for batch in take(train(config, info), 3):  # 1 step per epoch: crosses epochs
      check_batch(batch, config, info, 8)
    batches = list(data.eval_iterator(config, info, process_index=0, process_count=1))
  assert len(batches) == data.num_eval_batches(config, info, 1) == 4
  assert [b['mask'].sum() for b in batches] == [4, 4, 4, 1]
  for b in batches:
    check_batch(b, config, info, 4)


def test_image_folder_reads_like_tfds_image_folder(image_folder):
  config = make_config('image_folder', folder=str(image_folder), augment='imagenet', image_size=16,
                       mean=stats.IMAGENET_MEAN, std=stats.IMAGENET_STD)
  config.batch_size, config.eval_batch_size = 4, 4
  info = data.dataset_info(config)
  assert (info.num_classes, info.num_train, info.num_eval, info.image_shape) == (3, 10, 5,
                                                                                (16, 16, 3))
  for batch in take(train(config, info), 3):
    check_batch(batch, config, info, 4)
  batches = list(data.eval_iterator(config, info, process_index=0, process_count=1))
  labels = np.concatenate([b['label'][b['mask'] > 0] for b in batches])
  assert sorted(labels) == [0, 0, 1, 2, 2]
  shares = [evaluate(config, i, 2) for i in range(2)]  # 3 + 2 examples in local batches of 2
  assert [[b['mask'].sum() for b in share] for share in shares] == [[2, 1], [2, 0]]
  assert sorted(np.concatenate([b['label'][b['mask'] > 0] for s in shares for b in s])) == [
      0, 0, 1, 2, 2]
  # Same classes, order and labels as tfds.folder_dataset.ImageFolder.
  from afd_jax.data.sources import FolderSource
  ours = list(FolderSource(str(image_folder)).records('train').as_numpy_iterator())
  theirs = list(tfds.folder_dataset.ImageFolder(str(image_folder)).as_dataset(
      'train', decoders={'image': tfds.decode.SkipDecoding()}).as_numpy_iterator())
  assert [(r['image'], r['label']) for r in ours] == [
      (r['image/filename'], r['label']) for r in theirs]
  # cifar / none augmentation resize images of varying size to image_size.
  config.dataset.augment = 'cifar'
  check_batch(next(train(config)), config, info, 4)


def test_image_folder_uses_valid_when_there_is_no_test(tmp_path):
  root = write_image_folder(tmp_path, {'train': {'a': 2, 'b': 2}, 'valid': {'a': 1, 'b': 1}})
  config = make_config('image_folder', folder=str(root), augment='imagenet', image_size=8)
  config.batch_size = 2
  assert data.dataset_info(config).num_eval == 2


def test_two_processes_get_disjoint_shares_whose_union_is_the_split(digits_dir):
  # 1,436 examples: 718 per process, 2 steps of 359 per epoch, so an epoch reads every example.
  config = digits_config(digits_dir, augment='none', train_subset=1436, eval_split='train[:1436]')
  config.batch_size, config.eval_batch_size = 718, 718
  info = data.dataset_info(config, process_count=2)
  assert data.steps_per_epoch(config, info, 2) == 2
  everything = {x.tobytes() for b in evaluate(config) for x in b['image'][b['mask'] > 0]}
  assert len(everything) == 1436
  shares = [{x.tobytes() for b in take(train(config, info, 0, i, 2), 2) for x in b['image']}
            for i in range(2)]
  assert len(shares[0]) == len(shares[1]) == 718
  assert not shares[0] & shares[1] and shares[0] | shares[1] == everything


def test_fixed_num_shards_gives_the_same_batches_on_any_process_count(digits_dir):
  """One process reading both shards yields the concatenation of what two processes yield."""
  config = digits_config(digits_dir, num_shards=2)
  info = data.dataset_info(config)
  assert data.steps_per_epoch(config, info, 1) == data.steps_per_epoch(config, info, 2) == 22
  single = take(train(config, info, start_step=21), 2)  # crosses the epoch boundary
  halves = [take(train(config, info, start_step=21, process_index=i, process_count=2), 2)
            for i in range(2)]
  for k, batch in enumerate(single):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          batch[key], np.concatenate([halves[0][k][key], halves[1][k][key]]))
  config.dataset.num_shards = 3
  with pytest.raises(UserError, match='num_shards=3 must be a positive multiple of the 2'):
    data.steps_per_epoch(config, info, 2)


def test_eval_covers_each_example_once_for_uneven_sizes(digits_dir):
  config = digits_config(digits_dir, eval_split='test[:13]')
  config.eval_batch_size = 4
  single = [x.tobytes() for b in evaluate(config) for x in b['image'][b['mask'] > 0]]
  per_process = [evaluate(config, i, 2) for i in range(2)]
  assert [len(p) for p in per_process] == [4, 4]  # shares of 7 and 6, local batches of 2
  assert [[b['mask'].sum() for b in p] for p in per_process] == [[2, 2, 2, 1], [2, 2, 2, 0]]
  both = [x.tobytes() for p in per_process for b in p for x in b['image'][b['mask'] > 0]]
  assert len(single) == 13 and sorted(both) == sorted(single)
  assert all((b['image'][b['mask'] == 0] == 0).all() for p in per_process for b in p)


@pytest.mark.parametrize('augment,shuffle_buffer,cache', [
    ('cifar', 0, True), ('imagenet', 0, True), ('cifar', 0, False), ('cifar', 300, True)])
def test_batches_are_reproducible_and_resume_exactly(digits_dir, augment, shuffle_buffer, cache):
  config = digits_config(digits_dir, augment=augment, image_size=8, crop_padding=2,
                         shuffle_buffer=shuffle_buffer, cache=cache)
  info = data.dataset_info(config)
  assert data.steps_per_epoch(config, info, 1) == 22  # 1,437 // 64
  full = take(train(config, info), 26)
  again = take(train(config, info), 26)
  resumed = take(train(config, info, start_step=20), 6)  # crosses the epoch boundary at 22
  for a, b in zip(full, again):
    np.testing.assert_array_equal(a['image'], b['image'])
  for a, b in zip(full[20:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.array_equal(full[0]['image'], full[22]['image'])  # a new order every epoch
  config.seed = 1
  assert not np.array_equal(full[0]['image'], next(train(config, info))['image'])


def test_cifar_augmentation_matches_numpy(tmp_path):
  """Random 32x32x3 images, padding 4, flips, the official mean/std: each augmented image is a
  window of the zero-padded original at offsets in [0, 8]^2, maybe mirrored, then normalised."""
  mean, std = np.array(stats.CIFAR100_MEAN), np.array(stats.CIFAR100_STD)
  config = make_config('cifar100', data_dir=str(tmp_path), mean=stats.CIFAR100_MEAN,
                       std=stats.CIFAR100_STD)
  config.batch_size = 32
  plain = make_config('cifar100', data_dir=str(tmp_path), augment='none')
  plain.batch_size = 32
  with tfds.testing.mock_data(num_examples=64):
    # The pipeline reads only the encoded image and the label; mock_data's draws depend on that.
    decoders = tfds.decode.PartialDecoding({'image': True, 'label': True},
                                           decoders={'image': tfds.decode.SkipDecoding()})
    raw = np.stack([tf.io.decode_png(x['image']) for x in tfds.builder('cifar100').as_dataset(
        split='train', decoders=decoders)])
    augmented = take(train(config), 2)
    unaugmented = take(train(plain), 2)
  from afd_jax.data import pipeline
  order = pipeline.epoch_order(config.seed, 0, 0, 64)
  originals = raw[order].reshape(2, 32, 32, 32, 3)
  windows = set()
  for aug, plain_batch, original in zip(augmented, unaugmented, originals):
    np.testing.assert_allclose(plain_batch['image'], (original / 255 - mean) / std, atol=1e-5)
    padded = np.pad(original, ((0, 0), (4, 4), (4, 4), (0, 0)))
    for x, image in zip(aug['image'], padded):
      candidates = {(dy, dx, flip): image[dy:dy + 32, dx:dx + 32][:, ::-1 if flip else 1]
                    for dy in range(9) for dx in range(9) for flip in (False, True)}
      errors = {k: np.abs(x - (c / 255 - mean) / std).max() for k, c in candidates.items()}
      best = min(errors, key=errors.get)
      assert errors[best] < 1e-5
      windows.add(best)
  assert {w[2] for w in windows} == {False, True} and len(windows) > 40


def np_crop_window(h, w, u, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision.transforms.RandomResizedCrop.get_params with its uniforms given."""
  for su, ru, iu, ju in u:
    target = h * w * (scale[0] + (scale[1] - scale[0]) * su)
    aspect = np.exp(np.log(ratio[0]) + (np.log(ratio[1]) - np.log(ratio[0])) * ru)
    cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      return int(iu * (h - ch + 1)), int(ju * (w - cw + 1)), ch, cw
  if w / h < ratio[0]:
    cw, ch = w, int(round(w / ratio[0]))
  elif w / h > ratio[1]:
    ch, cw = h, int(round(h * ratio[1]))
  else:
    cw, ch = w, h
  return (h - ch) // 2, (w - cw) // 2, ch, cw


def test_random_resized_crop_window_matches_torchvision_restated():
  from afd_jax.data import augment
  rng = np.random.default_rng(0)
  sizes = [(375, 500), (500, 333), (40, 40), (8, 300), (300, 8)]
  for (h, w), trial in itertools.product(sizes, range(20)):
    u = rng.random((10, 4)).astype(np.float32)
    if trial == 0:
      u[:, 0] = 1.0 - 1e-6  # near full area: must fall back unless the aspect ratio fits
    ours = tuple(int(v) for v in augment.crop_window(h, w, tf.constant(u)))
    assert ours == np_crop_window(h, w, u.astype(np.float64)), (h, w, u)


def test_imagenet_eval_resizes_the_short_side_and_centre_crops():
  from afd_jax.data import augment
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (40, 60, 3)), tf.uint8)
  out = augment.resize_and_center_crop(image, 16)  # short side round(16 * 256 / 224) = 18
  resized = np.clip(np.round(tf.image.resize(image, [18, 27], antialias=True)), 0, 255)
  np.testing.assert_array_equal(out, resized[1:17, 6:22])  # top round(1), left round(5.5) = 6


def test_digits_and_fashion_mnist_build_offline(digits_dir, fashion_info):
  info = data.dataset_info(digits_config(digits_dir))
  assert (info.num_train, info.num_eval, info.image_shape, info.num_classes) == (
      1437, 360, (8, 8, 1), 10)
  from afd_jax.data import pipeline, sources
  images, _ = pipeline.load(sources.open_source(digits_config(digits_dir).dataset).records(
      'train'), lambda x: tf.io.decode_png(x))
  np.testing.assert_allclose([images.mean() / 255, (images / 255).std()],
                             [stats.DIGITS_MEAN[0], stats.DIGITS_STD[0]], atol=1e-4)
  config, info = fashion_info
  assert (info.num_train, info.num_eval, info.image_shape, info.num_classes) == (
      60000, 10000, (28, 28, 1), 10)
  from afd_jax.data.builders.fashion_mnist_local import load_split
  train_images, _ = load_split(FASHION_DIR, 'train')
  np.testing.assert_allclose([train_images.mean() / 255, (train_images / 255).std()],
                             [stats.FASHION_MNIST_MEAN[0], stats.FASHION_MNIST_STD[0]], atol=1e-4)
  config.dataset.augment, config.eval_batch_size = 'none', 1000
  batches = list(data.eval_iterator(config, info, process_index=0, process_count=1))
  labels = np.concatenate([b['label'] for b in batches])
  assert len(batches) == 10 and np.bincount(labels).tolist() == [1000] * 10
  test_images, test_labels = load_split(FASHION_DIR, 'test')
  ours = np.concatenate([b['image'] for b in batches]) * stats.FASHION_MNIST_STD[0]
  ours = np.round((ours + stats.FASHION_MNIST_MEAN[0]) * 255)
  for c in range(10):  # same images per class (TFDS stores them in another order)
    expected = test_images[test_labels == c].astype(np.float64).sum()
    assert ours[labels == c].astype(np.float64).sum() == expected
  config.dataset.train_subset = 1024  # keeps this test from decoding all 60,000
  check_batch(next(train(config, data.dataset_info(config))), config, info, 64)


def test_not_prepared_tfds_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(UserError) as e:
    data.dataset_info(make_config('cifar100', data_dir=str(tmp_path)))
  assert 'cifar100' in str(e.value) and str(tmp_path) in str(e.value)
  assert f'tfds build cifar100 --data_dir={tmp_path}' in str(e.value)
  with pytest.raises(UserError) as e:
    data.dataset_info(make_config('imagenet2012', data_dir=str(tmp_path)))
  assert f'{tmp_path}/downloads/manual/' in str(e.value)
  assert 'ILSVRC2012_img_train.tar' in str(e.value) and 'ILSVRC2012_img_val.tar' in str(e.value)


def test_bad_image_folders(tmp_path, image_folder):
  os.makedirs(tmp_path / 'empty' / 'train')
  os.makedirs(tmp_path / 'empty' / 'test')
  with pytest.raises(UserError, match='no class folders'):
    data.dataset_info(make_config('image_folder', folder=str(tmp_path / 'empty')))
  with pytest.raises(UserError, match='is not a directory'):
    data.dataset_info(make_config('image_folder', folder=str(tmp_path / 'missing')))
  bad = image_folder / 'test' / 'dog' / 'broken.jpg'
  bad.write_bytes(b'this is not an image')
  config = make_config('image_folder', folder=str(image_folder), augment='imagenet',
                       image_size=8)
  config.batch_size = 2
  with pytest.raises(UserError, match=f'cannot decode {bad}'):
    evaluate(config)


def test_user_errors_before_training(digits_dir):
  config = digits_config(digits_dir)
  info = data.dataset_info(config)
  config.batch_size = 2048
  with pytest.raises(UserError, match='fewer than one global batch'):
    data.dataset_info(config)
  config.batch_size = 64
  with pytest.raises(UserError, match='multiple of the 3 processes'):
    data.dataset_info(config, process_count=3)
  with pytest.raises(UserError, match='multiple of the 3 processes'):
    data.steps_per_epoch(config, info, 3)
  with pytest.raises(UserError, match='multiple of the 3 processes'):
    data.train_iterator(config, info, start_step=0, process_index=0, process_count=3)
  with pytest.raises(UserError, match='multiple of the 5 devices'):
    data.dataset_info(config, num_devices=5)
  with pytest.raises(UserError, match='need 1 values'):
    data.dataset_info(make_config('digits', data_dir=digits_dir))  # CIFAR's 3-channel mean
  with pytest.raises(UserError, match='Unknown dataset.name'):
    data.dataset_info(make_config('mnist'))
  with pytest.raises(UserError, match='Unknown split'):
    data.dataset_info(digits_config(digits_dir, eval_split='validation'))


def test_benchmark_runs():
  from afd_jax.data import bench
  result = bench.run(num_batches=5, warmup=1, num_examples=2048)
  assert result['median_images_per_s'] > 0
