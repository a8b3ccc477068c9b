"""Parity with the official PyTorch code itself, for models, sizes and pairs beyond the
reference arrays: resnet110's every-second-block taps, ImageNet ResNets at sizes that do not
divide, 27 x 9 AFD pairs with qk_dim 64 (and its zero-in-theory gradients zero in float64).

Runs where a checkout of github.com/clovaai/attention-feature-distillation is named by
AFD_OFFICIAL_DIR and torch is installed (the official code is not part of this project).
"""
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import models
from afd_jax.distill import AFD
from afd_jax.interop import torch as torch_interop

OFFICIAL = os.environ.get('AFD_OFFICIAL_DIR')
pytestmark = pytest.mark.skipif(
    not OFFICIAL, reason='set AFD_OFFICIAL_DIR to a checkout of the official AFD code to run')
torch = pytest.importorskip('torch', reason='the official code needs torch') if OFFICIAL else None


@pytest.fixture(scope='module')
def official():
  sys.path.insert(0, OFFICIAL)
  import models as official_models  # pylint: disable=g-import-not-at-top
  from distill.AFD import AFD as OfficialAFD  # pylint: disable=g-import-not-at-top
  from utils import LAYER, unique_shape  # pylint: disable=g-import-not-at-top
  return official_models, OfficialAFD, LAYER, unique_shape


def randomise_bn(model, seed):
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.weight.data = 1 + 0.3 * torch.randn(m.weight.shape, generator=g)
      m.bias.data = 0.2 * torch.randn(m.bias.shape, generator=g)
      m.running_mean.data = 0.1 * torch.randn(m.running_mean.shape, generator=g)
      m.running_var.data = 1 + 0.5 * torch.rand(m.running_var.shape, generator=g)


def rel_err(ours, ref):
  ref = np.asarray(ref, np.float64)
  return np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize('name, size, taps', [
    ('resnet110', 32, slice(2, -1, 2)),
    ('resnet8x4', 32, slice(1, -1)),
    ('resnet32x4', 32, slice(1, -1)),
    ('wrn40x1', 32, slice(1, -1)),
    ('wrn28x2', 36, slice(1, -1)),
    ('resnet34', 32, slice(1, -1)),
    ('resnet34im', 99, slice(1, -1)),
    ('resnet50im', 67, slice(1, -1)),
])
def test_models_match_the_official_code(official, name, size, taps):
  official_models = official[0]
  torch.manual_seed(0)
  ref_model = official_models.__dict__[name](num_classes=100).eval()
  randomise_bn(ref_model, 1)
  x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    feats, logits = ref_model(torch.from_numpy(x.transpose(0, 3, 1, 2)), is_feat=True)
  ref_taps = [f.numpy().transpose(0, 2, 3, 1) for f in feats[taps]]
  variables = torch_interop.convert(name, ref_model.state_dict())
  ours_logits, ours_taps = models.create(name, 100).apply(variables, jnp.asarray(x), train=False)
  assert rel_err(ours_logits, logits.numpy()) <= 1e-4
  assert len(ours_taps) == len(ref_taps)
  for ours, ref in zip(ours_taps, ref_taps):
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= 1e-4


def afd_step(variables, student, teacher):
  """Our AFD (qk_dim 64): `((loss, updates), (d/d params, d/d student maps))` of one step."""
  def loss_fn(params, student):
    (l, _), upd = AFD(64).apply({'params': params, 'batch_stats': variables['batch_stats']},
                                student, teacher, train=True, mutable=['batch_stats'])
    return l, upd
  return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(
      variables['params'], student)


def zero_in_theory(torch_name):
  """A Linear bias that feeds a train-mode BatchNorm, and the bilinear BN's bias (it shifts a
  softmax row): zero gradient in exact arithmetic (see tests/test_reference.py)."""
  return torch_name.endswith('linear.bias') or torch_name.endswith('bilinear.bn.bias')


