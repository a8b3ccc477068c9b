"""Parity of DKD, SemCKD and ReviewKD with their original PyTorch code (golden vectors).

tests/reference/method_{dkd,semckd,reviewkd}.npz were written by
tests/reference/make_method_vectors.py from the generators in tests/reference/method_vectors/
(one train-mode step of the original modules); README.md there says what each file holds.
Weights and feature maps are redrawn from the files' seeds (tests/reference/weights.py); no
torch is needed here. Every array within max |ours - reference| <= 1e-4 * max |reference|:
losses, gradients w.r.t. the student's inputs and every parameter of the method, batch-norm
running statistics after the step, SemCKD's attention weights. Plus DKD's registered pair
defaults, each builder's refusals, and SemCKD's attention labelled and drawn in the plots.
"""
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import distill
from afd_jax.distill import registry
from afd_jax.distill.dkd import DKD
from afd_jax.distill.kd import cross_entropy
from afd_jax.distill.reviewkd import ReviewKD, nearest_indices
from afd_jax.distill.semckd import SemCKD
from afd_jax.models.taps import Tap
from tests.reference import weights
from tests.test_reference import assert_close, run_once

REFERENCE = pathlib.Path(__file__).resolve().parent / 'reference'


def load(name):
  return np.load(REFERENCE / f'method_{name}.npz')


def prefixed(data, prefix):
  keys = data.files if hasattr(data, 'files') else list(data)
  return {k[len(prefix):]: data[k] for k in keys if k.startswith(prefix)}


def unpad(shapes):
  return [tuple(int(x) for x in s if x >= 0) for s in shapes]


def state_dict(data, prefix=''):
  return weights.state_dict(int(data[prefix + 'seed']), [str(k) for k in data[prefix + 'keys']],
                            unpad(data[prefix + 'shapes']), float(data[prefix + 'gain']))


def features(data, who, prefix=''):
  return [jnp.asarray(f) for f in weights.features(int(data[f'{prefix}{who}_seed']),
                                                   unpad(data[f'{prefix}{who}_shapes']))]


# ---------------------------------------------------------------------------------------------
# PyTorch names <-> our variables. `where(torch name) -> (collection, our path)`; kernels are
# transposed (conv OIHW <-> HWIO, Linear (out, in) <-> (in, out)).

def _layout_to_ours(value):
  return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T


def _layout_to_torch(value):
  return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T


def _is_kernel(path):
  return path[-1] == 'kernel' or path[-1].endswith('_kernel')


def to_variables(sd, where):
  variables = {'params': {}, 'batch_stats': {}}
  for name, value in sd.items():
    collection, path = where(name)
    node = variables[collection]
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = jnp.asarray(_layout_to_ours(value) if _is_kernel(path) else value)
  return variables


def flat(tree, prefix=()):
  out = {}
  for key, value in tree.items():
    out.update(flat(value, prefix + (key,)) if isinstance(value, dict) else
               {prefix + (key,): np.asarray(value)})
  return out


def torch_named(tree, where, names):
  """Our `tree` (one collection) under the PyTorch `names`; every leaf must be named once."""
  ours = flat(tree)
  out = {}
  for name in names:
    _, path = where(name)
    value = ours.pop(tuple(path))
    out[name] = _layout_to_torch(value) if _is_kernel(path) else value
  assert not ours, f'variables without a PyTorch name: {sorted(ours)}'
  return out


