"""FitNet, AT, SP and KD against the CRD benchmark's own PyTorch code (HobbitLong/RepDistiller
`distiller_zoo/{FitNet,AT,SP,KD}.py` and `models/util.py`'s `ConvReg`).

What it proves: given the original's inputs and, for FitNet, ConvReg's initial weights, afd_jax's
modules give the original's loss, gradients w.r.t. the student's maps or logits and FitNet's
regressor parameters, and batch-norm running statistics after one train-mode step, every array
within `1e-4 * max|ref|`; for each convolution ConvReg builds (same size, a student twice the
teacher's size, half its size, larger otherwise), so FitNet's regressor is ConvReg's. FitNet's
regressor has no conv bias (afd_jax/distill/fitnet.py says why): the test shows in float64 that
the bias changes neither the loss nor any gradient and gets no gradient itself, and that the
running mean is the original's less the bias's share. The golden vectors are
`tests/reference/method_{fitnet,at,sp,kd}.npz` (README.md there); torch is not needed here.
"""
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax.distill.at import AT
from afd_jax.distill.fitnet import FitNet
from afd_jax.distill.kd import kd_loss
from afd_jax.distill.sp import SP
from tests.test_parity_pretrain_methods import conv_in, conv_out, convt_in, convt_out
from tests.test_reference import assert_close

REFERENCE = pathlib.Path(__file__).resolve().parent / 'reference'
FITNET_CASES = ('same', 'stride', 'transpose', 'valid')
MOMENTUM = 0.1  # PyTorch's BatchNorm2d default, ConvReg's batch norm


def load(name: str, prefix: str = '') -> dict:
  """The arrays of `method_<name>.npz` whose key starts with `prefix`, the prefix removed."""
  with np.load(REFERENCE / f'method_{name}.npz', allow_pickle=False) as data:
    return {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}


def maps(ref: dict, prefix: str) -> list:
  count = sum(k.startswith(prefix + '/') for k in ref)
  return [jnp.asarray(ref[f'{prefix}/{k}']) for k in range(count)]


# ---------------------------------------------------------------------------------------------
# PyTorch weight layouts -> ours, and our gradients back to PyTorch's.
# Conv2d: torch `O x I x kh x kw`, ours HWIO. ConvTranspose2d: torch `I x O x K x K`; ours is the
# equivalent stride-1 convolution over the input dilated by the stride (fitnet.conv_reg), whose
# kernel is torch's rotated by 180 degrees, input and output channels in torch's order:
# ours[h, w, i, o] = torch[i, o, K-1-h, K-1-w] (conv_in, conv_out, convt_in, convt_out).


# ---------------------------------------------------------------------------------------------
# FitNet

def fitnet_case(case: str):
  """The case's arrays, our variables from ConvReg's initial state, and the layout converter."""
  ref = load('fitnet', case + '/')
  transposed = 2 * ref['student'].shape[1] == ref['teacher'].shape[1]  # ConvReg: 2 s_H = t_H
  to_ours, to_torch = (convt_in, convt_out) if transposed else (conv_in, conv_out)
  variables = {
      'params': {'conv': {'kernel': to_ours(ref['init/conv.weight'])},
                 'bn': {'scale': ref['init/bn.weight'], 'bias': ref['init/bn.bias']}},
      'batch_stats': {'bn': {'mean': ref['init/bn.running_mean'],
                             'var': ref['init/bn.running_var']}}}
  variables = jax.tree.map(lambda x: jnp.asarray(np.ascontiguousarray(x)), variables)
  return ref, variables, to_torch


def conv_output_plus(shift):
  """An interceptor adding `shift` to the output of every `nn.Conv`: ConvReg's conv bias."""
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Conv) and context.method_name == '__call__':
      out = out + shift
    return out
  return interceptor


def fitnet_step(variables, s, t, bias=None):
  """One train-mode step: `(loss, running stats), (d params, d student map, d bias)`."""
  def loss_fn(params, s, bias):
    with nn.intercept_methods(conv_output_plus(bias)):
      (loss, _), updates = FitNet(0, 0).apply(
          {'params': params, 'batch_stats': variables['batch_stats']}, [s], [t], train=True,
          mutable=['batch_stats'])
    return loss, updates['batch_stats']
  bias = jnp.zeros(t.shape[-1], s.dtype) if bias is None else bias
  grad = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)
  return jax.device_get(grad(variables['params'], s, bias))


