"""Segmentation end to end: a teacher with an FPN head trained on a folder of images and masks
written here, then CWD from it on 8 devices; every method that distils segmentation traces a
train step on per-pixel logits (and its own stage, where it has one). The teacher run's eval
mIoU equals a NumPy confusion count over the model's own predictions on every eval image
(padding of the last batch and the ignore index included); the CWD run reads the teacher back
(its eval there equals its own run's) and draws its predictions. (The best checkpoint by mIoU:
tests/test_checkpoint.py.) Refusals: models without a head on masks, a head on class labels, a
classification-only method on masks, CWD on class labels, mixing and several teachers on
masks, and an image without a mask from the CLI (one line naming the file)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import models, step, train
from afd_jax.distill import registry
from afd_jax import task as task_lib
from afd_jax.data.tfimport import tf
from afd_jax.pixels import IGNORE_INDEX
from configs import segmentation
from tests import runs

SIZE, CLASSES, TRAIN, EVAL = 16, 3, 32, 10


def scene(rng):
  """A 16x16 RGB image whose colour says the class (0 dark, 1 red, 2 green) and its mask;
  one corner ignored."""
  mask = np.zeros((SIZE, SIZE), np.uint8)
  for label in (1, 2):
    top, left = rng.integers(0, SIZE - 6, 2)
    mask[top:top + 6, left:left + 6] = label
  image = rng.integers(0, 60, (SIZE, SIZE, 3)).astype(np.uint8)
  image[..., 0][mask == 1] += 150
  image[..., 1][mask == 2] += 150
  mask[:2, :2] = IGNORE_INDEX
  return image, mask


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('masks')
  rng = np.random.default_rng(0)
  for split, count in (('train', TRAIN), ('test', EVAL)):
    for i in range(count):
      image, mask = scene(rng)
      for kind, array in (('images', image), ('masks', mask[..., None])):
        path = root / split / kind / f'{i:03d}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tf.io.encode_png(array).numpy())
  return str(root)


def config_for(folder, method, teacher_dir=''):
  c = segmentation.get_config(f'data=folder,method={method}')
  c.dataset.folder, c.dataset.num_classes, c.dataset.image_size = folder, CLASSES, SIZE
  c.dataset.scale = (0.75, 1.25)
  c.teacher.name, c.student.name = 'resnet8', 'resnet8'
  c.teacher.head_width = c.student.head_width = 8
  c.teacher.checkpoint = teacher_dir
  c.afd.qk_dim = 8
  c.batch_size, c.eval_batch_size, c.num_epochs = 8, 8, 3  # 10 eval images: one padded batch
  c.optimizer.learning_rate = 0.05
  c.log_every_steps, c.plot_attention, c.keep_checkpoints = 4, False, 1
  c.eval_every_epochs, c.plot_predictions = 3, method == 'cwd'  # the last epoch's eval only
  return c


def numpy_miou(folder, workdir, config):
  """mIoU (%) of `workdir`'s latest student on every eval image, counted with NumPy."""
  variables, _ = train.weights.restore_raw_variables(workdir)
  model = models.from_config(config.student, CLASSES)
  confusion = np.zeros((CLASSES, CLASSES), np.int64)
  mean, std = np.asarray(config.dataset.mean), np.asarray(config.dataset.std)
  for i in range(EVAL):
    read = lambda kind: tf.io.decode_png(tf.io.read_file(
        os.path.join(folder, 'test', kind, f'{i:03d}.png'))).numpy()
    image = (read('images')[None] / 255.0 - mean) / std
    logits, _ = model.apply(variables, image.astype(np.float32), train=False)
    truth, predicted = read('masks')[..., 0].ravel(), np.argmax(logits[0], -1).ravel()
    for y, p in zip(truth, predicted):
      if y != IGNORE_INDEX:
        confusion[y, p] += 1
  union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
  return 100 * np.mean([np.diag(confusion)[c] / union[c] for c in range(CLASSES) if union[c]])


def test_teacher_then_distilled_students_report_miou(folder, tmp_path):
  teacher_dir = str(tmp_path / 'teacher')
  config = config_for(folder, 'teacher')
  out = train.train_and_evaluate(config, teacher_dir)
  assert out['status'] == 'finished'
  ev = out['eval']
  assert set(ev) >= {'miou', 'pixel_accuracy', 'loss', 'class_iou'} and 'top1' not in ev
  assert ev['count'] == EVAL and len(ev['class_iou']) == CLASSES
  np.testing.assert_allclose(ev['miou'], numpy_miou(folder, teacher_dir, config), atol=1e-9)
  # The colours say the classes: it learns in 12 steps (all background would score about 24).
  assert ev['miou'] > 40.0

  student = config_for(folder, 'cwd', teacher_dir)
  student.num_train_steps = 2
  got = train.train_and_evaluate(student, str(tmp_path / 'cwd'))
  np.testing.assert_allclose(got['teacher_eval']['miou'], ev['miou'], atol=1e-9)
  assert np.isfinite(got['train']['cwd']) and got['train']['cwd'] > 0, got['train']
  assert (tmp_path / 'cwd' / 'predictions.png').stat().st_size > 0  # image, truth, both models