def _bn_leaf(leaf):
  return {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
          'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}[leaf]


# ---------------------------------------------------------------------------------------------
# DKD

@pytest.mark.parametrize('case', ['c0', 'c1'])
def test_dkd_loss_parts_and_gradient(case):
  data = prefixed(load('dkd'), case + '/')
  module = DKD(alpha=float(data['alpha']), beta=float(data['beta']),
               temperature=float(data['temperature']), warmup=float(data['warmup']))
  teacher, labels = jnp.asarray(data['teacher_logits']), jnp.asarray(data['labels'])

  def loss_fn(student):
    return module.apply({}, [], [], True, student_logits=student, teacher_logits=teacher,
                        labels=labels, epoch=jnp.int32(data['epoch']))

  (loss, parts), grad = run_once(jax.value_and_grad(loss_fn, has_aux=True),
                                 jnp.asarray(data['student_logits']))
  assert_close(loss, data['loss_kd'], 'loss_kd')
  assert_close(parts[0], data['tckd'], 'tckd')
  assert_close(parts[1], data['nckd'], 'nckd')
  assert_close(grad, data['grad_student_logits'], 'grad student logits')
  # The rest of the objective: CE at weight 1 (our engine's CE term).
  assert_close(cross_entropy(jnp.asarray(data['student_logits']), labels), data['loss_ce'],
               'loss_ce')


def test_dkd_registration_and_pair_defaults():
  """mdistiller's defaults (cfg.py's beta 8), and its per-pair betas through the CIFAR-100
  config (as configs/cifar100/dkd/<pair>.yaml), as ReviewKD's per-pair weights."""
  from configs import cifar100  # pylint: disable=g-import-not-at-top
  method = registry.get('dkd')
  assert (method.feature_weight, method.logit_weights) == (1.0, (1.0, 0.0))
  setting = registry.Setting(num_classes=100)
  beta = lambda t, s: method.build(
      cifar100.get_config(f'teacher={t},student={s},method=dkd'), setting).beta
  assert beta('wrn40x2', 'wrn16x2') == 6.0 and beta('resnet56', 'resnet20') == 2.0
  assert beta('resnet32x4', 'resnet8x4') == 8.0
  weight = lambda t, s: cifar100.get_config(
      f'teacher={t},student={s},method=reviewkd').loss.feature_weight
  assert weight('resnet56', 'resnet20') == 0.6 and weight('wrn40x2', 'wrn16x2') == 5.0
  config = lambda t, s: types.SimpleNamespace(teacher=types.SimpleNamespace(name=t),
                                              student=types.SimpleNamespace(name=s))
  with pytest.raises(ValueError, match='at least 2 classes'):
    method.build(config('a', 'b'), registry.Setting(num_classes=1))


# ---------------------------------------------------------------------------------------------
# SemCKD

def semckd_where(name):
  """'key_weight{j}.linear{n}.weight' -> key_weight{j}/linear{n}_kernel; 'regressor{i}{j}
  .regressor.{L}.*' (single digits here) -> regressor{i}_{j}/conv{L} or bn{L} (L = 1, 4)."""
  parts = name.split('.')
  if parts[0].startswith(('key_weight', 'query_weight')):
    return 'params', (parts[0], f'{parts[1]}_{"kernel" if parts[2] == "weight" else "bias"}')
  pair, layer, leaf = parts[0], parts[2], parts[3]
  module = f'regressor{pair[9]}_{pair[10]}'
  if layer in ('1', '4'):
    collection, key = _bn_leaf(leaf)
    return collection, (module, f'bn{layer}', key)
  return 'params', (module, f'conv{layer}', 'kernel')


def semckd_step(variables, student, teacher, batch_size):
  module = SemCKD(batch_size=batch_size)

  def loss_fn(params, student):
    (loss, attention), updates = module.apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, student, teacher,
        train=True, mutable=['batch_stats'])
    return loss, (attention, updates)

  return run_once(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True),
                  variables['params'], student)


@pytest.fixture(scope='module')
def semckd_case():
  data = load('semckd')
  sd = state_dict(data)
  variables = to_variables(sd, semckd_where)
  student, teacher = features(data, 'student'), features(data, 'teacher')
  return data, sd, variables, student, teacher, semckd_step(
      variables, student, teacher, int(data['batch_size']))


def test_semckd_loss_and_attention(semckd_case):
  data, *_, ((loss, (attention, _)), _) = semckd_case
  assert_close(loss, data['loss'], 'loss')
  assert attention.shape == data['attention'].shape  # B x T x S
  assert_close(attention, data['attention'], 'attention')


def test_semckd_gradients(semckd_case):
  data, sd, *_, ((_, _), (grad_params, grad_student)) = semckd_case
  refs = prefixed(data, 'grad_student/')
  assert len(grad_student) == len(refs)
  for i, ours in enumerate(grad_student):
    assert_close(ours, refs[str(i)], f'grad_student/{i}')
  refs = prefixed(data, 'grad_sd/')
  ours = torch_named(grad_params, semckd_where, list(refs))
  assert set(refs) == {k for k in sd if 'running' not in k}  # every parameter
  for name, ref in refs.items():
    assert_close(ours[name], ref, f'grad {name}')


