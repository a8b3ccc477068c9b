"""Parity of the two-stage CRD-benchmark methods (AB, FT, FSP) with RepDistiller's own code.

Golden vectors: tests/reference/method_{ab,ft,fsp}.npz, written by
tests/reference/make_method_vectors.py from tests/reference/method_vectors/{ab,ft,fsp}.py (the
README there says what each holds). No torch here. Every array within `1e-4 * max|ref|`:
losses, gradients w.r.t. the student's maps and the methods' own parameters (converted to
PyTorch's layouts), and batch-norm running statistics after one train-mode step.

Gradients of a conv bias that feeds a train-mode batch norm are zero in exact arithmetic (BN
subtracts the batch mean); the reference holds float32 residue there, so those are held to
1e-4 times the largest gradient of the module instead of their own (noise) maximum.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import distill
from afd_jax.distill import registry
from afd_jax.distill.ab import AB
from afd_jax.distill.fsp import FSP
from afd_jax.distill.ft import FT
from tests.reference import weights
from tests.test_reference import assert_close

REFERENCE = pathlib.Path(__file__).resolve().parent / 'reference'


def load(name):
  return np.load(REFERENCE / f'method_{name}.npz')


def state_dict(data, prefix=''):
  """The original module's state_dict, redrawn from the file's seed, names and shapes."""
  shapes = [s[s >= 0] for s in data[prefix + 'shapes']]
  return weights.state_dict(int(data[prefix + 'seed']), [str(k) for k in data[prefix + 'keys']],
                            shapes, float(data[prefix + 'gain']))


# PyTorch layouts <-> ours (conv kernels HWIO; a transposed conv stored as its equivalent conv).
def conv_in(w):
  return w.transpose(2, 3, 1, 0)


def conv_out(g):
  return np.asarray(g).transpose(3, 2, 0, 1)


def convt_in(w):
  return w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)


def convt_out(g):
  return np.asarray(g).transpose(2, 3, 0, 1)[:, :, ::-1, ::-1]


def get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def put(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = jnp.asarray(np.ascontiguousarray(value))


def same_structure(ours, abstract, what):
  assert (jax.tree.structure(ours) == jax.tree.structure(abstract)), what
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(abstract)):
    assert a.shape == b.shape, what


def compare_params(grads, ref, mapping, bias_before_bn, prefix):
  """`mapping`: torch name -> (path in our tree, layout converter of our array to torch's)."""
  scale_all = max(np.abs(ref[prefix + k]).max() for k in mapping)
  for torch_name, (path, out) in mapping.items():
    ours = out(get(grads, path))
    scale = scale_all if bias_before_bn(torch_name) else None
    assert_close(ours, ref[prefix + torch_name], f'grad {torch_name}', scale)


# ---------------------------------------------------------------------------------------------
# AB

def ab_mapping(keys):
  """torch name of a Connector -> (our path, converter to torch's layout), params and stats."""
  params, stats = {}, {}
  for key in keys:
    _, i, part, leaf = key.split('.')  # connectors.{i}.{conv,bn}.{leaf}
    node = f'connector_{i}'
    if part == 'bn':
      if leaf in ('running_mean', 'running_var'):
        stats[key] = ((node, 'bn', {'running_mean': 'mean', 'running_var': 'var'}[leaf]),
                      lambda x: np.asarray(x))
      else:
        params[key] = ((node, 'bn', {'weight': 'scale', 'bias': 'bias'}[leaf]),
                       lambda x: np.asarray(x))
  return params, stats


def ab_conv_path(node, transposed, leaf):
  if transposed:
    return (node, 'conv', 'kernel' if leaf == 'weight' else 'bias')
  return (node, 'conv', 'conv', 'kernel' if leaf == 'weight' else 'bias')


def test_ab_matches_repdistiller():
  data = load('ab')
  n = len(data['per_pair'])
  s = [jnp.asarray(data[f'student/{i}']) for i in range(n)]
  t = [jnp.asarray(data[f'teacher/{i}']) for i in range(n)]
  sd = state_dict(data)
  params, stats, mapping = {}, {}, {}
  bn_params, bn_stats = ab_mapping(sd)
  for key, value in sd.items():
    _, i, part, leaf = key.split('.')
    node = f'connector_{i}'
    if part == 'conv':
      transposed = s[int(i)].shape[1] * 2 == t[int(i)].shape[1]  # CRD: 2 s_H = t_H
      path = ab_conv_path(node, transposed, leaf)
      if leaf == 'weight':
        put(params, path, convt_in(value) if transposed else conv_in(value))
        mapping[key] = (path, convt_out if transposed else conv_out)
      else:
        put(params, path, value)
        mapping[key] = (path, np.asarray)
    elif key in bn_params:
      put(params, bn_params[key][0], value)
      mapping[key] = bn_params[key]
    else:
      put(stats, bn_stats[key][0], value)
  module = AB(pairs=tuple((i, i) for i in range(n)), margin=float(data['margin']))
  abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), s, t, train=False))
  same_structure(params, abstract['params'], 'AB params')
  same_structure(stats, abstract['batch_stats'], 'AB batch_stats')

  def loss_fn(p, s_feats, method):
    (loss, per_pair), updates = module.apply({'params': p, 'batch_stats': stats}, s_feats, t,
                                             train=True, mutable=['batch_stats'], method=method)
    return loss, (per_pair, updates)

  @jax.jit  # one compilation: the step, and the pre-training stage's loss
  def run(p, s_feats):
    grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(p, s_feats, '__call__')
    return grads, loss_fn(p, s_feats, 'pretrain_loss')[0]

  ((loss, (per_pair, updates)), (g_params, g_s)), pre = run(params, s)
  assert_close(loss, data['loss'], 'loss')
  assert_close(per_pair, data['per_pair'], 'per_pair')
  for i in range(n):
    assert_close(g_s[i], data[f'grad_student/{i}'], f'grad_student/{i}')
  compare_params(g_params, data, mapping, lambda k: k.endswith('conv.bias'), 'grad_sd/')
  for key, (path, out) in bn_stats.items():
    assert_close(out(get(updates['batch_stats'], path)), data['sd_after/' + key], key)
  # The pre-training stage minimises the same loss.
  assert float(pre) == float(loss)


