"""The method registry is the one place that knows what a method needs: reserved names are
refused with their reason, methods registered after import appear everywhere that lists
methods, per-pair recipe settings come from the registration, and the step's Task records an
attention exactly for the methods that declare one (`Method.attention`)."""
import pytest

from afd_jax import bench, distill
from afd_jax import task as task_lib
from afd_jax.distill import registry
from configs import cifar100, imagenet, methods


@pytest.mark.parametrize('name', ['none', 'kd'])
def test_reserved_names_are_refused_as_reserved(name):
  with pytest.raises(ValueError, match=f"'{name}' is a reserved method name"):
    registry.register(registry.Method(name, build=lambda c, s: None, feature_weight=1.0))


def test_a_second_registration_is_refused():
  with pytest.raises(ValueError, match="'afd' is already registered"):
    registry.register(registry.Method('afd', build=lambda c, s: None, feature_weight=1.0))


@pytest.fixture
def late_method():
  """A method registered after every module imported the registry (a fork's own file)."""
  method = registry.register(registry.Method('late_test_method', build=lambda c, s: None,
                                             feature_weight=7.0))
  yield method
  del registry._METHODS[method.name]  # pylint: disable=protected-access


def test_methods_registered_after_import_are_listed_everywhere(late_method):
  assert late_method.name not in registry.names()[:1]
  assert late_method.name in registry.registered()
  assert late_method.name in distill.METHODS
  assert distill.DEFAULT_FEATURE_WEIGHT[late_method.name] == 7.0
  assert late_method.name in methods.choices()
  assert late_method.name in bench.method_names()
  assert bench.bench_config(late_method.name, 'resnet20', 'resnet8').loss.feature_weight == 7.0


def test_registered_excludes_none():
  assert 'none' not in registry.registered()
  assert registry.names() == ('none',) + registry.registered()


@pytest.mark.parametrize('arg, key, expected', [
    ('teacher=wrn40x2,student=wrn16x2,method=dkd', 'dkd.beta', 6.0),
    ('teacher=resnet56,student=resnet20,method=dkd', 'dkd.beta', 2.0),
    ('teacher=resnet110,student=resnet20,method=dkd', 'dkd.beta', 8.0),  # cfg.py's default
    ('teacher=resnet56,student=resnet20,method=reviewkd', 'loss.feature_weight', 0.6),
    ('teacher=wrn40x2,student=wrn16x2,method=reviewkd', 'loss.feature_weight', 5.0),
    ('teacher=vgg13,student=vgg8,method=ft', 'pretrain.learning_rate', 0.05),
    ('teacher=wrn40x2,student=wrn16x2,method=ft', 'pretrain.learning_rate', -1.0),  # ft's 0.01
])
def test_cifar100_pair_settings_come_from_the_registration(arg, key, expected):
  config = cifar100.get_config(arg)
  section, leaf = key.split('.')
  assert getattr(getattr(config, section), leaf) == expected


def test_recipe_exact_pairs_win_over_wildcards():
  method = registry.Method('x', build=lambda c, s: None, feature_weight=1.0, recipes={
      'f': {('*', '*'): {'a': 1, 'b': 1}, ('t', '*'): {'a': 2}, ('t', 's'): {'b': 3}}})
  assert method.recipe('f', 't', 's') == {'a': 2, 'b': 3}
  assert method.recipe('f', 'u', 's') == {'a': 1, 'b': 1}
  assert method.recipe('other', 't', 's') == {}


def test_imagenet_afd_recipe_from_the_registration():
  afd = imagenet.get_config('method=afd')
  assert (afd.loss.feature_weight, afd.loss.kd_weight) == (50.0, 0.0)
  at = imagenet.get_config('method=at')
  assert (at.loss.feature_weight, at.loss.kd_weight) == (1000.0, 0.0)


@pytest.mark.parametrize('method, attention', [('afd', True), ('semckd', True), ('at', False),
                                               ('sp', False)])
def test_task_attention_follows_the_registry(method, attention):
  config = bench.bench_config(method, 'resnet20', 'resnet8')
  task = task_lib.task_from_config(config, 10, 10)
  assert task.attention is attention
  assert registry.get(method).attention is attention