@pytest.mark.parametrize('case', FITNET_CASES)
def test_fitnet_matches_repdistiller_convreg(case):
  ref, variables, to_torch = fitnet_case(case)
  s, t = jnp.asarray(ref['student']), jnp.asarray(ref['teacher'])
  abstract = jax.eval_shape(lambda: FitNet(0, 0).init(jax.random.PRNGKey(0), [s], [t],
                                                      train=False))
  # ConvReg's convolution for these sizes: the same parameters, kernel shapes included.
  assert (jax.tree.map(jnp.shape, variables) ==
          jax.tree.map(lambda x: x.shape, dict(abstract)))
  (loss, stats), (grad_p, grad_s, _) = fitnet_step(variables, s, t)
  assert_close(loss, ref['loss'], f'{case} loss')
  assert_close(grad_s, ref['grad_student'], f'{case} d loss / d student map')
  ours = {'conv.weight': to_torch(grad_p['conv']['kernel']), 'bn.weight': grad_p['bn']['scale'],
          'bn.bias': grad_p['bn']['bias']}
  for name, value in ours.items():
    assert_close(value, ref[f'grad_sd/{name}'], f'{case} d loss / d {name}')
  # The original's conv bias gets only float32 residue (zero in exact arithmetic).
  module_scale = max(np.abs(ref[f'grad_sd/{name}']).max() for name in ours)
  assert_close(np.zeros(t.shape[-1]), ref['grad_sd/conv.bias'], f'{case} d loss / d conv.bias',
               scale=module_scale)
  assert_close(stats['bn']['var'], ref['sd_after/bn.running_var'], f'{case} running_var')
  # ConvReg's running mean also tracks its bias: one step adds momentum * bias more.
  assert_close(stats['bn']['mean'] + MOMENTUM * ref['init/conv.bias'],
               ref['sd_after/bn.running_mean'], f'{case} running_mean')


@pytest.mark.parametrize('case', FITNET_CASES)
def test_convreg_bias_changes_nothing_but_the_running_mean_in_float64(case):
  ref, variables, _ = fitnet_case(case)
  with jax.enable_x64(True):
    variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), variables)
    s, t = jnp.asarray(ref['student'], jnp.float64), jnp.asarray(ref['teacher'], jnp.float64)
    bias = np.asarray(ref['init/conv.bias'], np.float64)
    (loss, stats), (grad_p, grad_s, _) = fitnet_step(variables, s, t)
    (loss_b, stats_b), (grad_pb, grad_sb, grad_bias) = fitnet_step(variables, s, t,
                                                                   jnp.asarray(bias))
  scale = max(np.abs(g).max() for g in jax.tree.leaves(grad_p))
  assert np.abs(grad_bias).max() <= 1e-12 * scale  # zero in theory: BN subtracts the batch mean
  assert abs(loss_b - loss) <= 1e-12 * abs(loss)
  np.testing.assert_allclose(grad_sb, grad_s, rtol=0, atol=1e-12 * np.abs(grad_s).max())
  for g_b, g in zip(jax.tree.leaves(grad_pb), jax.tree.leaves(grad_p)):
    np.testing.assert_allclose(g_b, g, rtol=0, atol=1e-12 * scale)
  np.testing.assert_allclose(stats_b['bn']['var'], stats['bn']['var'], rtol=1e-12)
  np.testing.assert_allclose(stats_b['bn']['mean'] - stats['bn']['mean'], MOMENTUM * bias,
                             rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# AT, SP, KD (no parameters, no state)

def test_at_matches_repdistiller():
  ref = load('at')
  s, t = maps(ref, 'student'), maps(ref, 'teacher')
  def loss_fn(s):
    return AT().apply({}, s, t, train=True)
  (loss, per_pair), grads = jax.value_and_grad(loss_fn, has_aux=True)(s)
  assert_close(loss, ref['loss'], 'at loss')
  assert_close(per_pair, ref['per_pair'], 'at per pair')
  for i, g in enumerate(grads):
    assert_close(g, ref[f'grad_student/{i}'], f'at d loss / d student map {i}')


def test_sp_matches_repdistiller():
  ref = load('sp')
  t = jnp.asarray(ref['teacher'])
  def loss_fn(s):
    return SP(0, 0).apply({}, [s], [t], train=True)[0]
  loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(ref['student']))
  assert_close(loss, ref['loss'], 'sp loss')
  assert_close(grad, ref['grad_student'], 'sp d loss / d student map')


@pytest.mark.parametrize('case', ['t4', 't1'])
def test_kd_matches_repdistiller(case):
  ref = load('kd', case + '/')
  t, temperature = jnp.asarray(ref['teacher_logits']), float(ref['temperature'])
  loss, grad = jax.value_and_grad(lambda s: kd_loss(s, t, temperature))(
      jnp.asarray(ref['student_logits']))
  assert_close(loss, ref['loss'], f'kd {case} loss')
  assert_close(grad, ref['grad_student_logits'], f'kd {case} d loss / d student logits')