def test_ab_margin_loss_by_hand():
  # margin 1; teacher off (t <= 0): (s + 1)^2 where s > -1; teacher on: (s - 1)^2 where s <= 1.
  s = np.array([-2.0, -0.5, 0.0, 0.5, 2.0, -2.0, 0.5, 1.0, 3.0], np.float32).reshape(1, 1, 9, 1)
  t = np.array([-1.0, -1.0, 0.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0], np.float32).reshape(1, 1, 9, 1)
  expected = 0 + 0.25 + 1 + 2.25 + 9 + 9 + 0.25 + 0 + 0
  run = jax.jit(lambda s, t: (AB(pairs=((0, 0),)).apply({}, [s], [t], train=True)[0],
                              AB(pairs=((0, 0), (0, 0))).apply({}, [s], [t], train=True)[1]))
  loss, per_pair = run(s, t)
  np.testing.assert_allclose(float(loss), expected * 3 / 1000, rtol=1e-6)
  # Two pairs: weights 1/2 and 1.
  np.testing.assert_allclose(np.asarray(per_pair), [expected * 1.5e-3, expected * 3e-3],
                             rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# FT

def seq_mapping(keys, module, batch_norm):
  """An encoder/decoder `nn.Sequential` of (conv, [bn], lrelu) triples -> our names.

  Index 3j is conv j, 3j + 1 its batch norm (the translator's; the paraphraser's is empty)."""
  params, stats = {}, {}
  for key in keys:
    seq, index, leaf = key.split('.')
    j, r = divmod(int(index), 3)
    if r == 0:
      transposed = seq == 'decoder'
      node = module if module != 'paraphraser' else f'paraphraser_{seq}'
      if transposed:
        path = (node, f'conv{j}', 'kernel' if leaf == 'weight' else 'bias')
      else:
        path = (node, f'conv{j}', 'conv', 'kernel' if leaf == 'weight' else 'bias')
      converter = (convt_out if transposed else conv_out) if leaf == 'weight' else np.asarray
      loader = (convt_in if transposed else conv_in) if leaf == 'weight' else (lambda x: x)
      params[key] = (path, converter, loader)
    else:
      assert batch_norm and r == 1, key
      if leaf in ('running_mean', 'running_var'):
        stats[key] = ((module, f'bn{j}', {'running_mean': 'mean', 'running_var': 'var'}[leaf]),
                      np.asarray, lambda x: x)
      else:
        params[key] = ((module, f'bn{j}', {'weight': 'scale', 'bias': 'bias'}[leaf]),
                       np.asarray, lambda x: x)
  return params, stats


def ft_variables(data, case, with_translator):
  params, stats, mappings = {}, {}, {}
  parts = [('paraphraser', False)] + ([('translator', True)] if with_translator else [])
  for module, bn in parts:
    sd = state_dict(data, f'{case}/{module}/')
    p_map, s_map = seq_mapping(sd, module, bn)
    for key, value in sd.items():
      path, _, loader = p_map[key] if key in p_map else s_map[key]
      put(params if key in p_map else stats, path, loader(value))
    mappings[module] = ({k: v[:2] for k, v in p_map.items()}, {k: v[:2] for k, v in s_map.items()})
  return params, stats, mappings


def test_ft_pretrain_matches_repdistiller():
  data, case = load('ft'), 'pretrain'
  t = [jnp.asarray(data[f'{case}/teacher'])]
  s = [np.zeros((t[0].shape[0], 3, 3, 3), np.float32)]  # unused by the pre-training loss
  params, _, mappings = ft_variables(data, case, with_translator=False)
  module = FT(student_tap=0, teacher_tap=0)
  abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), s, t, train=False))
  stats = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract['batch_stats'])
  params['translator'] = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                                      abstract['params']['translator'])
  same_structure(params, abstract['params'], 'FT params')

  def loss_fn(p):
    (loss, _), updates = module.apply({'params': p, 'batch_stats': stats}, s, t, train=True,
                                      mutable=['batch_stats'], method='pretrain_loss')
    return loss, updates

  (loss, updates), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  assert_close(loss, data[f'{case}/loss'], 'pretrain loss')
  compare_params(grads, data, mappings['paraphraser'][0], lambda k: False,
                 f'{case}/grad_sd/paraphraser/')
  assert all(np.abs(np.asarray(g)).max() == 0 for g in jax.tree.leaves(grads['translator']))


