"""PKT, RKD, CC, NST and VID against the CRD benchmark's own PyTorch modules (HobbitLong/
RepDistiller `distiller_zoo/`): loss, gradients w.r.t. the student's inputs and the method's own
parameters, every array within 1e-4 * max|ref|. The golden vectors are
`tests/reference/method_<name>.npz` (README.md there); torch is not needed here. Plus the
refusals, RKD on a degenerate batch, VID's initial variances and the registered defaults.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import distill
from afd_jax.distill.cc import CC
from afd_jax.distill.nst import NST
from afd_jax.distill.pkt import PKT
from afd_jax.distill.rkd import RKD
from afd_jax.distill.vid import VID, VIDPair
from tests.test_reference import assert_close

REFERENCE = pathlib.Path(__file__).resolve().parent / 'reference'


def load(name: str) -> dict:
  with np.load(REFERENCE / f'method_{name}.npz', allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def maps(ref: dict, prefix: str) -> list:
  count = sum(k.startswith(prefix + '/') for k in ref)
  return [jnp.asarray(ref[f'{prefix}/{k}']) for k in range(count)]


# ---------------------------------------------------------------------------------------------
# Embedding-based: PKT, RKD, CC

def embedding_loss(module, params):
  """`(params, s, t) -> ((loss, aux), grads w.r.t. (params, s, t))` as NumPy arrays, one jit."""
  def loss(params, s, t):
    return module.apply({'params': params}, (), (), train=True,
                        student_embedding=s, teacher_embedding=t)
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  return lambda *args: jax.device_get(fn(*args))


@pytest.mark.parametrize('name, module', [('pkt', PKT()), ('rkd', RKD())])
def test_parameter_free_embedding_methods_match_repdistiller(name, module):
  ref = load(name)
  s, t = jnp.asarray(ref['student_embedding']), jnp.asarray(ref['teacher_embedding'])
  (loss, aux), (_, grad_s, grad_t) = embedding_loss(module, {})({}, s, t)
  assert_close(loss, ref['loss'], f'{name} loss')
  assert_close(grad_s, ref['grad_student_embedding'], f'{name} d loss / d student embedding')
  assert np.abs(grad_t).max() == 0.0  # the teacher is a constant
  if name == 'rkd':
    distance, angle = aux
    assert_close(distance, ref['loss_distance'], 'rkd distance term')
    assert_close(angle, ref['loss_angle'], 'rkd angle term')


def test_cc_matches_repdistiller_with_its_linear_heads():
  ref = load('cc')
  s, t = jnp.asarray(ref['student_embedding']), jnp.asarray(ref['teacher_embedding'])
  module = CC(feat_dim=int(ref['feat_dim']))
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), (), (), train=False,
                                              student_embedding=s, teacher_embedding=t))
  params = {head: {'kernel': jnp.asarray(ref[f'sd/{head}.linear.weight'].T),
                   'bias': jnp.asarray(ref[f'sd/{head}.linear.bias'])}
            for head in ('embed_s', 'embed_t')}
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(lambda x: x.shape,
                                                         shapes['params'])
  (loss, _), (grad_p, grad_s, _) = embedding_loss(module, params)(params, s, t)
  assert_close(loss, ref['loss'], 'cc loss')
  assert_close(grad_s, ref['grad_student_embedding'], 'cc d loss / d student embedding')
  for head in ('embed_s', 'embed_t'):  # both heads learn, as in the benchmark
    assert_close(grad_p[head]['kernel'].T, ref[f'grad_sd/{head}.linear.weight'],
                 f'cc d loss / d {head}.linear.weight')
    assert_close(grad_p[head]['bias'], ref[f'grad_sd/{head}.linear.bias'],
                 f'cc d loss / d {head}.linear.bias')


@pytest.mark.parametrize('module', [RKD(), CC(feat_dim=3)])
def test_batch_relations_refuse_a_single_example(module):
  one = np.ones((1, 4))
  with pytest.raises(ValueError, match='at least 2'):
    module.init(jax.random.PRNGKey(0), (), (), train=False, student_embedding=one,
                teacher_embedding=one)


def test_embedding_methods_refuse_mismatched_embeddings():
  with pytest.raises(ValueError, match='different batch sizes'):
    PKT().apply({}, (), (), train=True, student_embedding=np.ones((4, 3)),
                teacher_embedding=np.ones((5, 3)))
  with pytest.raises(ValueError, match='must be B x D'):
    PKT().apply({}, (), (), train=True, student_embedding=np.ones((4, 3, 1)),
                teacher_embedding=np.ones((4, 3)))


def test_rkd_degenerate_batch_stays_finite():
  """All student embeddings equal: the original divides 0 by 0 (NaN); here the distances stay
  unscaled and the loss and its gradient are finite."""
  s, t = np.ones((4, 3)), np.arange(12.0).reshape(4, 3) ** 1.5
  (loss, _), grads = embedding_loss(RKD(), {})({}, s, t)
  assert np.isfinite(float(loss)) and all(np.isfinite(np.asarray(g)).all()
                                          for g in jax.tree.leaves(grads))


# ---------------------------------------------------------------------------------------------
# Stage-output methods: NST, VID

def map_loss(module):
  def loss(params, student, teacher):
    out, per_pair = module.apply({'params': params}, student, teacher, train=True)
    return out, per_pair
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  return lambda *args: jax.device_get(fn(*args))


def test_nst_matches_repdistiller():
  ref = load('nst')
  student, teacher = maps(ref, 'student'), maps(ref, 'teacher')
  (loss, per_pair), (_, grad_s) = map_loss(NST())({}, student, teacher)
  assert_close(loss, ref['loss'], 'nst loss')
  assert_close(per_pair, ref['per_pair'], 'nst per pair')
  for k, g in enumerate(grad_s):
    assert_close(g, ref[f'grad_student/{k}'], f'nst d loss / d student map {k}')


def vid_params(ref: dict, pairs: int) -> dict:
  """PyTorch's `{k}.regressor.{0,2,4}.weight` (OIHW) and `{k}.log_scale` -> our layout."""
  return {f'pair{k}': {
      **{f'conv{j + 1}': {'kernel': jnp.asarray(
          ref[f'sd/{k}.regressor.{2 * j}.weight'].transpose(2, 3, 1, 0))} for j in range(3)},
      'log_scale': jnp.asarray(ref[f'sd/{k}.log_scale'])} for k in range(pairs)}


