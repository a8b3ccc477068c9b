"""Parity of the two-stage CRD-benchmark methods (AB, FT, FSP) with RepDistiller's own code.

Golden vectors: tests/reference/method_{ab,ft,fsp}.npz, written by
tests/reference/make_method_vectors.py from tests/reference/method_vectors/{ab,ft,fsp}.py (the
README there says what each holds). No torch here. Every array within `1e-4 * max|ref|`:
losses, gradients w.r.t. the student's maps and the methods' own parameters (converted to
PyTorch's layouts), and batch-norm running statistics after one train-mode step.

Gradients of a conv bias that feeds a train-mode batch norm (AB's connectors, FT's
translator) are zero in exact arithmetic (BN subtracts the batch mean); the reference holds
float32 residue there, so those are held to 1e-4 times the largest gradient of the module
instead of their own (noise) maximum, and separately shown to be zero in float64.

One step of the engine's pre-training stage changes exactly what the original's `init()`
optimises (AB: connectors and student body; FT: the paraphraser; FSP: the student body) and
minimises the loss pinned here; plus the registered stages and weights.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import bench, distill, step
from afd_jax import task as task_lib
from afd_jax.distill import registry
from afd_jax.distill.ab import AB
from afd_jax.distill.fsp import FSP
from afd_jax.distill.ft import FT
from tests.reference import weights
from tests.test_reference import assert_close, run_once

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


def f64(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def assert_zero_in_float64(grads, zero, count):
  """`grads`, torch name -> float64 gradient: the `count` names where `zero` holds are 0 up to
  float64 rounding (1e-10 of the largest gradient); the others are not all 0."""
  assert all(np.asarray(g).dtype == np.float64 for g in grads.values())
  scale = max(np.abs(g).max() for g in grads.values())
  zeros = [k for k in grads if zero(k)]
  assert len(zeros) == count and scale > 0, (zeros, scale)
  for k in zeros:
    assert np.abs(grads[k]).max() <= 1e-10 * scale, f'{k}: {np.abs(grads[k]).max():.3g}'


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


def ab_case():
  """The reference's AB module, its variables in our layout, the maps, and the mappings of the
  gradients (torch name -> our path and converter) and of the running statistics."""
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
  return data, module, params, stats, s, t, mapping, bn_stats


def ab_step(module, params, stats, s, t):
  """`((loss, (per_pair, updates)), (d/d params, d/d student maps))` of one train-mode step."""
  def loss_fn(p, s_feats):
    (loss, per_pair), updates = module.apply({'params': p, 'batch_stats': stats}, s_feats, t,
                                             train=True, mutable=['batch_stats'])
    return loss, (per_pair, updates)

  return run_once(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True), params, s)


def test_ab_matches_repdistiller():
  data, module, params, stats, s, t, mapping, bn_stats = ab_case()
  abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), s, t, train=False))
  same_structure(params, abstract['params'], 'AB params')
  same_structure(stats, abstract['batch_stats'], 'AB batch_stats')
  (loss, (per_pair, updates)), (g_params, g_s) = ab_step(module, params, stats, s, t)
  assert_close(loss, data['loss'], 'loss')
  assert_close(per_pair, data['per_pair'], 'per_pair')
  for i in range(len(s)):
    assert_close(g_s[i], data[f'grad_student/{i}'], f'grad_student/{i}')
  compare_params(g_params, data, mapping, lambda k: k.endswith('conv.bias'), 'grad_sd/')
  for key, (path, out) in bn_stats.items():
    assert_close(out(get(updates['batch_stats'], path)), data['sd_after/' + key], key)


def test_ab_connector_conv_biases_have_zero_gradient_in_float64():
  """Pairs 1-4 have a conv + batch-norm connector (pair 0 is the identity); the conv's bias
  has no gradient, which float64 shows where float32's residue could not."""
  _, module, params, stats, s, t, mapping, _ = ab_case()
  with jax.enable_x64(True):
    _, (g_params, _) = ab_step(module, *f64((params, stats, s, t)))
  grads = {k: out(get(g_params, path)) for k, (path, out) in mapping.items()}
  assert_zero_in_float64(grads, lambda k: k.endswith('conv.bias'), count=4)


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


def ft_main_step(module, params, stats, s, t):
  """`((loss, updates), (d/d params, d/d student maps))` of one main-stage train-mode step."""
  def loss_fn(p, s_feats):
    (loss, _), updates = module.apply({'params': p, 'batch_stats': stats}, s_feats, t,
                                      train=True, mutable=['batch_stats'])
    return loss, updates

  return run_once(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True), params, s)


def ft_translator_bias_before_bn(torch_name):
  """`encoder.{3j}.bias`: the bias of the translator's conv j, which a batch norm follows."""
  return torch_name.endswith('.bias') and int(torch_name.split('.')[1]) % 3 == 0


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
  (loss, updates), (g_params, g_s) = ft_main_step(module, params, stats, s, t)
  assert_close(loss, data[f'{case}/loss'], 'loss')
  assert_close(g_s[0], data[f'{case}/grad_student'], 'grad_student')
  p_map, s_map = mappings['translator']
  compare_params(g_params, data, p_map, ft_translator_bias_before_bn,
                 f'{case}/grad_sd/translator/')
  for key, (path, out) in s_map.items():
    assert_close(out(get(updates['batch_stats'], path)), data[f'{case}/sd_after/translator/' + key],
                 key)
  # The paraphraser's factor of the teacher is a constant: no gradient reaches it (the engine
  # also leaves it unchanged in the main stage: Pretrain.frozen_after, tested below).
  for g in jax.tree.leaves(g_params['paraphraser_encoder']) + jax.tree.leaves(
      g_params['paraphraser_decoder']):
    assert np.abs(np.asarray(g)).max() == 0