def test_afd_27x9_qk64_matches_the_official_code(official):
  official_models, OfficialAFD, layer, unique_shape = official
  rng = np.random.default_rng(0)
  t_model, s_model = official_models.resnet110(num_classes=10), official_models.resnet20(num_classes=10)
  with torch.no_grad():
    probe = torch.zeros(2, 3, 32, 32)
    t_feats, _ = t_model(probe, is_feat=True)
    s_feats, _ = s_model(probe, is_feat=True)
  args = types.SimpleNamespace(qk_dim=64, guide_layers=layer['resnet110'], hint_layers=layer['resnet20'])
  args.t_shapes = [t_feats[i].shape for i in args.guide_layers]
  args.s_shapes = [s_feats[i].shape for i in args.hint_layers]
  args.n_t, args.unique_t_shapes = unique_shape(args.t_shapes)
  torch.manual_seed(0)
  module = OfficialAFD(args).train()
  for m in module.modules():
    if isinstance(m, torch.nn.BatchNorm1d):
      m.weight.data = 1 + 0.3 * torch.randn(m.weight.shape)
      m.bias.data = 0.2 * torch.randn(m.bias.shape)
  batch = 6
  make = lambda s: np.maximum(rng.normal(size=(batch, s[2], s[3], s[1])), 0).astype(np.float32)
  t_np = [make(s) for s in args.t_shapes]
  s_np = [make(s) for s in args.s_shapes]
  # The official module indexes full feature lists; give it lists with the taps in place.
  t_full = [None] * (max(args.guide_layers) + 1)
  s_full = [None] * (max(args.hint_layers) + 1)
  for i, n in enumerate(args.guide_layers):
    t_full[n] = torch.from_numpy(t_np[i].transpose(0, 3, 1, 2))
  s_torch = [torch.from_numpy(f.transpose(0, 3, 1, 2)).requires_grad_() for f in s_np]
  for i, m in enumerate(args.hint_layers):
    s_full[m] = s_torch[i]
  sd_before = {k: v.clone() for k, v in module.state_dict().items()}
  loss = module(s_full, t_full)
  loss.backward()

  variables = torch_interop.convert('afd', sd_before)
  (ours, updates), (g_params, g_student) = afd_step(
      variables, [jnp.asarray(f) for f in s_np], [jnp.asarray(f) for f in t_np])
  assert rel_err(ours, loss.item()) <= 1e-4
  for g, ref in zip(g_student, s_torch):
    assert rel_err(g, ref.grad.numpy().transpose(0, 2, 3, 1)) <= 1e-4
  ours_grads = torch_interop.to_state_dict('afd', {'params': g_params})
  ref_grads = {k: p.grad.numpy() for k, p in module.named_parameters()}
  scale = max(np.abs(v).max() for v in ref_grads.values())
  for k, ref in ref_grads.items():
    err = np.abs(ours_grads[k] - ref).max()
    assert err <= 1e-4 * (scale if zero_in_theory(k) else np.abs(ref).max()), k
  # Those held to the largest gradient above are zero in float64 (not only within float32 noise).
  with jax.enable_x64(True):
    as64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)
    _, (g64, _) = afd_step(as64(variables), as64(s_np), as64(t_np))
  grads64 = torch_interop.to_state_dict('afd', {'params': g64})
  scale64 = max(np.abs(v).max() for v in grads64.values())
  zeros = [k for k in grads64 if zero_in_theory(k)]
  assert len(zeros) == len(s_np) + len(t_np) + 2 and grads64[zeros[0]].dtype == np.float64
  for k in zeros:
    assert np.abs(grads64[k]).max() <= 1e-10 * scale64, k
  ours_stats = torch_interop.to_state_dict('afd', {'batch_stats': updates['batch_stats']})
  for k, v in module.state_dict().items():
    if k.endswith('running_mean') or k.endswith('running_var'):
      assert rel_err(ours_stats[k], v.numpy()) <= 1e-4, k
