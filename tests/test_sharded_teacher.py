"""A teacher split over the mesh's `model` axis (`config.teacher.shard`, `sharding.fsdp`): which
dimension each weight is split on, the bytes a device holds, the same training steps as with
the teacher replicated, and the refusal of a model axis that divides no weight."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from afd_jax import bench, sharding, step, train
from afd_jax.errors import UserError
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


def test_a_sharded_teacher_holds_a_quarter_per_device_and_trains_as_a_replicated_one():
  """resnet14 -> resnet8 with AFD and KD on a (2, 4) mesh: each device holds at most 0.3x the
  teacher's bytes, and two steps give the replicated teacher's losses and parameters within
  test_step's tolerances (XLA only gathers the weights: the same arithmetic up to float32
  order)."""
  task, mesh = tiny_task(), mesh_2x4()
  state, teacher_vars = setup(task, mesh)
  placement = sharding.fsdp(teacher_vars, mesh)
  sharded_vars = jax.device_put(teacher_vars, placement)
  assert bench.bytes_per_device(sharded_vars) <= 0.3 * bench.bytes_per_device(teacher_vars)
  rng = np.random.default_rng(0)
  batches = [sharding.global_batch(toy_batch(rng), mesh) for _ in range(2)]
  runs = {}
  for name, variables, placed in (('replicated', teacher_vars, None),
                                  ('sharded', sharded_vars, placement)):
    train_step, history = step.jit_train_step(task, mesh, placed), []
    current = jax.tree.map(lambda x: x.copy(), state)  # the step donates its state
    for batch in batches:
      current, metrics = train_step(current, variables, batch)
      history.append(jax.device_get(metrics))
    runs[name] = (jax.device_get(current.params), history)
  (p_rep, h_rep), (p_sh, h_sh) = runs['replicated'], runs['sharded']
  for a, b in zip(h_rep, h_sh):
    for k in ('loss', 'ce', 'kd', 'afd'):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
  assert_params_agree(p_rep, p_sh, jax.device_get(state.params))  # test_step's tolerances


def test_a_model_axis_that_divides_no_weight_is_refused_in_one_line():
  shapes = {'a': jax.ShapeDtypeStruct((3, 5), np.float32),
            'b': jax.ShapeDtypeStruct((7,), np.float32)}
  with pytest.raises(UserError, match=r"^the mesh's model axis \(4 devices\) divides no "
                                      r'dimension of any weight of the teacher'):
    sharding.fsdp(shapes, mesh_2x4())


def test_a_run_with_the_teacher_sharded_trains_and_evaluates_as_a_replicated_one(
    digits_data_dir, tmp_path):
  """The trainer on a (2, 4) mesh with `teacher.shard`: the teacher's evaluation and the
  student's training and evaluation after a few steps match the same run with the teacher
  replicated."""
  summaries = {}
  for shard in (False, True):
    config = runs.tiny_config(digits_data_dir, mesh_shape=(2, 4), num_train_steps=3,
                              teacher__shard=shard)
    summaries[shard] = train.train_and_evaluate(config, str(tmp_path / f'shard-{shard}'))
  replicated, sharded = summaries[False], summaries[True]
  assert sharded['status'] == 'finished' and sharded['final_step'] == 3
  assert sharded['teacher_eval'] == replicated['teacher_eval']
  np.testing.assert_allclose(sharded['eval']['loss'], replicated['eval']['loss'], rtol=1e-4)
  np.testing.assert_allclose(sharded['train']['loss'], replicated['train']['loss'], rtol=1e-4)
