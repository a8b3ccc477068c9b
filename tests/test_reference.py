"""Parity with golden vectors computed by the official PyTorch code (tests/reference/*.npz).

tests/reference/README.md says what each file holds and how make_vectors.py wrote it. Weights,
feature maps and images are redrawn from the files' seeds by tests/reference/weights.py.

Tolerance per array: max |ours - reference| <= 1e-4 * max |reference| (float32).

Some gradients are identically zero in exact arithmetic, and the reference holds only float32
rounding residue for them (about 1e-10 against gradients of about 1e-5): the bias of every
Linear that feeds a training-mode BatchNorm (BN subtracts the batch mean, so a constant shift
has no effect), and the bilinear BN's bias (it shifts every logit of a softmax row by the
same amount). Their own maximum is noise, so for them the tolerance is 1e-4 times the largest
reference gradient of the meta-network; separately we check in float64 that ours is zero.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import models
from afd_jax.distill import AFD
from afd_jax.interop import torch as torch_interop
from tests.reference import weights

REFERENCE = pathlib.Path(__file__).resolve().parent / 'reference'
AFD_FILES = ['afd_wrn40x2_wrn16x2', 'afd_resnet110_resnet20']
MODEL_FILES = ['model_wrn16x2', 'model_resnet20', 'model_resnet110', 'model_resnet8x4',
               'model_resnet18', 'model_resnet50im', 'model_vgg8']


def assert_close(ours, ref, name, scale=None):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, f'{name}: shape {ours.shape} vs {ref.shape}'
  scale = np.abs(ref).max() if scale is None else scale
  err = np.abs(ours - ref).max()
  assert err <= 1e-4 * scale, f'{name}: max|ours - ref| = {err:.3g} > 1e-4 * {scale:.3g}'


def identically_zero(torch_name: str) -> bool:
  return torch_name.endswith('linear.bias') or torch_name.endswith('bilinear.bn.bias')


def prefixed(data, prefix):
  return {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}


def state_dict(data):
  """The official module's state_dict, redrawn from the file's seed, names and shapes."""
  shapes = [s[s >= 0] for s in data['shapes']]
  return weights.state_dict(int(data['seed']), [str(k) for k in data['keys']], shapes,
                            float(data['gain']))


def load_afd(stem):
  """(reference arrays, student features, teacher features, state_dict, qk_dim)."""
  data = np.load(REFERENCE / f'{stem}.npz')
  student = weights.features(int(data['student_seed']), data['student_shapes'])
  teacher = weights.features(int(data['teacher_seed']), data['teacher_shapes'])
  return data, student, teacher, state_dict(data), int(data['qk_dim'])


def load_model(stem):
  """(reference arrays, model name, state_dict, images)."""
  data = np.load(REFERENCE / f'{stem}.npz')
  images = weights.images(int(data['input_seed']), data['input_shape'])
  return data, str(data['name']), state_dict(data), images


def run_once(fn, *args):
  """`jax.jit(fn)(*args)`. Each program here runs once and compiling it is most of this file's
  time: on CPU, XLA's cheapest settings compile about four times faster than its defaults."""
  cheap = {'xla_backend_optimization_level': 0, 'xla_cpu_use_fusion_emitters': False}
  lowered = jax.jit(fn).lower(*args)
  return (lowered.compile(cheap) if jax.default_backend() == 'cpu' else lowered.compile())(*args)


def afd_step(variables, student, teacher, qk_dim):
  """Loss, attention, per-layer terms, batch-stat updates and gradients of one train step."""
  module = AFD(qk_dim)
  teacher = [jnp.asarray(f) for f in teacher]

  def loss_fn(params, student):
    (loss, attention), updates = module.apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, student, teacher,
        train=True, mutable=['batch_stats', 'intermediates'])
    return loss, (attention, updates)

  (loss, (attention, updates)), grads = run_once(
      jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True), variables['params'],
      [jnp.asarray(f) for f in student])
  return loss, attention, updates, grads


def torch_named(tree, collection):
  """{torch state_dict name: array (PyTorch layout)} for an AFD variable collection."""
  return torch_interop.to_state_dict('afd', {collection: tree})


@pytest.fixture(scope='module', params=AFD_FILES)
def afd_case(request):
  data, student, teacher, sd, qk_dim = load_afd(request.param)
  variables = torch_interop.convert('afd', sd)
  return data, afd_step(variables, student, teacher, qk_dim)


def test_afd_loss_attention_and_per_layer_terms(afd_case):
  data, (loss, attention, updates, _) = afd_case
  assert_close(loss, data['loss'], 'loss')
  assert_close(updates['intermediates']['per_teacher_layer'][0], data['per_teacher_layer'],
               'per_teacher_layer')
  assert_close(attention, data['attention'], 'attention')


def test_afd_gradients_wrt_student_features(afd_case):
  data, (_, _, _, (_, grad_student)) = afd_case
  refs = prefixed(data, 'grad_student/')
  assert len(grad_student) == len(refs)
  for m, ours in enumerate(grad_student):
    assert_close(ours, refs[str(m)], f'grad_student/{m}')


def test_afd_gradients_wrt_every_meta_network_parameter(afd_case):
  data, (_, _, _, (grad_params, _)) = afd_case
  ours = torch_named(grad_params, 'params')
  refs = prefixed(data, 'grad_sd/')
  assert set(ours) == set(refs)
  global_scale = max(np.abs(v).max() for v in refs.values())
  for name, ref in refs.items():
    assert_close(ours[name], ref, f'grad {name}',
                 scale=global_scale if identically_zero(name) else None)


def test_identically_zero_gradients_are_zero_in_float64():
  """On one pair: the property is structural, and a float64 program is one more compile."""
  _, student, teacher, sd, qk_dim = load_afd(AFD_FILES[0])
  with jax.enable_x64(True):
    variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64),
                             torch_interop.convert('afd', sd))
    student = [jnp.asarray(f, jnp.float64) for f in student]
    teacher = [jnp.asarray(f, jnp.float64) for f in teacher]
    *_, (grad_params, _) = afd_step(variables, student, teacher, qk_dim)
    grads = torch_named(grad_params, 'params')
  scale = max(np.abs(v).max() for v in grads.values())
  zeros = {k: v for k, v in grads.items() if identically_zero(k)}
  # key and query Linear biases, bilinear Linear and BN bias
  assert len(zeros) == len(student) + len(teacher) + 2
  for name, value in zeros.items():
    assert np.abs(value).max() <= 1e-10 * scale, name


def test_afd_batch_norm_running_statistics_after_the_step(afd_case):
  data, (_, _, updates, _) = afd_case
  ours = torch_named(updates['batch_stats'], 'batch_stats')
  refs = prefixed(data, 'sd_after/')
  assert set(refs) == set(ours)  # every running statistic
  for name, ref in refs.items():
    assert_close(ours[name], ref, f'running {name}')


@pytest.mark.parametrize('stem', MODEL_FILES)
def test_model_logits_and_every_tap_after_import(stem):
  data, name, sd, images = load_model(stem)
  variables = torch_interop.convert(name, sd)
  assert set(torch_interop.to_state_dict(name, variables)) == set(sd)  # the official names
  model = models.create(name, int(data['num_classes']))
  logits, features = run_once(lambda v, x: model.apply(v, x, train=False), variables,
                              jnp.asarray(images))
  assert_close(logits, data['logits'], f'{name} logits')
  refs = prefixed(data, 'feature/')
  assert len(features) == len(refs) == len(model.taps())
  for k, ours in enumerate(features):
    assert_close(ours, refs[str(k)], f'{name} feature/{k}')