def test_semckd_running_statistics(semckd_case):
  data, *_, ((_, (_, updates)), _) = semckd_case
  refs = prefixed(data, 'sd_after/')
  ours = torch_named(updates['batch_stats'], semckd_where, list(refs))
  for name, ref in refs.items():
    assert_close(ours[name], ref, f'running {name}')


def test_semckd_smaller_batch_uses_the_first_rows(semckd_case):
  """A module built for N = 11 > B = 8 (same hidden width 11 // 4 = 2) whose first Linear has
  the reference's 8 rows on top gives the reference's loss: extra rows see zero-padding."""
  data, _, variables, student, teacher, _ = semckd_case
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: x, variables['params'])
  for name, sub in params.items():
    if 'linear1_kernel' in sub:
      sub['linear1_kernel'] = jnp.concatenate(
          [sub['linear1_kernel'], jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)])
  (loss, _), _ = semckd_step({**variables, 'params': params}, student, teacher, 11)
  assert_close(loss, data['loss'], 'loss with N = 11')
  with pytest.raises(ValueError, match='at most 4 examples'):
    SemCKD(batch_size=4).init(jax.random.PRNGKey(0), student, teacher, train=False)


# ---------------------------------------------------------------------------------------------
# ReviewKD

def reviewkd_where(name):
  """'abfs.{k}.conv1.0.weight' -> abf{k}/conv1/kernel, 'abfs.{k}.conv1.1.*' -> abf{k}/bn1,
  'abfs.{k}.att_conv.0.*' -> abf{k}/att_conv."""
  _, k, part, index, leaf = name.split('.')
  if part == 'att_conv':
    return 'params', (f'abf{k}', 'att_conv', 'kernel' if leaf == 'weight' else 'bias')
  if index == '1':
    collection, key = _bn_leaf(leaf)
    return collection, (f'abf{k}', 'bn' + part[-1], key)
  return 'params', (f'abf{k}', 'conv' + part[-1], 'kernel')


@pytest.fixture(scope='module', params=['c0', 'c1'])
def reviewkd_case(request):
  data = load('reviewkd')
  p = request.param + '/'
  sd = state_dict(data, p)
  variables = to_variables(sd, reviewkd_where)
  student, teacher = features(data, 'student', p), features(data, 'teacher', p)
  s_embedding = student[-1].reshape(student[-1].shape[0], -1)
  t_embedding = teacher[-1].reshape(teacher[-1].shape[0], -1)
  module = ReviewKD(warmup=float(data[p + 'warmup']))
  epoch = jnp.int32(int(data[p + 'epoch0']) + 1)  # ours is 1-based

  def loss_fn(params, student_maps, s_emb):
    (loss, per_level), updates = module.apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, student_maps, teacher[:-1],
        train=True, student_embedding=s_emb, teacher_embedding=t_embedding, epoch=epoch,
        mutable=['batch_stats'])
    return loss, (per_level, updates)

  result = run_once(jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True),
                    variables['params'], student[:-1], s_embedding)
  return prefixed(data, p), sd, result


def test_reviewkd_loss(reviewkd_case):
  data, _, ((loss, (per_level, _)), _) = reviewkd_case
  assert_close(loss, data['loss'], 'loss')
  assert_close(jnp.sum(per_level), data['hcl'], 'hcl')


def test_reviewkd_gradients(reviewkd_case):
  data, sd, (_, (grad_params, grad_maps, grad_embedding)) = reviewkd_case
  refs = prefixed(data, 'grad_student/')
  ours = list(grad_maps) + [grad_embedding.reshape(grad_embedding.shape[0], 1, 1, -1)]
  assert len(ours) == len(refs)
  for i, g in enumerate(ours):
    assert_close(g, refs[str(i)], f'grad_student/{i}')
  refs = prefixed(data, 'grad_sd/')
  assert set(refs) == {k for k in sd if 'running' not in k}
  ours = torch_named(grad_params, reviewkd_where, list(refs))
  for name, ref in refs.items():
    assert_close(ours[name], ref, f'grad {name}')


