"""Several teachers at once (`config.teachers`): KD over their ensemble, AFD over the union of
their taps, each teacher with its own checkpoint, input statistics, dtype and placement, and
the refusals (a method that pairs one teacher with the student, class counts that differ)."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from jax.sharding import PartitionSpec as P

from afd_jax import checkpoint, distill, models, sharding, step, train
from afd_jax import task as task_lib
from afd_jax.distill.afd import AFD
from afd_jax.errors import UserError
from configs import base
from tests import runs
from tests.test_errors import cli_refuses
from tests.test_sharded_teacher import mesh_2x4
from tests.test_step import tiny_task, toy_batch


def softmax(x, t):
  e = np.exp(x / t - np.max(x / t, -1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_kd_over_teachers_is_the_kl_to_their_weighted_average_or_the_weighted_sum_of_kls():
  rng = np.random.default_rng(0)
  student, teachers = rng.normal(size=(5, 7)), 3 * rng.normal(size=(2, 5, 7))
  weights, t = (1.0, 3.0), 4.0
  q = softmax(student, t)
  kl = lambda p: t * t * np.sum(p * (np.log(p) - np.log(q))) / 5
  mean = 0.25 * softmax(teachers[0], t) + 0.75 * softmax(teachers[1], t)
  got = distill.ensemble_kd_loss(student, teachers, weights, t, 'average')
  np.testing.assert_allclose(got, kl(mean), rtol=1e-5)
  got = distill.ensemble_kd_loss(student, teachers, weights, t, 'sum')
  np.testing.assert_allclose(got, 0.25 * kl(softmax(teachers[0], t))
                             + 0.75 * kl(softmax(teachers[1], t)), rtol=1e-5)
  assert abs(kl(mean) - 0.25 * kl(softmax(teachers[0], t))
             - 0.75 * kl(softmax(teachers[1], t))) > 1e-3  # the two are different losses
  for over in distill.KD_OVER_TEACHERS:  # one teacher: Hinton's KD
    np.testing.assert_allclose(distill.ensemble_kd_loss(student, teachers[:1], (2.0,), t, over),
                               distill.kd_loss(student, teachers[0], t), rtol=1e-6)


def two_teacher_task():
  """resnet8 <- (a: resnet14 on its own input statistics, b: resnet8 in bfloat16), AFD + KD."""
  members = (models.create('resnet14', 4), models.create('resnet8', 4, dtype=jnp.bfloat16))
  ensemble = models.Ensemble(members, ('a', 'b'), (((2.0,) * 3, (0.5,) * 3), None))
  return dataclasses.replace(tiny_task(), teacher=ensemble, teacher_weights=(1.0, 3.0))


def test_an_ensemble_applies_each_teacher_to_its_own_input_and_labels_its_taps():
  ensemble = two_teacher_task().teacher
  images = jnp.asarray(toy_batch(np.random.default_rng(1))['image'])
  variables = ensemble.init(jax.random.PRNGKey(3), images)
  assert set(variables['params']) == {'a', 'b'} and set(variables['batch_stats']) == {'a', 'b'}
  logits, features = ensemble.apply(variables, images)
  own_a = ensemble.members[0].apply(ensemble.member_variables(variables, 0), images * 2 + 0.5,
                                    train=False)
  own_b = ensemble.members[1].apply(ensemble.member_variables(variables, 1), images, train=False)
  np.testing.assert_array_equal(logits[0], own_a[0])
  np.testing.assert_array_equal(logits[1], own_b[0])
  assert len(features) == len(own_a[1]) + len(own_b[1])
  for got, want in zip(features, own_a[1] + own_b[1]):
    np.testing.assert_array_equal(got, want)
  names = [t.name for t in ensemble.taps()]
  assert names[:2] == ['a:layer1.0', 'a:layer1.1'] and names[-1] == 'b:layer3.0', names
  stages = [t.stage for t in ensemble.taps()]
  assert stages == sorted(stages) and max(stages) == 6  # three stages each, numbered on


def test_a_two_teacher_step_is_kd_over_their_ensemble_plus_afd_over_the_union_of_their_taps():
  """The step's KD term is `ensemble_kd_loss` of each teacher's own logits, and its AFD term
  the AFD loss of the student's taps against both teachers' taps as one list (T = 6 + 3)."""
  task = two_teacher_task()
  batch = toy_batch(np.random.default_rng(2))
  images = jnp.asarray(batch['image'])
  teacher_vars = task.teacher.init(jax.random.PRNGKey(7), images[:2])
  state = step.init_state(task, jax.random.PRNGKey(0), (8, 8, 3),
                          jax.eval_shape(lambda: teacher_vars))
  _, metrics = jax.jit(step.make_train_step(task))(state, teacher_vars, batch)
  assert metrics['attention'].shape == (9, 3)

  @jax.jit
  def by_hand(images):  # each teacher alone, the student, then the two losses
    own = [task.teacher.member(k).apply(teacher_vars, images) for k in range(2)]
    s_logits, s_feats = task.student.apply(
        {'params': state.params['student'], 'batch_stats': state.batch_stats['student']},
        images, train=True, mutable=['batch_stats'])[0]
    kd = distill.ensemble_kd_loss(s_logits, jnp.stack([own[0][0], own[1][0]]), (1.0, 3.0), 4.0)
    (afd, _), _ = AFD(qk_dim=16).apply(
        {'params': state.params['distiller'], 'batch_stats': state.batch_stats['distiller']},
        s_feats, [f.astype(jnp.float32) for f in own[0][1] + own[1][1]], train=True,
        mutable=['batch_stats'])
    return kd, afd, distill.kd_loss(s_logits, own[1][0], 4.0)

  kd, afd, single = by_hand(images)
  np.testing.assert_allclose(metrics['kd'], kd, rtol=1e-5)
  np.testing.assert_allclose(metrics['afd'], afd, rtol=1e-5)
  assert abs(float(metrics['kd']) - float(single)) > 1e-4  # not the one teacher's KD


def test_each_teacher_is_placed_as_its_own_section_says():
  """`teachers[k].shard` splits that teacher over the model axis; the other stays replicated."""
  config = base.get_base_config()
  config.teachers = [base.teacher_entry('resnet14', label='a'),
                     base.teacher_entry('resnet8', label='b', shard=True)]
  ensemble = task_lib.build_teacher(config, 4, jnp.float32, (8, 8, 3))
  shapes = jax.eval_shape(lambda k: ensemble.init(k, jnp.zeros((2, 8, 8, 3))),
                          jax.random.PRNGKey(0))
  placed = train._teacher_placement(config, shapes, mesh_2x4())  # pylint: disable=protected-access
  specs = lambda tree: {s.spec for s in jax.tree.leaves(tree)}
  assert specs(placed['params']['a']) == {P()}
  assert P(None, None, None, sharding.MODEL) in specs(placed['params']['b'])


def test_two_teachers_train_from_their_checkpoints_and_plot_both_teachers_layers(
    digits_data_dir, tmp_path):
  """configs/digits.py:two_teachers, each teacher from an exported .msgpack: both evaluated
  under their labels, the attention's rows named `label:layer`, and a resume that continues."""
  paths = []
  for k, name in enumerate(('resnet20', 'resnet8')):
    model = models.create(name, 10)
    variables = model.init(jax.random.PRNGKey(k), jnp.zeros((2, 8, 8, 1)), train=False)
    paths.append(tmp_path / f'{name}.msgpack')
    paths[-1].write_bytes(serialization.msgpack_serialize(
        {'model': name, 'variables': jax.device_get(variables)}))
  args = [a for a in runs.flag_args(digits_data_dir, 'two_teachers', num_train_steps=2,
                                    checkpoint_every_steps=2)
          if not a.startswith('--config.teacher.')]
  args += [f'--config.teachers[{k}].checkpoint={p}' for k, p in enumerate(paths)]
  workdir = tmp_path / 'run'
  result = runs.cli_in_process(args, str(workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  summary = runs.summary(workdir)
  assert set(summary['teacher_eval']) == {'resnet20', 'resnet8'}
  with open(os.path.join(workdir, 'attention', 'taps.json')) as f:
    taps = json.load(f)
  assert taps['teacher'][0] == 'resnet20:layer1.0' and taps['teacher'][-1] == 'resnet8:layer3.0'
  attention = np.load(sorted((workdir / 'attention').glob('*.npy'))[-1])
  assert attention.shape == (len(taps['teacher']), len(taps['student']))
  args = [a.replace('num_train_steps=2', 'num_train_steps=3') for a in args]
  result = runs.cli_in_process(args, str(workdir))
  assert result.returncode == 0 and 'resumed from' in result.stdout + result.stderr, (
      result.stderr[-3000:])
  assert runs.summary(workdir)['final_step'] == 3


def test_a_method_that_pairs_one_teacher_with_the_student_refuses_two(digits_data_dir, tmp_path):
  args = [a for a in runs.flag_args(digits_data_dir, 'two_teachers', num_train_steps=1)
          if not a.startswith('--config.teacher.')]
  args += ['--config.method=fitnet', '--config.teachers[0].checkpoint=random',
           '--config.teachers[1].checkpoint=random']
  cli_refuses(args, tmp_path / 'w', "method 'fitnet' pairs one teacher with the student, and "
              'config.teachers has 2 (resnet20, resnet8)')
  assert not (tmp_path / 'w' / 'checkpoints').exists()


def test_teachers_whose_class_counts_differ_are_refused(digits_data_dir, tmp_path):
  paths = []
  for name, classes in (('resnet20', 10), ('resnet8', 5)):
    model = models.create(name, classes)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)), train=False)
    paths.append(tmp_path / f'{name}.msgpack')
    paths[-1].write_bytes(serialization.msgpack_serialize(
        {'model': name, 'variables': jax.device_get(variables)}))
  args = [a for a in runs.flag_args(digits_data_dir, 'two_teachers', num_train_steps=1)
          if not a.startswith('--config.teacher.')]
  args += [f'--config.teachers[{k}].checkpoint={p}' for k, p in enumerate(paths)]
  before = [p.read_bytes() for p in paths]
  cli_refuses(args, tmp_path / 'w', 'the teachers differ in class count (resnet20 10, '
              'resnet8 5)')
  assert [p.read_bytes() for p in paths] == before


