"""CRD (afd_jax/distill/crd.py): two training steps against RepDistiller's `CRDLoss` (golden
vectors, torch-free), the banks' initial state, the negatives' distribution, the training
split's example indices in the data pipeline, the CRD+KD weights, the refusals, and an exact
resume of the banks through the trainer's checkpoints."""
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from afd_jax import checkpoint, distill, run_guard, sharding, step, train, weights
from afd_jax.distill.crd import CRD, sample_negatives
from afd_jax.errors import UserError
from configs import methods
from tests import runs
from tests.test_reference import assert_close
from tests.test_step import mesh_of

VECTORS = pathlib.Path(__file__).resolve().parent / 'reference' / 'method_crd.npz'


def test_two_steps_match_repdistiller_crdloss():
  """Loss, d loss / d student embedding, d loss / d both heads, both banks and Z after each of
  two steps (the second reads rows the first moved, and keeps the first step's Z)."""
  ref = dict(np.load(VECTORS))
  n = int(ref['n_data'])
  module = CRD(num_examples=n, feat_dim=int(ref['feat_dim']), nce_k=int(ref['nce_k']),
               nce_t=float(ref['nce_t']), nce_m=float(ref['nce_m']))
  head = lambda side: {'linear': {'kernel': jnp.asarray(ref[f'init/embed_{side}.linear.weight'].T),
                                  'bias': jnp.asarray(ref[f'init/embed_{side}.linear.bias'])}}
  params = {'embed_s': head('s'), 'embed_t': head('t')}
  stats = {'memory_student': jnp.asarray(ref['init/contrast.memory_v1']),
           'memory_teacher': jnp.asarray(ref['init/contrast.memory_v2']),
           'z_student': -jnp.ones(()), 'z_teacher': -jnp.ones(()),
           'labels': -jnp.ones((n,), jnp.int32)}

  def loss_fn(params, f_s, stats, f_t, index, labels, contrast):
    (loss, _), updates = module.apply(
        {'params': params, 'batch_stats': stats}, (), (), True, student_embedding=f_s,
        teacher_embedding=f_t, index=index, labels=labels, contrast_index=contrast,
        mutable=['batch_stats'])
    return loss, updates['batch_stats']

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
  for k in (1, 2):
    r = {name[len(f'step{k}/'):]: v for name, v in ref.items()
         if name.startswith(f'step{k}/')}
    (loss, stats), (g_params, g_f_s) = grad_fn(params, r['f_s'], stats, r['f_t'], r['index'],
                                               r['labels'], r['contrast_idx'])
    assert_close(loss, r['loss'], f'step {k} loss')
    assert_close(g_f_s, r['grad_f_s'], f'step {k} d/d f_s')
    for side in ('s', 't'):
      g = g_params[f'embed_{side}']['linear']
      assert_close(g['kernel'].T, r[f'grad/embed_{side}.linear.weight'], f'step {k} W_{side}')
      assert_close(g['bias'], r[f'grad/embed_{side}.linear.bias'], f'step {k} b_{side}')
    assert_close(stats['memory_student'], r['memory_v1'], f'step {k} memory_v1')
    assert_close(stats['memory_teacher'], r['memory_v2'], f'step {k} memory_v2')
    assert_close(jnp.stack([stats['z_student'], stats['z_teacher']]), r['z'], f'step {k} Z')
    labels = np.full(n, -1)
    labels[ref['step1/index']] = ref['step1/labels']
    if k == 2:
      labels[r['index']] = r['labels']
    np.testing.assert_array_equal(stats['labels'], labels)


def test_initial_state_and_inference_mode():
  module = CRD(num_examples=40, feat_dim=12, nce_k=7)
  rng = np.random.default_rng(0)
  inputs = dict(student_embedding=jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
                teacher_embedding=jnp.asarray(rng.normal(size=(4, 9)), jnp.float32),
                index=jnp.arange(4, dtype=jnp.int32), labels=jnp.array([0, 1, 2, 0], jnp.int32),
                rng=jax.random.PRNGKey(3))
  variables = jax.jit(lambda i: module.init(jax.random.PRNGKey(0), (), (), False, **i))(inputs)
  stats = variables['batch_stats']
  bound = 1 / np.sqrt(12 / 3)  # crd/memory.py:19-21: U[-stdv, stdv), stdv = 1 / sqrt(dim / 3)
  for name in ('memory_student', 'memory_teacher'):
    bank = np.asarray(stats[name])
    assert bank.shape == (40, 12) and bank.dtype == np.float32
    assert -bound <= bank.min() < -0.8 * bound and 0.8 * bound < bank.max() < bound
  assert not np.array_equal(stats['memory_student'], stats['memory_teacher'])
  assert float(stats['z_student']) == float(stats['z_teacher']) == -1.0
  assert (np.asarray(stats['labels']) == -1).all()
  assert variables['params']['embed_s']['linear']['kernel'].shape == (5, 12)
  # Inference mode changes nothing; the loss is finite.
  apply = jax.jit(lambda v, i, train: module.apply(v, (), (), train, mutable=['batch_stats'], **i),
                  static_argnums=2)
  (loss, _), updates = apply(variables, inputs, False)
  assert np.isfinite(float(loss))
  jax.tree.map(np.testing.assert_array_equal, updates['batch_stats'], stats)
  # Training mode moves exactly the batch's rows, sets Z and learns the batch's labels.
  (_, _), updates = apply(variables, inputs, True)
  new = updates['batch_stats']
  moved = np.any(np.asarray(new['memory_student']) != np.asarray(stats['memory_student']), axis=1)
  np.testing.assert_array_equal(np.flatnonzero(moved), [0, 1, 2, 3])
  np.testing.assert_allclose(np.linalg.norm(new['memory_teacher'][:4], axis=1), 1, rtol=1e-6)
  assert float(new['z_student']) > 0 and float(new['z_teacher']) > 0
  np.testing.assert_array_equal(new['labels'][:5], [0, 1, 2, 0, -1])