def test_ft_translator_conv_biases_have_zero_gradient_in_float64():
  """Each of the translator's three convs feeds a train-mode batch norm: its bias has no
  gradient, which float64 shows where float32's residue could not. On one case: the property
  is structural, and a float64 program is one more compile."""
  data, case = load('ft'), 'main'
  s, t = [data[f'{case}/student']], [data[f'{case}/teacher']]
  params, stats, mappings = ft_variables(data, case, with_translator=True)
  module = FT(student_tap=0, teacher_tap=0)
  with jax.enable_x64(True):
    _, (g_params, _) = ft_main_step(module, *f64((params, stats, s, t)))
  grads = {k: out(get(g_params, path)) for k, (path, out) in mappings['translator'][0].items()}
  assert_zero_in_float64(grads, ft_translator_bias_before_bn, count=3)


# ---------------------------------------------------------------------------------------------
# FSP

def test_fsp_matches_repdistiller():
  data = load('fsp')
  n = len(data['per_pair']) + 1
  s = [jnp.asarray(data[f'student/{i}']) for i in range(n)]
  t = [jnp.asarray(data[f'teacher/{i}']) for i in range(n)]
  module = FSP(tuple(range(n)), tuple(range(n)))

  loss_fn = lambda s_feats: module.apply({}, s_feats, t, train=True)
  (loss, per_pair), g_s = run_once(jax.value_and_grad(loss_fn, has_aux=True), s)
  assert_close(loss, data['loss'], 'loss')
  assert_close(per_pair, data['per_pair'], 'per_pair')
  for i in range(n):
    assert_close(g_s[i], data[f'grad_student/{i}'], f'grad_student/{i}')
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


# ---------------------------------------------------------------------------------------------
# The stage trains what RepDistiller's init() trains

# train_student.py hands init() (helper/pretrain.py) `init_trainable_list`: for abound the
# connector and `model_s.get_feat_modules()` (the student but its classifier `fc`), for factor
# the paraphraser, for fsp `get_feat_modules()`. init() runs `model_s.eval()` and then
# `init_modules.train()`, so the student's batch norms are in training mode exactly where its
# body trains. `loss` names the module method whose parity with the init() loss is pinned
# above (ABLoss and FSP are the main modules; FT's stage is the paraphraser's reconstruction).
ORIGINAL_STAGE = {
    'ab': {'teacher': 'resnet8x4', 'distiller': 'all', 'body': True, 'loss': '__call__'},
    'ft': {'teacher': 'resnet8x4', 'distiller': ('paraphraser_encoder', 'paraphraser_decoder'),
           'body': False, 'loss': 'pretrain_loss'},
    'fsp': {'teacher': 'resnet14', 'distiller': (), 'body': True, 'loss': '__call__'},
}
STAGE_IMAGE = (8, 8, 3)


def by_path(tree):
  """{(key, ...): leaf as a NumPy array} of a nested dict."""
  return {tuple(k.key for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def stage_loss(task, state, teacher_vars, images, body_trains, method):
  """The module's `method` on the maps the student (in training mode where its body trains)
  and the frozen teacher give for `images`: the loss the stage should minimise."""
  (_, s_feats), _ = task.student.apply(
      {'params': state.params['student'], 'batch_stats': state.batch_stats['student']}, images,
      train=body_trains, mutable=['batch_stats'])
  _, t_feats = task.teacher.apply(teacher_vars, images, train=False)
  (loss, _), _ = task.distiller.apply(
      {'params': state.params['distiller'], 'batch_stats': state.batch_stats['distiller']},
      s_feats, t_feats, train=True, mutable=['batch_stats'], method=method)
  return loss


@pytest.mark.parametrize('name', sorted(ORIGINAL_STAGE))
def test_one_stage_step_trains_what_repdistillers_init_trains(name):
  """One step of the engine's pre-training stage (`step.make_pretrain_step`, resnet8 student):
  every parameter the original's init() optimises changes, every other one (the classifier,
  FT's translator, the student under FT) and the student's batch statistics under FT are
  bit for bit as they were, and the step's loss is the init() loss the parity tests pin."""
  spec = ORIGINAL_STAGE[name]
  config = bench.bench_config(name, spec['teacher'], 'resnet8')
  task = task_lib.task_from_config(config, 4, 1, jnp.float32, STAGE_IMAGE)
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(8,) + STAGE_IMAGE), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 4, 8), jnp.int32)}

  def run(key):
    teacher_vars = task.teacher.init(key, batch['image'], train=False)
    state = step.init_state(task, key, STAGE_IMAGE, jax.eval_shape(lambda: teacher_vars))
    after, metrics = step.make_pretrain_step(task)(state, teacher_vars, batch)
    expected = stage_loss(task, state, teacher_vars, batch['image'], spec['body'], spec['loss'])
    return state, after, metrics['pretrain'], expected

  before, after, loss, expected = run_once(run, jax.random.PRNGKey(0))
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)

  def trained(path):
    if path[0] == 'student':
      return spec['body'] and path[1] != 'fc'
    return spec['distiller'] == 'all' or path[1] in spec['distiller']

  old, new = by_path(before.params), by_path(after.params)
  assert any(p[0] == 'distiller' for p in old) == (name != 'fsp')  # FSP has no parameters
  for path, value in old.items():
    assert (not np.array_equal(new[path], value)) == trained(path), path
  old, new = by_path(before.batch_stats), by_path(after.batch_stats)
  for path, value in old.items():  # the student's in training mode iff it trains; AB's connectors
    moves = spec['body'] if path[0] == 'student' else name == 'ab'
    assert (not np.array_equal(new[path], value)) == moves, path
