"""Every config file builds, for every argument it documents, and passes the trainer's checks;
every benchmark pair and method is covered, the methods' weights and the schedule follow the
documented recipes, and bad arguments are refused clearly."""
import importlib
import itertools

import pytest

from afd_jax import models, run_guard
from afd_jax import task as task_lib
from configs import cifar100, deit, digits, imagenet, methods, quickstart, transfer

STABLE_NAMES = ('dataset.name', 'teacher.name', 'teacher.checkpoint', 'student.name', 'method',
                'seed', 'num_epochs', 'batch_size', 'dtype')


def configs():
  """(label, config) for every documented argument of every config file."""
  for (teacher, student), method in itertools.product(
      cifar100.PAIRS, ('none', 'kd', 'afd', 'fitnet', 'at', 'sp', 'at+kd')):
    arg = f'teacher={teacher},student={student},method={method}'
    yield f'cifar100.py:{arg}', cifar100.get_config(arg)
  for model in sorted({m for pair in cifar100.PAIRS for m in pair}):
    yield f'cifar100.py:model={model}', cifar100.get_config(f'model={model}')
  for method in ('afd', 'kd', 'none'):
    yield f'imagenet.py:method={method}', imagenet.get_config(f'method={method}')
  yield 'imagenet.py:model=resnet34im', imagenet.get_config('model=resnet34im')
  for dataset, method in itertools.product(transfer.DATASETS, ('afd', 'kd')):
    yield f'transfer.py:dataset={dataset},method={method}', transfer.get_config(
        f'dataset={dataset},method={method}')
    yield f'transfer.py:dataset={dataset},model=resnet34im', transfer.get_config(
        f'dataset={dataset},model=resnet34im')
  for run in quickstart.RUNS:
    yield f'quickstart.py:{run}', quickstart.get_config(run)
    yield f'quickstart.py:{run},seed=2', quickstart.get_config(f'{run},seed=2')
  for run in digits.RUNS:
    yield f'digits.py:{run}', digits.get_config(run)
  for method in methods.choices():
    yield f'methods.py:{method}', methods.get_config(method)
  for recipe, method in itertools.product(deit.RECIPES, ('deit_hard', 'deit_soft', 'none', 'kd',
                                                        'afd', 'sp')):
    yield f'deit.py:recipe={recipe},method={method}', deit.get_config(
        f'recipe={recipe},method={method}')
  fashion = importlib.import_module('configs.fashion_mnist')
  for method in fashion.METHODS:
    yield f'fashion_mnist.py:method={method}', fashion.get_config(f'method={method},seed=1')
  for variant in fashion.VARIANTS:  # 'method@key=value', the study's runs beside its protocol
    method, _, extra = variant.partition('@')
    yield f'fashion_mnist.py:method={method},{extra}', fashion.get_config(
        f'method={method},seed=1,{extra}')


ALL = list(configs())


@pytest.mark.parametrize('label, config', ALL, ids=[label for label, _ in ALL])
def test_config_builds_and_validates(label, config):
  for key in STABLE_NAMES:
    node = config
    for part in key.split('.'):
      node = node[part]
  run_guard.validate(config)
  assert config.student.name in models.names()
  if task_lib.is_distillation(config):
    assert config.teacher.name in models.names()
    assert config.name and config.num_epochs > 0, label
  # A locked config (as the CLI builds it) refuses a misspelt key.
  config.lock()
  with pytest.raises(AttributeError):
    config.studnet = 1


@pytest.mark.parametrize('key', ['log_every_steps', 'eval_every_epochs'])
def test_a_period_of_zero_is_refused(key):
  config = digits.get_config('afd')
  config[key] = 0
  with pytest.raises(run_guard.UserError, match=f'{key} must be positive, got 0'):
    run_guard.validate(config)


def test_every_benchmark_pair_and_method_is_covered():
  labels = {label for label, _ in ALL}
  for teacher, student in cifar100.PAIRS:
    for method in ('none', 'kd', 'afd'):
      assert f'cifar100.py:teacher={teacher},student={student},method={method}' in labels
    assert f'cifar100.py:model={teacher}' in labels