def test_negatives_are_other_classes_drawn_uniformly():
  n = 30
  table = jnp.asarray(np.arange(n) % 3, jnp.int32)  # 10 examples per class, 20 negatives each
  labels = jnp.array([0, 1, 2, 0], jnp.int32)
  draw = jax.jit(sample_negatives, static_argnums=3)
  # k <= 20: without replacement, distinct, all of other classes.
  idx = np.asarray(draw(jax.random.PRNGKey(0), table, labels, 20))
  for row, c in zip(idx, labels):
    assert sorted(row) == sorted(np.flatnonzero(np.arange(n) % 3 != c))
  idx = np.asarray(draw(jax.random.PRNGKey(1), table, labels, 7))
  assert all(len(set(row)) == 7 and (np.asarray(table)[row] != c).all()
             for row, c in zip(idx, labels))
  # The key decides the draw: another key (the next step's), other negatives.
  assert not np.array_equal(idx, draw(jax.random.PRNGKey(4), table, labels, 7))
  # k > 20: with replacement, uniform over the 20 (chi-square over 40 rows x 50 draws).
  many = jnp.zeros(40, jnp.int32)
  idx = np.asarray(draw(jax.random.PRNGKey(2), table, many, 50))
  assert (np.asarray(table)[idx] != 0).all()
  counts = np.bincount(idx.ravel(), minlength=n)[np.arange(n) % 3 != 0]
  expected = idx.size / 20
  assert ((counts - expected) ** 2 / expected).sum() < 45  # chi2(19) 99.9th percentile: 43.8
  # Labels not seen yet (-1) are candidates of every class; known same-class ones never are.
  partial = jnp.where(jnp.arange(n) < 6, table, -1)
  idx = np.asarray(draw(jax.random.PRNGKey(3), partial, labels, 7))
  for row, c in zip(idx, labels):
    assert not np.isin(row, [i for i in range(6) if i % 3 == c]).any()
    assert len(set(row)) == 7


def test_crd_and_crd_plus_kd_weights_are_the_benchmarks():
  crd, both, at_kd = (methods.get_config(a) for a in ('crd', 'crd+kd', 'at+kd'))
  assert (crd.method, crd.loss.ce_weight, crd.loss.kd_weight, crd.loss.feature_weight) == (
      'crd', 1.0, 0.0, 0.8)  # scripts/run_cifar_distill.sh:29, -a 0 -b 0.8
  assert (both.method, both.loss.ce_weight, both.loss.kd_weight, both.loss.feature_weight,
          both.loss.kd_temperature) == ('crd', 1.0, 1.0, 0.8, 4.0)  # line 32, -a 1 -b 0.8
  assert at_kd.loss.kd_weight == 0.9


def test_refusals():
  config = methods.get_config('crd')
  with pytest.raises(ValueError, match=r"method 'crd' keeps a memory bank row per training "
                                       r'example .* unknown \(0\)'):
    distill.create('crd', config, (), (), num_classes=10, num_train_examples=0)
  with pytest.raises(ValueError, match=r"\(3,\) training labels for a split of 4 examples"):
    distill.create('crd', config, (), (), num_classes=10, num_train_examples=4,
                   train_labels=np.zeros(3))
  config.dataset.shuffle_buffer = 1000
  with pytest.raises(UserError) as e:
    run_guard.validate(config)
  assert "method 'crd' needs each example's index" in str(e.value)
  assert 'shuffle_buffer=0' in str(e.value) and '\n' not in str(e.value)


def digits_train(data_dir, **dataset):
  from afd_jax import data  # pylint: disable=g-import-not-at-top
  config = runs.tiny_config(data_dir, run='student')
  for k, v in dataset.items():
    config.dataset[k] = v
  return config, data


