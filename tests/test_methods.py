"""Every registered classification method trains end to end on 8 devices (one sharded XLA step).

For each method of `distill.registry` that distils classification (segmentation's:
tests/test_segmentation_train.py): a tiny teacher/student pair on 8 fake CPU devices, the
method's own pre-training stage first where it has one, then main steps on one fixed batch.
Every loss term is finite, the stage's loss falls and it leaves unchanged what it does not
train, the method's parameters and state move in the main stage where it acts there, and the
objective falls on that batch. Parity with each original implementation: tests/test_reference.py
(AFD), tests/test_parity_classic.py (FitNet, AT, SP, KD), test_parity_links.py (DKD, SemCKD,
ReviewKD), test_parity_relational.py (PKT, RKD, CC, NST, VID), test_parity_pretrain_methods.py
(AB, FT, FSP) and test_crd.py (CRD).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from afd_jax import bench, distill, sharding, step
from afd_jax import task as task_lib

IMAGE = (8, 8, 3)
CLASSES = 4
BATCH = 16
TRAIN_EXAMPLES = 64


def mesh8():
  return Mesh(np.asarray(jax.devices()[:8]).reshape(8, 1), (sharding.DATA, sharding.MODEL))


def task_for(method: str) -> task_lib.Task:
  # DeiT's methods distil into a distillation token: a student that has one.
  distilled = method != 'none' and distill.registry.get(method).needs_distillation_token
  student = 'deit_mini4' if distilled else 'resnet8'
  config = bench.bench_config(method, 'resnet14', student, qk_dim=16)
  config.optimizer.learning_rate = 0.005
  config.pretrain = bench.namespace({'epochs': 2})  # two steps of the stage at 1 step/epoch
  # At one step per epoch a warm-up would grow the loss term over these few steps.
  config.reviewkd = bench.namespace({'warmup': 0.0})
  config.dkd = bench.namespace({**distill.registry.get('dkd').options, 'warmup': 1.0})
  return task_lib.task_from_config(config, CLASSES, 1, jnp.float32, IMAGE,
                               num_train_examples=TRAIN_EXAMPLES)


def fixed_batch():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, CLASSES, BATCH)
  images = 0.3 * rng.normal(size=(BATCH,) + IMAGE)
  for i, c in enumerate(labels):  # learnable: the class is the brightest quadrant
    r, col = divmod(int(c), 2)
    images[i, 4 * r:4 * r + 4, 4 * col:4 * col + 4] += 1.5
  return {'image': images.astype(np.float32), 'label': labels.astype(np.int32),
          'index': rng.permutation(TRAIN_EXAMPLES)[:BATCH].astype(np.int32)}


@pytest.mark.parametrize('method', distill.registry.for_task('classification')[1:])
def test_method_trains_on_eight_devices(method):
  task, mesh = task_for(method), mesh8()
  rep = sharding.replicated(mesh)
  teacher_vars = jax.device_put(jax.jit(lambda k: task.teacher.init(
      k, jnp.zeros((2,) + IMAGE), train=False))(jax.random.PRNGKey(1)), rep)
  state = step.jit_init_state(task, mesh, IMAGE, jax.eval_shape(lambda: teacher_vars))(
      jax.random.PRNGKey(0))
  batch = sharding.global_batch(fixed_batch(), mesh)
  pre = []
  if task.pretrain is not None:
    before = jax.device_get(state.params)
    pretrain_step = step.jit_pretrain_step(task, mesh)
    for _ in range(task.pretrain_steps):
      state, m = pretrain_step(state, teacher_vars, batch)
      pre.append(jax.device_get(m))
    assert int(state.step) == 2
    assert all(np.isfinite(m['pretrain']) for m in pre), pre
    assert pre[-1]['pretrain'] < pre[0]['pretrain'], [m['pretrain'] for m in pre]
    # What the stage does not train stays as it was: the classifier, and the student body or
    # distiller groups it does not name.
    after, spec = jax.device_get(state.params), task.pretrain
    unchanged = lambda a, b: all(np.array_equal(x, y) for x, y in zip(
        jax.tree.leaves(a), jax.tree.leaves(b)))
    assert unchanged(after['student']['fc'], before['student']['fc'])
    assert unchanged(after['student'], before['student']) == ('student_body' not in spec.trains)
    for group in before['distiller']:
      if 'distiller' not in spec.trains or (spec.distiller_params
                                            and group not in spec.distiller_params):
        assert unchanged(after['distiller'][group], before['distiller'][group]), group
  frozen = jax.device_get(state.params['distiller'])
  train_step = step.jit_train_step(task, mesh)
  stats0 = jax.device_get(state.batch_stats['distiller'])
  history = []
  for _ in range(4):
    state, m = train_step(state, teacher_vars, batch)
    history.append(jax.device_get(m))
  assert train_step._cache_size() == 1  # pylint: disable=protected-access  (one compilation)
  # The method's own parameters (where it has any and acts in the main stage) learn, and its
  # state (batch statistics, memory banks) moves in training.
  after = jax.device_get(state.params['distiller'])
  if jax.tree.leaves(after) and task.feature_weight:
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after),
                                                        jax.tree.leaves(frozen)))
  stats = jax.device_get(state.batch_stats['distiller'])
  if jax.tree.leaves(stats) and task.feature_weight:
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stats),
                                                        jax.tree.leaves(stats0)))
  for group in (task.pretrain.frozen_after if task.pretrain is not None else ()):
    for x, y in zip(jax.tree.leaves(frozen[group]),
                    jax.tree.leaves(jax.device_get(state.params['distiller'][group]))):
      np.testing.assert_array_equal(x, y)  # left as the stage left it
  for m in history:
    terms = {k: float(v) for k, v in m.items() if np.ndim(v) == 0}
    assert all(np.isfinite(v) for v in terms.values()), terms
  # The method's term is computed in the main stage, unless its weight there is 0 (AB, FSP).
  assert (method in history[0]) == (task.feature_weight != 0)
  assert history[-1]['loss'] < history[0]['loss'], [float(m['loss']) for m in history]