@pytest.mark.parametrize('case', ['main', 'main_pool'])
def test_ft_main_matches_repdistiller(case):
  data = load('ft')
  s = [jnp.asarray(data[f'{case}/student'])]
  t = [jnp.asarray(data[f'{case}/teacher'])]
  params, stats, mappings = ft_variables(data, case, with_translator=True)
  module = FT(student_tap=0, teacher_tap=0)
  abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), s, t, train=False))
  same_structure(params, abstract['params'], 'FT params')
  same_structure(stats, abstract['batch_stats'], 'FT batch_stats')

  def loss_fn(p, s_feats, batch_stats):
    (loss, _), updates = module.apply({'params': p, 'batch_stats': batch_stats}, s_feats, t,
                                      train=True, mutable=['batch_stats'])
    return loss, updates

  (loss, updates), (g_params, g_s) = jax.jit(
      jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(params, s, stats)
  assert_close(loss, data[f'{case}/loss'], 'loss')
  assert_close(g_s[0], data[f'{case}/grad_student'], 'grad_student')
  p_map, s_map = mappings['translator']
  compare_params(g_params, data, p_map,
                 lambda k: k.endswith('.bias') and int(k.split('.')[1]) % 3 == 0,
                 f'{case}/grad_sd/translator/')
  for key, (path, out) in s_map.items():
    assert_close(out(get(updates['batch_stats'], path)), data[f'{case}/sd_after/translator/' + key],
                 key)
  # The paraphraser's factor of the teacher is a constant: no gradient reaches it (the engine
  # also leaves it unchanged in the main stage: Pretrain.frozen_after, tested below).
  for g in jax.tree.leaves(g_params['paraphraser_encoder']) + jax.tree.leaves(
      g_params['paraphraser_decoder']):
    assert np.abs(np.asarray(g)).max() == 0


# ---------------------------------------------------------------------------------------------
# FSP

def test_fsp_matches_repdistiller():
  data = load('fsp')
  n = len(data['per_pair']) + 1
  s = [jnp.asarray(data[f'student/{i}']) for i in range(n)]
  t = [jnp.asarray(data[f'teacher/{i}']) for i in range(n)]
  module = FSP(tuple(range(n)), tuple(range(n)))

  def loss_fn(s_feats, method):
    return module.apply({}, s_feats, t, train=True, method=method)

  run = jax.jit(lambda s_feats: (jax.value_and_grad(loss_fn, has_aux=True)(s_feats, '__call__'),
                                 loss_fn(s_feats, 'pretrain_loss')[0]))
  ((loss, per_pair), g_s), pre = run(s)
  assert_close(loss, data['loss'], 'loss')
  assert_close(per_pair, data['per_pair'], 'per_pair')
  for i in range(n):
    assert_close(g_s[i], data[f'grad_student/{i}'], f'grad_student/{i}')
  assert float(pre) == float(loss)
  with pytest.raises(ValueError, match='equal channels'):
    module.apply({}, s, [t[0], t[1], t[2], t[2]], train=True)


# ---------------------------------------------------------------------------------------------
# Registration: the benchmark's stages and weights

@pytest.mark.parametrize('name, weight, trains, lr', [
    ('ab', 0.0, ('distiller', 'student_body'), 0.05),
    ('ft', 200.0, ('distiller',), 0.01),
    ('fsp', 0.0, ('student_body',), 0.05)])
def test_registered_stages_and_weights(name, weight, trains, lr):
  method = registry.get(name)
  assert method.feature_weight == weight and method.logit_weights == (1.0, 0.0)
  pre = method.pretrain
  assert (pre.trains, pre.method, pre.epochs, pre.learning_rate, pre.momentum,
          pre.weight_decay) == (trains, 'pretrain_loss', 30, lr, 0.9, 5e-4)
  assert name in distill.METHODS
