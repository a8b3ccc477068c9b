"""Parity with arrays computed by the official PyTorch code (../shared/reference).

Tolerance per array: max |ours - reference| <= 1e-4 * max |reference| (float32).

Some gradients are identically zero in exact arithmetic, and the reference holds only float32
rounding residue for them (about 1e-10 against gradients of about 1e-5): the bias of every
Linear that feeds a training-mode BatchNorm (BN subtracts the batch mean, so a constant shift
has no effect), and the bilinear BN's bias (it shifts every logit of a softmax row by the
same amount). Their own maximum is noise, so for them the tolerance is 1e-4 times the largest
reference gradient of the meta-network; separately we check in float64 that ours is zero.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import models
from afd_jax.distill import AFD
from afd_jax.interop import torch as torch_interop

AFD_FILE = 'afd_wrn40x2_wrn16x2.npz'


def assert_close(ours, ref, name, scale=None):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, f'{name}: shape {ours.shape} vs {ref.shape}'
  scale = np.abs(ref).max() if scale is None else scale
  err = np.abs(ours - ref).max()
  assert err <= 1e-4 * scale, f'{name}: max|ours - ref| = {err:.3g} > 1e-4 * {scale:.3g}'


def identically_zero(torch_name: str) -> bool:
  return torch_name.endswith('linear.bias') or torch_name.endswith('bilinear.bn.bias')


def load_afd_case(reference_dir):
  data = np.load(reference_dir / AFD_FILE)
  count = lambda prefix: len([k for k in data.files if k.startswith(prefix)])
  teacher = [jnp.asarray(data[f'teacher/{n}']) for n in range(count('teacher/'))]
  student = [jnp.asarray(data[f'student/{m}']) for m in range(count('student/'))]
  state_dict = {k[len('sd/'):]: data[k] for k in data.files if k.startswith('sd/')}
  return data, student, teacher, state_dict


def afd_step(variables, student, teacher, qk_dim):
  """Loss, attention, per-layer terms, batch-stat updates and gradients of one train step."""
  module = AFD(qk_dim)

  def loss_fn(params, student):
    (loss, attention), updates = module.apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, student, teacher,
        train=True, mutable=['batch_stats', 'intermediates'])
    return loss, (attention, updates)

  (loss, (attention, updates)), grads = jax.jit(jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True))(variables['params'], student)
  return loss, attention, updates, grads


def torch_named(tree, collection):
  """{torch state_dict name: array (PyTorch layout)} for an AFD variable collection."""
  return torch_interop.to_state_dict('afd', {collection: tree})


@pytest.fixture(scope='module')
def afd_case(reference_dir):
  data, student, teacher, state_dict = load_afd_case(reference_dir)
  variables = torch_interop.convert('afd', state_dict)
  return data, student, teacher, variables, afd_step(variables, student, teacher,
                                                     int(data['qk_dim']))


def test_afd_loss_attention_and_per_layer_terms(afd_case):
  data, _, _, _, (loss, attention, updates, _) = afd_case
  assert_close(loss, data['loss'], 'loss')
  assert_close(updates['intermediates']['per_teacher_layer'][0], data['per_teacher_layer'],
               'per_teacher_layer')
  assert_close(attention, data['attention'], 'attention')


def test_afd_gradients_wrt_student_features(afd_case):
  data, student, _, _, (_, _, _, (_, grad_student)) = afd_case
  for m in range(len(student)):
    assert_close(grad_student[m], data[f'grad_student/{m}'], f'grad_student/{m}')


def test_afd_gradients_wrt_every_meta_network_parameter(afd_case):
  data, _, _, _, (_, _, _, (grad_params, _)) = afd_case
  ours = torch_named(grad_params, 'params')
  refs = {k[len('grad_sd/'):]: data[k] for k in data.files if k.startswith('grad_sd/')}
  assert set(ours) == set(refs)
  global_scale = max(np.abs(v).max() for v in refs.values())
  for name, ref in refs.items():
    assert_close(ours[name], ref, f'grad {name}',
                 scale=global_scale if identically_zero(name) else None)


def test_identically_zero_gradients_are_zero_in_float64(reference_dir):
  data, student, teacher, state_dict = load_afd_case(reference_dir)
  with jax.enable_x64(True):
    variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64),
                             torch_interop.convert('afd', state_dict))
    student = [jnp.asarray(f, jnp.float64) for f in student]
    teacher = [jnp.asarray(f, jnp.float64) for f in teacher]
    *_, (grad_params, _) = afd_step(variables, student, teacher, int(data['qk_dim']))
    grads = torch_named(grad_params, 'params')
  scale = max(np.abs(v).max() for v in grads.values())
  zeros = {k: v for k, v in grads.items() if identically_zero(k)}
  assert len(zeros) == 6 + 18 + 2  # key and query Linear biases, bilinear Linear and BN bias
  for name, value in zeros.items():
    assert np.abs(value).max() <= 1e-10 * scale, name


def test_afd_batch_norm_running_statistics_after_the_step(afd_case):
  data, _, _, _, (_, _, updates, _) = afd_case
  ours = torch_named(updates['batch_stats'], 'batch_stats')
  refs = {k[len('sd_after/'):]: data[k] for k in data.files if k.startswith('sd_after/')}
  assert refs and set(refs) <= set(ours)
  for name, ref in refs.items():
    assert_close(ours[name], ref, f'running {name}')


@pytest.mark.parametrize('name', ['wrn16x2', 'resnet20'])
def test_model_logits_and_every_tap_after_import(reference_dir, name):
  data = np.load(reference_dir / f'model_{name}.npz')
  state_dict = {k[len('sd/'):]: data[k] for k in data.files if k.startswith('sd/')}
  variables = torch_interop.convert(name, state_dict)
  model = models.create(name, data['logits'].shape[-1])
  logits, features = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, jnp.asarray(data['input']))
  assert_close(logits, data['logits'], f'{name} logits')
  taps = sorted(int(k.split('/')[1]) for k in data.files if k.startswith('feature/'))
  assert len(features) == len(taps) == len(model.taps())
  for k in taps:
    assert_close(features[k], data[f'feature/{k}'], f'{name} feature/{k}')
