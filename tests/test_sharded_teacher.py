"""Weights split over the mesh's `model` axis (`config.teacher.shard`, `config.student.shard`,
`sharding.fsdp`): which dimension each weight is split on, the bytes a device holds, the same
training steps as replicated, a checkpoint of a split state resumed on another mesh shape, and
the refusal of a model axis that divides no weight."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from afd_jax import bench, checkpoint, sharding, step, train
from afd_jax.errors import UserError
from afd_jax.models import vit
from tests import runs
from tests.test_step import assert_params_agree, setup, tiny_task, toy_batch


def mesh_2x4():
  return Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), (sharding.DATA, sharding.MODEL))


def test_each_weight_is_split_on_its_largest_dimension_that_the_model_axis_divides():
  shapes = {'conv': jax.ShapeDtypeStruct((3, 3, 16, 32), np.float32),
            'dense': jax.ShapeDtypeStruct((30, 12), np.float32),   # 30 does not divide by 4
            'bias': jax.ShapeDtypeStruct((10,), np.float32)}       # nothing divides: replicated
  specs = jax.tree.map(lambda s: s.spec, sharding.fsdp(shapes, mesh_2x4()))
  assert specs == {'conv': P(None, None, None, 'model'), 'dense': P(None, 'model'),
                   'bias': P()}


def test_a_split_teacher_and_train_state_hold_under_a_third_per_device_and_train_as_replicated():
  """resnet14 -> resnet8 with AFD and KD on a (2, 4) mesh: each device holds at most 0.3x the
  teacher's bytes and at most 0.35x the train state's (student, AFD, momentum), and two steps
  with the teacher split, or both, give the replicated losses and parameters within test_step's
  tolerances (XLA only gathers the weights and scatters the gradients: the same arithmetic up
  to float32 order)."""
  task, mesh = tiny_task(), mesh_2x4()
  state, teacher_vars = setup(task, mesh)
  assert_split_steps_equal_replicated(task, state, teacher_vars, toy_batch, ('teacher', 'both'))


def test_a_narrow_vit_l16_split_over_the_model_axis_trains_a_vit_student_as_replicated():
  """vit_l16 -> vit_s16 (their patch size and head counts, narrow blocks, 32x32 images) with
  AFD and KD on a (2, 4) mesh: the same bounds on the bytes per device, and two steps with the
  teacher and the train state split equal the replicated steps."""
  narrow = lambda name, **blocks: vit.ViT(num_classes=4, image_size=32,
                                          **{**vit.CONFIGS[name], **blocks})
  task = dataclasses.replace(tiny_task(), teacher=narrow('vit_l16', dim=64, depth=2, mlp_dim=128),
                             student=narrow('vit_s16', dim=48, depth=2, mlp_dim=96))
  mesh, images = mesh_2x4(), jnp.zeros((2, 32, 32, 3))
  teacher_vars = jax.jit(lambda k: task.teacher.init(k, images, train=False))(
      jax.random.PRNGKey(7))
  state = step.jit_init_state(task, mesh, (32, 32, 3), jax.eval_shape(lambda: teacher_vars))(
      jax.random.PRNGKey(0))
  assert_split_steps_equal_replicated(task, state, teacher_vars,
                                      lambda rng: toy_batch(rng, size=32), ('both',),
                                      moved_at_least=0.01)  # SGD moves a ViT less


def assert_split_steps_equal_replicated(task, state, teacher_vars, make_batch, splits,
                                        moved_at_least=0.1):
  """On a (2, 4) mesh: the teacher and the train state each hold at most 0.3x / 0.35x of their
  bytes per device when split, and two steps with each of `splits` ('teacher', 'state',
  'both') give the replicated steps' losses and parameters within test_step's tolerances."""
  mesh = mesh_2x4()
  teacher_split = sharding.fsdp(teacher_vars, mesh)
  state_split = sharding.fsdp(state, mesh, 'the student')
  assert (bench.bytes_per_device(jax.device_put(teacher_vars, teacher_split))
          <= 0.3 * bench.bytes_per_device(teacher_vars))
  assert (bench.bytes_per_device(jax.device_put(state, state_split))
          <= 0.35 * bench.bytes_per_device(state))
  rng = np.random.default_rng(0)
  batches = [sharding.global_batch(make_batch(rng), mesh) for _ in range(2)]
  placements = {'replicated': (None, None), 'teacher': (teacher_split, None),
                'state': (None, state_split), 'both': (teacher_split, state_split)}
  outcomes = {}
  for name in ('replicated',) + tuple(splits):
    teacher, placed = placements[name]
    train_step, history = step.jit_train_step(task, mesh, teacher, placed), []
    current = jax.device_put(jax.tree.map(lambda x: x.copy(), state),  # the step donates it
                             placed or sharding.replicated(mesh))
    variables = jax.device_put(teacher_vars, teacher or sharding.replicated(mesh))
    for batch in batches:
      current, metrics = train_step(current, variables, batch)
      history.append(jax.device_get(metrics))
    outcomes[name] = (jax.device_get(current.params), history)
  p_rep, h_rep = outcomes.pop('replicated')
  for p_split, h_split in outcomes.values():
    for a, b in zip(h_rep, h_split):
      for k in ('loss', 'ce', 'kd', 'afd'):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert_params_agree(p_rep, p_split, jax.device_get(state.params),  # test_step's tolerances
                        moved_at_least)


def test_a_model_axis_that_divides_no_weight_is_refused_in_one_line():
  shapes = {'a': jax.ShapeDtypeStruct((3, 5), np.float32),
            'b': jax.ShapeDtypeStruct((7,), np.float32)}
  with pytest.raises(UserError, match=r"^the mesh's model axis \(4 devices\) divides no "
                                      r'dimension of any weight of the teacher'):
    sharding.fsdp(shapes, mesh_2x4())


def test_a_checkpoint_saved_split_on_a_2x4_mesh_resumes_on_8x1_to_the_uninterrupted_state(
    digits_data_dir, tmp_path):
  """The trainer: 2 steps on a (2, 4) mesh with the teacher and the train state split, a
  checkpoint, then resumed replicated on (8, 1) to step 4. The teacher's evaluation equals the
  replicated one's, and the final parameters equal 4 uninterrupted steps on (8, 1) within
  test_step's tolerances, measured from step 1 (the split steps differ only in float32 order;
  this tiny run is chaotic enough that by step 5 two data-axis sizes alone exceed them)."""
  def config(mesh_shape, steps, shard):
    return runs.tiny_config(digits_data_dir, mesh_shape=mesh_shape, num_train_steps=steps,
                            checkpoint_every_steps=1, keep_checkpoints=4,
                            teacher__shard=shard, student__shard=shard)

  whole = train.train_and_evaluate(config((8, 1), 4, False), str(tmp_path / 'whole'))
  first = train.train_and_evaluate(config((2, 4), 2, True), str(tmp_path / 'split'))
  assert first['final_step'] == 2
  assert first['teacher_eval'] == whole['teacher_eval']
  resumed = train.train_and_evaluate(config((8, 1), 4, False), str(tmp_path / 'split'))
  assert resumed['final_step'] == 4
  assert resumed['state_sha256'] != first['state_sha256']
  assert_params_agree(_params_at(tmp_path / 'whole', 4), _params_at(tmp_path / 'split', 4),
                      _params_at(tmp_path / 'whole', 1), moved_at_least=0.01)
  np.testing.assert_allclose(resumed['eval']['loss'], whole['eval']['loss'], rtol=1e-4)


def _params_at(workdir, step_number):
  return checkpoint.Checkpoints(str(workdir), create=False).read_state(step_number)['params']