@pytest.mark.parametrize('cache', [True, False], ids=['decoded', 'encoded'])
def test_batches_carry_the_global_index_and_resume_with_it(digits_data_dir, cache):
  """Two shards of 501 and 500 examples (one process reading both, and each of two processes):
  every training image is the split's image at its `index` (no augmentation), on a restart
  too; each epoch's indices are distinct."""
  config, data = digits_train(digits_data_dir, augment='none', train_subset=1001, num_shards=2,
                              cache=cache, eval_split='train[:1001]')
  config.batch_size, config.eval_batch_size = 64, 1001
  info = data.dataset_info(config)
  split = next(data.eval_iterator(config, info, process_index=0, process_count=1))
  steps = data.steps_per_epoch(config, info, 1)
  assert steps == 15  # 500 // 32
  stream = lambda start, index=0, count=1: data.train_iterator(
      config, info, start_step=start, process_index=index, process_count=count)
  full = [b for _, b in zip(range(steps + 2), stream(0))]
  for b in full:
    assert b['index'].dtype == np.int32
    np.testing.assert_array_equal(b['label'], split['label'][b['index']])
    np.testing.assert_allclose(b['image'], split['image'][b['index']], rtol=0, atol=1e-6)
    assert (b['index'][:32] < 501).all() and (b['index'][32:] >= 501).all()  # shard order
  epoch = np.concatenate([b['index'] for b in full[:steps]])
  assert len(set(epoch)) == len(epoch)
  resumed = [b for _, b in zip(range(3), stream(steps - 1))]  # crosses the epoch end
  for a, b in zip(full[steps - 1:], resumed):
    np.testing.assert_array_equal(a['index'], b['index'])
    np.testing.assert_array_equal(a['image'], b['image'])
  second = next(stream(steps - 1, 1, 2))  # process 1 of 2 reads shard 1 alone
  np.testing.assert_array_equal(second['index'], full[steps - 1]['index'][32:])


def test_streamed_batches_have_no_index(digits_data_dir):
  config, data = digits_train(digits_data_dir, augment='none', shuffle_buffer=100)
  info = data.dataset_info(config)
  batch = next(data.train_iterator(config, info, start_step=0, process_index=0,
                                   process_count=1))
  assert set(batch) == {'image', 'label'}


def test_a_stopped_and_resumed_run_has_the_uninterrupted_banks(digits_data_dir, tmp_path):
  """The trainer's pieces on 8 devices (digits, 64 examples in two shards, 4 steps per epoch):
  one run of 6 steps; another stopped after 3, checkpointed, restored from the checkpoint and
  continued from a data stream restarted at step 3. Banks, Z, label table and the whole state
  are bit-equal; the label table is the split's labels from the start."""
  from afd_jax import data  # pylint: disable=g-import-not-at-top
  config = runs.tiny_config(digits_data_dir, batch_size=16, dataset__train_subset=64,
                            dataset__num_shards=2, student__name='tests.byo_models:tiny_convnet',
                            student__taps='auto')
  methods.set_method(config, 'crd')
  config.crd = ml_collections.ConfigDict({'feat_dim': 16, 'nce_k': 24})
  run_guard.validate(config)
  info = data.dataset_info(config)
  task = train.make_task(config, info, data.steps_per_epoch(config, info, 1))
  mesh = mesh_of(8)
  rep = sharding.replicated(mesh)
  teacher_vars = jax.device_put(weights.load_teacher(config, task.teacher, info.num_classes,
                                                     info.image_shape), rep)
  init = step.jit_init_state(task, mesh, info.image_shape, jax.eval_shape(lambda: teacher_vars))
  train_step = step.jit_train_step(task, mesh)

  def run(state, start, stop):
    stream = data.train_iterator(config, info, start_step=start, process_index=0,
                                 process_count=1)
    for _ in range(start, stop):
      state, _ = train_step(state, teacher_vars, sharding.global_batch(next(stream), mesh))
    return state

  # The trainer hands CRD the split's labels: its table holds every label from the first step,
  # each the label the stream gives with that index.
  labels = data.train_labels(config, info)
  start = init(jax.random.PRNGKey(0))
  np.testing.assert_array_equal(jax.device_get(start.batch_stats['distiller']['labels']), labels)
  stream = data.train_iterator(config, info, start_step=0, process_index=0, process_count=1)
  for _, batch in zip(range(4), stream):
    np.testing.assert_array_equal(labels[batch['index']], batch['label'])
  whole = run(start, 0, 6)
  ckpts = checkpoint.Checkpoints(str(tmp_path), keep=1, keep_best=False, async_save=False)
  ckpts.save(3, run(init(jax.random.PRNGKey(0)), 0, 3), {'step': 3})
  ckpts.close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                          jax.eval_shape(init, jax.random.PRNGKey(0)))
  restored, _ = checkpoint.Checkpoints(str(tmp_path), create=False).restore_latest(abstract)
  assert int(restored.step) == 3
  resumed = run(restored, 3, 6)
  banks = [jax.device_get(s.batch_stats['distiller']) for s in (whole, resumed)]
  assert sorted(banks[0]) == ['labels', 'memory_student', 'memory_teacher', 'z_student',
                              'z_teacher']
  for name in banks[0]:
    np.testing.assert_array_equal(banks[0][name], banks[1][name], err_msg=name)
  assert float(banks[0]['z_student']) > 0
  np.testing.assert_array_equal(banks[0]['labels'], labels)
  assert train.params_sha256(whole) == train.params_sha256(resumed)
