"""Dense prediction's losses and metrics.

CWD equals the CWD authors' own code (irfanICMLL/TorchDistiller `CriterionCWD`) on the golden
vectors in tests/reference/method_cwd.npz: loss and gradient w.r.t. the student's logits within
`1e-4 * max|ref|`. Per-pixel CE (ignore index), per-pixel KD and the confusion matrix (ignore
index, padding, out-of-range labels) against NumPy counts and formulas; mIoU and pixel accuracy
from the matrix against a by-hand count.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import dense_metrics
from afd_jax.distill import dense
from tests.test_reference import assert_close

REFERENCE = pathlib.Path(__file__).resolve().parent / 'reference'


@pytest.mark.parametrize('case', ['t4', 't1'])
def test_cwd_matches_the_original_criterion(case):
  with np.load(REFERENCE / 'method_cwd.npz') as data:
    ref = {k[len(case) + 1:]: data[k] for k in data.files if k.startswith(case + '/')}
  student, teacher = jnp.asarray(ref['student_logits']), jnp.asarray(ref['teacher_logits'])
  temperature = float(ref['temperature'])
  loss, (grad_s, grad_t) = jax.value_and_grad(
      lambda s, t: dense.cwd_loss(s, t, temperature), argnums=(0, 1))(student, teacher)
  assert_close(loss, ref['loss'], f'{case}/loss')
  assert_close(grad_s, ref['grad_student_logits'], f'{case}/grad_student_logits')
  assert not np.any(np.asarray(grad_t))  # the teacher is a constant


def np_log_softmax(x, axis=-1):
  x = x - x.max(axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis, keepdims=True))


def test_pixel_cross_entropy_leaves_out_ignored_pixels():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  labels = rng.integers(0, 5, (2, 3, 4))
  labels[0, 0, :] = dense.IGNORE_INDEX
  labels[1, 2, 1] = dense.IGNORE_INDEX
  logp = np_log_softmax(logits.astype(np.float64))
  keep = labels != dense.IGNORE_INDEX
  expected = -np.mean(np.take_along_axis(logp, np.where(keep, labels, 0)[..., None], -1)[..., 0]
                      [keep])
  np.testing.assert_allclose(dense.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)),
                             expected, rtol=1e-5)
  everything_ignored = np.full_like(labels, dense.IGNORE_INDEX)
  assert float(dense.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(everything_ignored))) \
      == 0.0
  with pytest.raises(ValueError, match='do not match'):
    dense.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels[:, :2]))


def test_pixel_kd_is_the_tempered_kl_averaged_over_pixels():
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(2, 2, 3, 4, 6)) * np.array([1.5, 3.0])[:, None, None, None, None]
  temperature = 2.0
  log_ps, log_pt = np_log_softmax(s / temperature), np_log_softmax(t / temperature)
  expected = temperature ** 2 * np.mean(np.sum(np.exp(log_pt) * (log_pt - log_ps), -1))
  loss, grad_t = jax.value_and_grad(
      lambda t_: dense.pixel_kd_loss(jnp.asarray(s, jnp.float32), t_, temperature))(
          jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert not np.any(np.asarray(grad_t))
  with pytest.raises(ValueError, match='differ in shape'):
    dense.pixel_kd_loss(jnp.asarray(s), jnp.asarray(t[:, :, :2]))


def test_confusion_matrix_counts_like_numpy_and_skips_ignored_padded_and_unknown_labels():
  rng = np.random.default_rng(2)
  classes = 4
  labels = rng.integers(0, classes, (3, 5, 6))
  labels[0, :2] = dense.IGNORE_INDEX
  labels[1, 0, 0] = 7  # outside the classes: counted nowhere
  predictions = rng.integers(0, classes, labels.shape)
  mask = np.array([1, 1, 0])  # the third example is padding
  expected = np.zeros((classes, classes), np.int64)
  for b in range(2):
    for y, p in zip(labels[b].ravel(), predictions[b].ravel()):
      if y < classes:
        expected[y, p] += 1
  counts = jax.jit(dense_metrics.confusion_matrix, static_argnums=2)(
      jnp.asarray(predictions), jnp.asarray(labels), classes, mask=jnp.asarray(mask))
  assert counts.dtype == jnp.int32
  np.testing.assert_array_equal(counts, expected)
  assert int(counts.sum()) == 2 * 30 - 12 - 1


def test_miou_and_pixel_accuracy_from_the_confusion_matrix():
  confusion = np.array([[5, 1, 0, 0],   # class 0: tp 5, union 5 + 1 + 2 = 8
                        [2, 3, 0, 0],   # class 1: tp 3, union 5 + 4 - 3 = 6
                        [0, 0, 0, 0],   # class 2: in neither truth nor prediction: left out
                        [0, 0, 0, 4]])  # class 3: tp 4, union 4
  out = dense_metrics.from_confusion(confusion)
  assert out['class_iou'][2] is None
  np.testing.assert_allclose(out['class_iou'][:2] + out['class_iou'][3:],
                             [100 * 5 / 8, 100 * 3 / 6, 100.0])
  np.testing.assert_allclose(out['miou'], 100 * (5 / 8 + 3 / 6 + 1) / 3)
  np.testing.assert_allclose(out['pixel_accuracy'], 100 * 12 / 15)
  assert out['pixels'] == 15