def test_method_weights_follow_the_documented_recipes():
  afd = cifar100.get_config('method=afd')
  assert (afd.loss.ce_weight, afd.loss.kd_weight, afd.loss.kd_temperature,
          afd.loss.feature_weight, afd.afd.qk_dim) == (1.0, 0.9, 4.0, 200.0, 128)
  assert (afd.num_epochs, afd.batch_size, afd.optimizer.learning_rate,
          tuple(afd.optimizer.decay_epochs), afd.optimizer.weight_decay) == (
              240, 64, 0.05, (150, 180, 210), 5e-4)
  at = cifar100.get_config('method=at')
  assert (at.loss.ce_weight, at.loss.kd_weight, at.loss.feature_weight) == (1.0, 0.0, 1000.0)
  kd = cifar100.get_config('method=kd')
  assert (kd.method, kd.loss.ce_weight, kd.loss.kd_weight) == ('none', 0.1, 0.9)
  alone = cifar100.get_config('model=resnet56')
  assert (alone.method, alone.loss.kd_weight, alone.student.name) == ('none', 0.0, 'resnet56')
  assert not task_lib.is_distillation(alone)
  im = imagenet.get_config('method=afd')
  assert (im.loss.feature_weight, im.batch_size, im.optimizer.learning_rate,
          tuple(im.optimizer.decay_epochs)) == (50.0, 256, 0.1, (31, 61, 91))


@pytest.mark.parametrize('module, arg, message', [
    (cifar100, 'teacher=wrn40x2,bogus=1', 'cifar100.py takes'),
    (transfer, 'dataset=flowers', 'dataset must be one of'),
    (quickstart, 'nope', 'quickstart.py takes one of'),
    (quickstart, 'afd,bogus=1', 'quickstart.py:<run> takes'),
    (digits, 'nope', 'digits.py takes one of'),
    (deit, 'recipe=cifar', 'recipe must be one of imagenet, small'),
])
def test_bad_arguments_are_clear(module, arg, message):
  with pytest.raises(ValueError, match=message):
    module.get_config(arg)


def test_schedule_decays_from_the_official_epochs():
  from afd_jax import optim  # pylint: disable=g-import-not-at-top
  c = cifar100.get_config('method=afd')
  schedule = optim.learning_rate_schedule(c.optimizer, 10, c.num_epochs)
  # Epoch e (1-based) starts at step (e - 1) * 10: 0.05 through epoch 149, then x0.1.
  assert abs(float(schedule(148 * 10 + 9)) - 0.05) < 1e-9
  assert abs(float(schedule(149 * 10)) - 0.005) < 1e-9
  assert abs(float(schedule(179 * 10)) - 0.0005) < 1e-10
  assert abs(float(schedule(209 * 10)) - 0.00005) < 1e-11


def test_deit_recipes_are_deits_and_pick_a_student_with_a_token_for_deits_methods():
  c = deit.get_config('recipe=imagenet,method=deit_hard')
  assert (c.student.name, c.teacher.name, c.method) == ('deit_s16', 'resnet50im', 'deit_hard')
  assert (c.loss.ce_weight, c.loss.kd_weight, c.loss.feature_weight) == (0.5, 0.0, 0.5)
  assert (c.optimizer.name, c.optimizer.learning_rate, c.optimizer.lr_batch_scale) == (
      'adamw', 5e-4, 512)
  assert (c.mixup.mixup_alpha, c.mixup.cutmix_alpha, c.dataset.random_erasing) == (0.8, 1.0, 0.25)
  assert (c.dataset.randaugment_ops, c.student.drop_path_rate, c.num_epochs) == (2, 0.1, 300)
  assert deit.get_config('recipe=imagenet,method=kd').student.name == 'vit_s16'
  assert deit.get_config('recipe=small,method=deit_soft').student.name == 'deit_micro4'
  assert deit.get_config('recipe=small,method=afd').student.name == 'vit_micro4'