def test_vid_matches_repdistiller():
  ref = load('vid')
  student, teacher = maps(ref, 'student'), maps(ref, 'teacher')
  module = VID()
  params = vid_params(ref, len(student))
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), student, teacher,
                                              train=False))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(lambda x: x.shape, shapes['params'])
  (loss, per_pair), (grad_p, grad_s) = map_loss(module)(params, student, teacher)
  assert_close(loss, ref['loss'], 'vid loss')
  assert_close(per_pair, ref['per_pair'], 'vid per pair')
  for k, g in enumerate(grad_s):
    assert_close(g, ref[f'grad_student/{k}'], f'vid d loss / d student map {k}')
  for k in range(len(student)):
    for j in range(3):
      assert_close(grad_p[f'pair{k}'][f'conv{j + 1}']['kernel'].transpose(3, 2, 0, 1),
                   ref[f'grad_sd/{k}.regressor.{2 * j}.weight'],
                   f'vid d loss / d {k}.regressor.{2 * j}.weight')
    assert_close(grad_p[f'pair{k}']['log_scale'], ref[f'grad_sd/{k}.log_scale'],
                 f'vid d loss / d {k}.log_scale')


def test_vid_variances_start_at_the_original_value():
  f_s, f_t = np.ones((2, 3, 3, 4)), np.ones((2, 3, 3, 5))
  params = jax.device_get(jax.jit(VIDPair().init)(jax.random.PRNGKey(0), f_s, f_t)['params'])
  var = np.log1p(np.exp(params['log_scale'].astype(np.float64))) + 1e-5  # the original's
  np.testing.assert_allclose(var, 5.0, rtol=1e-6)
  # PyTorch's default Conv2d init, U(+-1/sqrt(fan_in)): bounded by 1/2 for 4 inputs.
  assert np.abs(params['conv1']['kernel']).max() <= 0.5


# ---------------------------------------------------------------------------------------------
# Registrations: the benchmark's weights and inputs

@pytest.mark.parametrize('name, weight, inputs', [
    ('pkt', 30000.0, ('student_embedding', 'teacher_embedding')),
    ('rkd', 1.0, ('student_embedding', 'teacher_embedding')),
    ('cc', 0.02, ('student_embedding', 'teacher_embedding')),
    ('nst', 50.0, ()),
    ('vid', 1.0, ())])
def test_registered_with_the_benchmark_defaults(name, weight, inputs):
  method = distill.registry.get(name)
  assert method.feature_weight == weight
  assert method.logit_weights == (1.0, 0.0)
  assert method.inputs == inputs
  assert 'run_cifar_distill.sh' in method.source
