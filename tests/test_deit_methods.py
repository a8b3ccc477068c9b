"""`deit_hard` and `deit_soft` against facebookresearch/deit's own `DistillationLoss`.

tests/reference/method_deit.npz was written by tests/reference/make_method_vectors.py
(`method_vectors/deit.py`, losses.py at ae4dba9); its README says what it holds. Every array
within max |ours - reference| <= 1e-4 * max |reference|: the distillation term and its gradient,
and DeiT's total `(1 - alpha) CE + alpha distill` as afd_jax's objective computes it from the
methods' registered weights, with its gradients w.r.t. both heads. Plus the registrations (listed
everywhere methods are listed, the distillation-token flag, tau in the config) and refusals.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import bench, distill
from afd_jax.distill import registry
from afd_jax.distill.kd import cross_entropy
from configs import methods
from configs.base import get_base_config
from tests.test_reference import assert_close, run_once

DATA = np.load(pathlib.Path(__file__).resolve().parent / 'reference' / 'method_deit.npz')
CASES = {'hard': 'deit_hard', 'soft_t1': 'deit_soft', 'soft_t3': 'deit_soft'}


def case_arrays(case):
  return {k[len(case) + 1:]: DATA[k] for k in DATA.files if k.startswith(case + '/')}


def configured(method, tau):
  """The base config with `method`'s registered weights (configs/methods.py) and `tau`."""
  config = methods.set_method(get_base_config(), method)
  if method == 'deit_soft':
    config.deit_soft.tau = tau
  return config


@pytest.mark.parametrize('case', sorted(CASES))
def test_distillation_term_and_deit_total_match_the_original(case):
  data, method = case_arrays(case), CASES[case]
  config = configured(method, float(data['tau']))
  module = distill.create(method, config, (), ())  # a logit method: no taps at all
  teacher, labels = jnp.asarray(data['teacher_logits']), jnp.asarray(data['labels'])
  ce_weight, kd_weight = config.loss.ce_weight, config.loss.kd_weight
  feature_weight = config.loss.feature_weight

  def distillation(dist_logits):
    return module.apply({}, [], [], True, student_dist_logits=dist_logits, teacher_logits=teacher)

  def objective(cls_logits, dist_logits):  # the step's `ce_weight * CE + feature_weight * term`
    return ce_weight * cross_entropy(cls_logits, labels) + feature_weight * distillation(
        dist_logits)[0]

  outputs, outputs_kd = jnp.asarray(data['outputs']), jnp.asarray(data['outputs_kd'])
  (term, per_example), grad_term = run_once(jax.value_and_grad(distillation, has_aux=True),
                                            outputs_kd)
  total, (grad_cls, grad_kd) = run_once(jax.value_and_grad(objective, argnums=(0, 1)),
                                        outputs, outputs_kd)
  assert kd_weight == 0.0 and (ce_weight, feature_weight) == (1 - data['alpha'], data['alpha'])
  assert_close(term, data['distill_loss'], 'distill_loss')
  assert_close(jnp.mean(per_example), data['distill_loss'], 'per-example terms, mean')
  assert_close(grad_term, data['grad_distill_outputs_kd'], 'grad of distill_loss')
  assert_close(cross_entropy(outputs, labels), data['base_loss'], 'base_loss')
  assert_close(total, data['loss'], 'total')
  assert_close(grad_cls, data['grad_outputs'], 'grad class-token logits')
  assert_close(grad_kd, data['grad_outputs_kd'], 'grad distillation-token logits')


@pytest.mark.parametrize('method', ['deit_hard', 'deit_soft'])
def test_teacher_logits_are_constants(method):
  module = distill.create(method, configured(method, 3.0), (), ())
  student = jnp.asarray(DATA['soft_t3/outputs_kd'])
  term = lambda t: module.apply({}, [], [], True, student_dist_logits=student,
                                teacher_logits=t)[0]
  teacher = jnp.asarray(DATA['soft_t3/teacher_logits'])
  assert not np.any(np.asarray(jax.grad(term)(teacher)))
  # ... while the term does depend on the teacher (the gradient is not zero by accident).
  assert abs(float(term(jnp.asarray(DATA['hard/teacher_logits']))) - float(term(teacher))) > 1e-3


def test_registered_listed_and_flagged():
  for name in ('deit_hard', 'deit_soft'):
    assert name in registry.registered()
    assert name in bench.method_names() and name in methods.choices()
    method = registry.get(name)
    assert method.needs_distillation_token
    assert method.inputs == ('student_dist_logits', 'teacher_logits')
    assert (method.logit_weights, method.feature_weight) == ((0.5, 0.0), 0.5)
  others = [m for m in registry.registered() if not m.startswith('deit_')]
  assert others and not any(registry.get(m).needs_distillation_token for m in others)
  config = get_base_config()
  assert config.deit_soft.tau == 1.0 and 'deit_hard' not in config  # hard has no options
  assert bench.bench_config('deit_soft', 'resnet20', 'resnet8').loss.feature_weight == 0.5


def test_refusals():
  config = configured('deit_soft', 0.0)
  with pytest.raises(ValueError, match='deit_soft.tau must be positive'):
    distill.create('deit_soft', config, (), ())
  module = distill.create('deit_hard', configured('deit_hard', 1.0), (), ())
  teacher = jnp.zeros((8, 10))
  with pytest.raises(ValueError, match='of one shape, got'):
    module.apply({}, [], [], True, student_dist_logits=jnp.zeros((8, 5)), teacher_logits=teacher)
  with pytest.raises(ValueError, match='needs the logits of a distillation-token head'):
    module.apply({}, [], [], True, student_dist_logits=None, teacher_logits=teacher)