@pytest.mark.parametrize('method', registry.for_task('segmentation') + ('kd',))
def test_every_segmentation_method_makes_a_train_step(method):
  """The step's shapes, traced without compiling: each method's term is in the metrics."""
  c = config_for('', 'none' if method == 'kd' else method)
  if method == 'kd':
    c.loss.kd_weight = 1.0
  task = task_lib.task_from_config(c, CLASSES, 4, image_shape=(SIZE, SIZE, 3), dense=True)
  images = jax.ShapeDtypeStruct((8, SIZE, SIZE, 3), jnp.float32)
  teacher = jax.eval_shape(lambda x: task.teacher.init(jax.random.PRNGKey(0), x, train=False),
                           images) if task.teacher is not None else None
  state = step.abstract_state(task, (SIZE, SIZE, 3), teacher)
  batch = {'image': images, 'label': jax.ShapeDtypeStruct((8, SIZE, SIZE), jnp.int32)}
  _, metrics = jax.eval_shape(step.make_train_step(task), state, teacher, batch)
  expected = {'none': set(), 'kd': {'kd'}}.get(method, {method} if task.feature_weight else set())
  assert expected <= set(metrics) and metrics['pixel_accuracy'].shape == ()
  if task.pretrain is not None:  # AB, FT, FSP: their own stage, the student's body a Segmenter's
    if 'student_body' in task.pretrain.trains:  # the body: all but the per-pixel classifier
      assert task.pretrain.classifier == ('classifier',)
    _, metrics = jax.eval_shape(step.make_pretrain_step(task), state, teacher, batch)
    assert metrics['pretrain'].shape == ()
  assert expected or method in ('none', 'ab', 'fsp')  # weight 0 in the main stage: their stage


def fields(dataset_name='mask_folder', **sections):
  config = segmentation.get_config('data=folder,method=cwd')
  config.dataset.name = dataset_name
  for key, value in sections.items():
    if '__' not in key:
      config[key] = value
      continue
    section, leaf = key.split('__')
    setattr(getattr(config, section), leaf, value)
  return config


@pytest.mark.parametrize('change, dense, message', [
    ({'student__head': ''}, True, r'student \(resnet18im\) needs a segmentation head'),
    ({'teacher__head': ''}, True, r'teacher \(resnet50im\) needs a segmentation head'),
    ({}, False, r"the student has head='fpn' \(per-pixel logits\), but the data are class labels"),
    ({'student__head': '', 'teacher__head': ''}, False,
     r"method 'cwd' distils segmentation only.*methods for classification: none, afd"),
    ({'mixup__mixup_alpha': 0.8}, True, 'mixup, cutmix and label smoothing act on class labels'),
    ({'method': 'afd', 'teachers': [{'name': 'resnet8', 'head': 'fpn'}] * 2}, True,
     r'several teachers \(config.teachers\) distil classification only'),
])
def test_models_and_methods_that_do_not_fit_the_data_are_refused(change, dense, message):
  with pytest.raises(ValueError, match=message):
    task_lib.check_task(fields(**change), dense)


def test_a_classification_method_on_masks_is_refused():
  config = fields()
  config.method = 'dkd'
  with pytest.raises(ValueError, match=r"'dkd' distils classification only.*segmentation: "
                                       r'none, afd, at'):
    task_lib.check_task(config, True)


def test_an_image_without_a_mask_is_refused_in_one_line(folder, tmp_path):
  root = tmp_path / 'folder'
  os.makedirs(root / 'train' / 'images')
  os.makedirs(root / 'train' / 'masks')
  (root / 'train' / 'images' / 'lonely.png').write_bytes(
      tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)).numpy())
  result = runs.cli_in_process([
      f'--config={runs.REPO}/configs/segmentation.py:data=folder,method=teacher',
      f'--config.dataset.folder={root}', '--config.dataset.num_classes=3'],
      str(tmp_path / 'run'))
  assert result.returncode != 0
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and 'lonely.png has no mask' in lines[0], result.stderr
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')

