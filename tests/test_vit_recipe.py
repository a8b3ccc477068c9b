"""The ViT recipe's step-side parts: mixup/cutmix with soft targets, label smoothing, the
teacher's own input statistics, the student's moving average, and an exact resume with them."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import run_guard, step, train
from afd_jax import task as task_lib
from afd_jax.distill import cross_entropy, soft_cross_entropy
from afd_jax.errors import UserError
from afd_jax.mixing import Mixing, mix_batch
from tests import runs


def _batch(b=6, h=8, w=10, c=2, seed=0):
  rng = np.random.RandomState(seed)
  return (jnp.asarray(rng.randn(b, h, w, c), jnp.float32),
          jnp.asarray(rng.randint(0, 5, b), jnp.int32))


def test_mixup_blends_each_image_with_its_mirror_in_the_batch_by_the_targets_lam():
  images, labels = jnp.asarray(_batch()[0]), jnp.asarray([0, 1, 2, 3, 4, 0])
  mixed, targets = mix_batch(images, labels, jax.random.PRNGKey(3), Mixing(mixup_alpha=0.8), 5)
  lam = float(targets[0, 0])  # example 0 is class 0, its mirror (example 5) class 0 too: 1.0
  assert lam == pytest.approx(1.0)
  lam = float(targets[1, 1])  # example 1 (class 1) mixed with example 4 (class 4)
  assert 0 < lam < 1 and float(targets[1, 4]) == pytest.approx(1 - lam, abs=1e-6)
  np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)


def test_cutmix_pastes_one_box_from_the_mirror_and_lam_is_the_share_left_outside_it():
  images, _ = _batch(h=16, w=12)
  labels = jnp.arange(6) % 5
  for seed in range(4):
    mixed, targets = mix_batch(images, labels, jax.random.PRNGKey(seed),
                               Mixing(cutmix_alpha=1.0), 5)
    pasted = np.asarray(jnp.all(mixed == images[::-1], axis=-1) & ~jnp.all(mixed == images, -1))
    kept = np.asarray(jnp.all(mixed == images, axis=-1))
    assert np.all(pasted | kept)  # every pixel is one or the other
    box = pasted[1]
    if box.any():  # a rectangle, the same in every image
      rows, cols = np.where(box)
      assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
      assert (pasted == box).all()
    lam = float(targets[1, labels[1]])
    assert lam == pytest.approx(1 - box.mean(), abs=1e-6)


def test_switch_prob_chooses_cutmix_or_mixup_and_prob_zero_never_mixes():
  images, labels = _batch()
  both = Mixing(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
  kinds = set()
  for seed in range(12):
    mixed, _ = mix_batch(images, labels, jax.random.PRNGKey(seed), both, 5)
    unchanged = np.asarray(jnp.all(mixed == images, axis=-1))
    kinds.add('cutmix' if unchanged.mean() > 0.01 else 'mixup')
  assert kinds == {'cutmix', 'mixup'}
  mixed, targets = mix_batch(images, labels, jax.random.PRNGKey(0),
                             Mixing(mixup_alpha=0.8, prob=0.0, label_smoothing=0.1), 5)
  np.testing.assert_array_equal(mixed, images)
  np.testing.assert_allclose(targets, jax.nn.one_hot(labels, 5) * 0.9 + 0.02, rtol=1e-6)


def test_soft_cross_entropy_is_cross_entropy_on_one_hots_and_timms_label_smoothing():
  logits = jnp.asarray(np.random.RandomState(1).randn(7, 5), jnp.float32)
  labels = jnp.asarray([0, 1, 2, 3, 4, 0, 1])
  assert float(soft_cross_entropy(logits, jax.nn.one_hot(labels, 5))) == pytest.approx(
      float(cross_entropy(logits, labels)), rel=1e-6)
  smoothing, logp = 0.1, jax.nn.log_softmax(logits)
  timm = (1 - smoothing) * cross_entropy(logits, labels) + smoothing * jnp.mean(-logp.mean(-1))
  _, targets = mix_batch(logits[:, None, None, :], labels, jax.random.PRNGKey(0),
                         Mixing(label_smoothing=smoothing), 5)
  assert float(soft_cross_entropy(logits, targets)) == pytest.approx(float(timm), rel=1e-6)


def test_bad_mixing_and_ema_settings_are_refused_in_one_line(digits_data_dir):
  for key, value, words in (('mixup.mixup_alpha', -0.1, 'mixup.mixup_alpha must be >= 0'),
                            ('mixup.switch_prob', 1.5, 'mixup.switch_prob must be in [0, 1]'),
                            ('loss.label_smoothing', 1.0, 'label_smoothing must be in [0, 1)'),
                            ('ema_decay', 1.0, 'ema_decay must be in [0, 1)')):
    config = runs.tiny_config(digits_data_dir, **{key.replace('.', '__'): value})
    with pytest.raises(UserError, match=re.escape(words)) as e:
      run_guard.validate(config)
    assert '\n' not in str(e.value)


def test_teacher_input_turns_the_students_normalisation_into_the_teachers(digits_data_dir):
  config = runs.tiny_config(digits_data_dir)
  config.dataset.mean, config.dataset.std = (0.3,), (0.2,)
  config.teacher.mean, config.teacher.std = (0.5,), (0.25,)
  scale, shift = task_lib.teacher_input(config)
  raw = np.linspace(0, 1, 11)  # x / 255
  student = (raw - 0.3) / 0.2
  np.testing.assert_allclose(student * scale[0] + shift[0], (raw - 0.5) / 0.25, rtol=1e-6)
  config.teacher.mean, config.teacher.std = (0.3,), (0.2,)
  assert task_lib.teacher_input(config) is None  # the same statistics: nothing to do
  config.teacher.mean, config.teacher.std = (0.5, 0.5), (0.2, 0.2)
  with pytest.raises(ValueError, match='one value per channel'):
    task_lib.teacher_input(config)


def test_the_moving_average_follows_timms_recursion_and_is_absent_when_off(digits_data_dir,
                                                                           tmp_path):
  summaries = {}
  for decay in (0.0, 0.9):
    config = runs.tiny_config(digits_data_dir, num_train_steps=3, ema_decay=decay)
    summaries[decay] = train.train_and_evaluate(config, str(tmp_path / str(decay)))
  plain, averaged = summaries[0.0], summaries[0.9]
  assert 'ema_top1' not in plain['eval'] and 'ema_top1' in averaged['eval']
  assert plain['params_sha256'] == averaged['params_sha256']  # the average changes no training
  assert plain['state_sha256'] != averaged['state_sha256']


def test_ema_update_is_decay_times_average_plus_the_rest_times_new():
  task = task_lib.Task(student=None, tx=None, schedule=None, ema_decay=0.75)
  ema = {'params': {'w': jnp.ones(3)}, 'batch_stats': {}}
  new = step.moving_average(task, ema, {'student': {'w': jnp.full(3, 5.0)}},
                            {'student': {}})
  np.testing.assert_allclose(new['params']['w'], 0.75 * 1 + 0.25 * 5, rtol=1e-6)


RECIPE = dict(mixup__mixup_alpha=0.8, mixup__cutmix_alpha=1.0, loss__label_smoothing=0.1,
              dataset__randaugment_ops=2, dataset__random_erasing=0.25, ema_decay=0.99,
              checkpoint_every_steps=3, eval_batch_size=360)


def test_a_stopped_and_resumed_run_with_the_vit_recipe_ends_in_the_uninterrupted_state(
    digits_data_dir, tmp_path):
  """Mixup, CutMix, RandAugment, random erasing, label smoothing and the moving average on:
  6 steps in two runs (stopped at 3) end with the state_sha256 of 6 steps in one."""
  whole = train.train_and_evaluate(runs.tiny_config(digits_data_dir, num_train_steps=6,
                                                    **RECIPE), str(tmp_path / 'whole'))
  first = train.train_and_evaluate(runs.tiny_config(digits_data_dir, num_train_steps=3,
                                                    **RECIPE), str(tmp_path / 'split'))
  assert first['final_step'] == 3
  resumed = train.train_and_evaluate(runs.tiny_config(digits_data_dir, num_train_steps=6,
                                                      **RECIPE), str(tmp_path / 'split'))
  assert resumed['final_step'] == 6
  assert resumed['state_sha256'] == whole['state_sha256']
  plain = train.train_and_evaluate(runs.tiny_config(digits_data_dir, num_train_steps=6,
                                                    checkpoint_every_steps=3),
                                   str(tmp_path / 'plain'))
  assert plain['params_sha256'] != whole['params_sha256']  # the recipe did act


def test_a_checkpoint_written_before_the_state_had_ema_still_restores(tmp_path):
  """Runs checkpointed before TrainState gained `ema` resume: their state is read into the
  fields it has, with an empty average."""
  import flax  # pylint: disable=g-import-not-at-top
  from afd_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from afd_jax.state import TrainState  # pylint: disable=g-import-not-at-top

  @flax.struct.dataclass
  class Before:
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: tuple
    rng: jax.Array

  old = Before(step=jnp.asarray(4, jnp.int32), params={'student': {'w': jnp.arange(3.0)},
                                                       'distiller': {}},
               batch_stats={'student': {}, 'distiller': {}}, opt_state=(jnp.ones(3),),
               rng=jax.random.PRNGKey(1))
  saving = checkpoint.Checkpoints(str(tmp_path), 3, False)
  saving.save(4, old, {'fingerprint': {}})
  saving.close()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        TrainState(**{k: getattr(old, k) for k in
                                      ('step', 'params', 'batch_stats', 'opt_state', 'rng')}))
  state, _ = checkpoint.Checkpoints(str(tmp_path), create=False).restore_latest(target)
  assert isinstance(state, TrainState) and state.ema == {} and int(state.step) == 4
  np.testing.assert_array_equal(state.params['student']['w'], [0.0, 1.0, 2.0])


@pytest.mark.parametrize('overrides, message', [
    ({'optimizer__name': 'lamb'}, 'optimizer.name must be one of sgd, adamw'),
    ({'mixup__mixup_alpha': -0.5}, 'mixup.mixup_alpha must be >= 0'),
    ({'method': 'deit_hard'}, "method 'deit_hard' distils into a distillation token, which "
                              "student 'resnet8' has not; students that have one: deit_ti16"),
])
def test_the_cli_refuses_bad_recipe_settings_in_one_line(digits_data_dir, tmp_path, overrides,
                                                         message):
  from tests.test_errors import cli_refuses  # pylint: disable=g-import-not-at-top
  args = runs.flag_args(digits_data_dir, num_train_steps=1, **overrides)
  cli_refuses(args, tmp_path / 'w', message)
  assert not (tmp_path / 'w' / 'checkpoints').exists()


@pytest.mark.parametrize('method', ['afd', 'sp', 'deit_soft'])
def test_feature_methods_train_a_deit_student_on_its_patch_tokens(method):
  """Every method works with a DeiT student: its taps are the patch tokens (both prefix tokens
  dropped); one step of each gives finite losses and moves the student."""
  from afd_jax import bench, sharding  # pylint: disable=g-import-not-at-top
  from tests.test_methods import mesh8  # pylint: disable=g-import-not-at-top
  image = (8, 8, 3)
  task = task_lib.task_from_config(bench.bench_config(method, 'resnet8', 'deit_micro4', qk_dim=8),
                                   4, 1, jnp.float32, image, num_train_examples=16)
  assert [t.name for t in task.student.taps()] == [f'blocks.{i}' for i in range(4)]
  mesh = mesh8()
  teacher_vars = jax.jit(lambda k: task.teacher.init(k, jnp.zeros((2,) + image), train=False))(
      jax.random.PRNGKey(1))
  state = step.jit_init_state(task, mesh, image, jax.eval_shape(lambda: teacher_vars))(
      jax.random.PRNGKey(0))
  before = jax.device_get(state.params['student'])
  rng = np.random.default_rng(0)
  batch = sharding.global_batch({'image': rng.normal(size=(16,) + image).astype(np.float32),
                                 'label': rng.integers(0, 4, 16).astype(np.int32),
                                 'index': np.arange(16, dtype=np.int32)}, mesh)
  state, metrics = step.jit_train_step(task, mesh)(state, teacher_vars, batch)
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics[method]) and metrics[method] > 0 and np.isfinite(metrics['loss'])
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), before,
                       jax.device_get(state.params['student']))
  assert any(jax.tree.leaves(moved))