@pytest.mark.parametrize('weight', [0.0, -1.0])
def test_a_teacher_weight_that_is_not_positive_is_refused(weight):
  config = base.get_base_config()
  config.method = 'none'
  config.teachers = [base.teacher_entry('resnet8'), base.teacher_entry('resnet14', weight=weight)]
  with pytest.raises(ValueError, match=r'^config.teachers weights must be positive'):
    task_lib.check_several_teachers(config)


def test_a_checkpoint_resumes_only_with_the_same_teachers():
  """The fingerprint holds the teachers' labels and names: one teacher's run, or other teachers,
  cannot resume a two-teacher checkpoint, nor the reverse."""
  config = base.get_base_config()
  one = checkpoint.fingerprint(config, 10, distil=True)
  config.teachers = [base.teacher_entry('resnet20'), base.teacher_entry('wrn16x2')]
  two = checkpoint.fingerprint(config, 10, distil=True)
  config.teachers[1].name = 'wrn40x2'
  other = checkpoint.fingerprint(config, 10, distil=True)
  checkpoint.check_compatible({'fingerprint': two}, two, 'w')
  for saved, expected in ((one, two), (two, one), (two, other)):
    with pytest.raises(UserError, match='teachers: checkpoint has'):
      checkpoint.check_compatible({'fingerprint': saved}, expected, 'w')