def test_reviewkd_running_statistics(reviewkd_case):
  data, _, ((_, (_, updates)), _) = reviewkd_case
  refs = prefixed(data, 'sd_after/')
  ours = torch_named(updates['batch_stats'], reviewkd_where, list(refs))
  for name, ref in refs.items():
    assert_close(ours[name], ref, f'running {name}')


def test_reviewkd_nearest_matches_pytorch_rule():
  # F.interpolate(mode='nearest'): floor(i * in / out), e.g. 3 -> 4: 0, 0, 1, 2; 6 -> 8.
  np.testing.assert_array_equal(nearest_indices(3, 4), [0, 0, 1, 2])
  np.testing.assert_array_equal(nearest_indices(6, 8), [0, 0, 1, 2, 3, 3, 4, 5])
  np.testing.assert_array_equal(nearest_indices(1, 3), [0, 0, 0])
  np.testing.assert_array_equal(nearest_indices(4, 2), [0, 2])


# ---------------------------------------------------------------------------------------------
# Builders: layers from the taps, clear refusals before anything is compiled.

def taps(stages, per_stage=2):
  return tuple(Tap(f'layer{s}.{i}', s) for s in range(1, stages + 1) for i in range(per_stage))


def test_builders_use_stage_final_taps_and_refuse_unmatched_pairs():
  config = types.SimpleNamespace(batch_size=64)
  rkd = distill.create('reviewkd', config, taps(3), taps(3, 3), num_classes=10)
  assert (rkd.student_layers, rkd.teacher_layers) == ((1, 3, 5), (2, 5, 8))
  with pytest.raises(ValueError, match='student has 3 stages and the teacher 4'):
    distill.create('reviewkd', config, taps(3), taps(4), num_classes=10)
  sem = distill.create('semckd', config, taps(3), taps(4, 1), num_classes=10)
  assert (sem.student_layers, sem.teacher_layers, sem.batch_size) == ((1, 3, 5), (0, 1, 2, 3), 64)
  with pytest.raises(ValueError, match='batch size of at least 4'):
    distill.create('semckd', types.SimpleNamespace(batch_size=2), taps(3), taps(3),
                   num_classes=10)


# ---------------------------------------------------------------------------------------------
# SemCKD's layer weights in the attention plots (afd_jax.viz, afd_jax.visualize)

def test_semckd_attention_is_labelled_with_its_taps_and_drawn_in_chunks(tmp_path):
  from afd_jax import visualize, viz  # pylint: disable=g-import-not-at-top
  module = distill.create('semckd', types.SimpleNamespace(batch_size=4), taps(1), taps(2),
                          num_classes=10)
  s_names, t_names = [t.name for t in taps(1)], [t.name for t in taps(2)]
  assert viz.link_labels(module, t_names, s_names) == (['layer1.1', 'layer2.1'], ['layer1.1'])
  rng = np.random.default_rng(1)
  maps = lambda n: [jnp.asarray(rng.random((8, 2, 2, 3)), jnp.float32) for _ in range(n)]
  student, teacher = maps(2), maps(4)

  def both(s, t):  # the whole batch in chunks of 4, and the two halves by hand
    v = module.init(jax.random.PRNGKey(0), [f[:4] for f in s], [f[:4] for f in t], train=False)
    halves = [module.apply(v, [f[i:i + 4] for f in s], [f[i:i + 4] for f in t],
                           train=False)[1] for i in (0, 4)]
    return visualize.distiller_attention(module, v, s, t), jnp.concatenate(halves)

  attention, halves = run_once(both, student, teacher)
  assert attention.shape == (8, 2, 1)
  np.testing.assert_allclose(attention, halves, rtol=1e-6)
  np.testing.assert_allclose(np.sum(attention, axis=1), 1.0, rtol=1e-5)  # per student layer
  # Every tap's name (as the trainer passes them) does not fit: numbered labels, no error.
  viz.plot_attention(np.mean(attention, 0), t_names, s_names, str(tmp_path / 'a.png'))
  assert (tmp_path / 'a.png').stat().st_size > 1000
