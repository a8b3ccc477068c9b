"""Taps on any Flax module (afd_jax/models/tapping.py): 'auto', patterns, tokens, NNX, errors."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import models, sharding, step
from tests import byo_models, runs
from tests.test_step import mesh_of, setup, tiny_task, toy_batch

# Where 'auto' cannot give the zoo's hand-written taps (docs/method.md), and why.
AUTO_DIFFERS = {
    # The spec taps every second block of resnet110 (tap_every=2): auto taps all 54 blocks.
    'resnet110': 'every_block',
    # WRN taps are ReLU(BN1 of the next block) of each block's output: auto taps the raw output.
    **{f'wrn{d}x{w}': 'pre_activation' for d in (16, 28, 40) for w in (1, 2)},
    # VGG has no blocks (conv, BN and ReLU sit in the network itself): auto finds nothing.
    'vgg8': 'no_blocks', 'vgg13': 'no_blocks',
}


def shapes(tree):
  return [tuple(x.shape) for x in tree]


def abstract_features(model, image_shape):
  images = jax.ShapeDtypeStruct((2,) + image_shape, jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
  return jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)[1]


@pytest.mark.parametrize('name', models.names())
def test_auto_taps_on_the_zoo_equal_the_spec_or_differ_as_listed(name):
  image_shape = (64, 64, 3) if name.endswith('im') else (28, 28, 3) if name == 'vit_h14' else (
      32, 32, 3)
  spec_model = models.create(name, 10)
  spec = shapes(abstract_features(spec_model, image_shape))
  why = AUTO_DIFFERS.get(name)
  if why == 'no_blocks':
    with pytest.raises(ValueError, match='found no repeated blocks.*block1_conv0'):
      models.create(name, 10, taps='auto', image_shape=image_shape)
    return
  auto = models.create(name, 10, taps='auto', image_shape=image_shape)
  got = shapes(abstract_features(auto, image_shape))
  assert [t.stage for t in auto.taps()] == [t.stage for t in spec_model.taps()] or why
  if why == 'every_block':
    assert len(got) == 2 * len(spec) and got[1::2] == spec
  else:  # same count, shapes and (for ResNets, checked on values below) the same maps
    assert got == spec
    assert [t.name.replace('_', '.') for t in auto.taps()] == (
        [t.name for t in spec_model.taps()] if why is None else
        [f'block{s}_{i}'.replace('_', '.') for s in (1, 2, 3)
         for i in range(len(spec) // 3)])


@pytest.mark.parametrize('name', ['resnet8', 'resnet18'])
def test_auto_taps_are_the_zoo_feature_maps_value_for_value(name):
  model = models.create(name, 10)
  auto = models.create(name, 10, taps='auto', image_shape=(32, 32, 3))
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), images, train=False)
  (logits, feats), _ = model.apply(variables, images, train=True, mutable=['batch_stats'])
  (a_logits, a_feats), _ = auto.apply(variables, images, train=True, mutable=['batch_stats'])
  np.testing.assert_array_equal(logits, a_logits)
  for f, g in zip(feats, a_feats, strict=True):
    np.testing.assert_array_equal(f, g)


def test_patterns_select_in_network_order_and_vgg_taps_by_pattern():
  model = models.create('vgg8', 10, taps=['block*_bn*'], image_shape=(32, 32, 3))
  assert [t.name for t in model.taps()] == [f'block{b}_bn0' for b in range(5)]
  assert [t.stage for t in model.taps()] == [1, 2, 3, 4, 4]
  user = models.tap(byo_models.tiny_convnet(10), ['stage1_*', 'stem'], image_shape=(16, 16, 3))
  assert [t.name for t in user.taps()] == ['stem', 'stage1_block0', 'stage1_block1']
  assert shapes(abstract_features(user, (16, 16, 3))) == [(2, 16, 16, 8), (2, 8, 8, 16),
                                                          (2, 8, 8, 16)]


def test_patterns_that_match_nothing_list_the_module_paths():
  with pytest.raises(ValueError, match=r"match no module\. Module paths: stem, stage0_block0, "
                                       r"stage0_block0/Conv_0"):
    models.tap(byo_models.tiny_convnet(10), ['layer*'], image_shape=(16, 16, 3))


def test_vit_tokens_become_grids_without_the_class_token():
  vit = models.tap(byo_models.tiny_vit(10), 'auto', image_shape=(16, 24, 3))
  assert [t.name for t in vit.taps()] == [f'Transformer/encoderblock_{i}' for i in range(3)]
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 24, 3))
  variables = vit.init(jax.random.PRNGKey(1), images)
  logits, feats = vit.apply(variables, images)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert shapes(feats) == [(2, 4, 6, 16)] * 3  # 4 x 6 patches of 4 px, class token dropped
  # The grid holds the patch tokens in row-major order: compare with the block's own output.
  _, state = byo_models.tiny_vit(10).apply(
      variables, images, False, capture_intermediates=True, mutable=['intermediates'])
  tokens = state['intermediates']['Transformer']['encoderblock_1']['__call__'][0]
  np.testing.assert_array_equal(feats[1], tokens[:, 1:].reshape(2, 4, 6, 16))


def test_token_counts_without_a_grid_are_an_error_that_asks_for_one():
  with pytest.raises(ValueError, match=r'cannot lay 5 tokens \(0 prefix\).*set its grid'):
    models.tap(byo_models.tiny_vit(10), 'auto', image_shape=(8, 8, 3), prefix_tokens=0)
  ok = models.tap(byo_models.tiny_vit(10), 'auto', image_shape=(8, 8, 3), prefix_tokens=1)
  assert shapes(abstract_features(ok, (8, 8, 3))) == [(2, 2, 2, 16)] * 3
  with pytest.raises(ValueError, match=r'do not fill the grid 3x3'):
    models.tap(byo_models.tiny_vit(10), 'auto', image_shape=(8, 8, 3), grid=(3, 3))


def test_vectors_become_1x1_maps_and_nnx_models_are_tapped_at_what_they_sow():
  nnx_model = models.tap(byo_models.nnx_convnet(10), 'auto', image_shape=(8, 8, 1))
  assert [t.name for t in nnx_model.taps()] == ['block1', 'block2']
  assert shapes(abstract_features(nnx_model, (8, 8, 1))) == [(2, 8, 8, 8), (2, 4, 4, 16)]
  vectors = models.tap(byo_models.tiny_vit(10), ['head'], image_shape=(8, 8, 3))
  assert shapes(abstract_features(vectors, (8, 8, 3))) == [(2, 1, 1, 10)]


def test_factories_by_name_and_their_errors():
  model = models.create('tests.byo_models:tiny_convnet', 7, kwargs={'width': 4},
                        image_shape=(16, 16, 3))
  assert [t.name for t in model.taps()] == [f'stage{s}_block{i}' for s in (0, 1) for i in (0, 1)]
  for name, message in [('tests.no_such_file:f', "cannot import 'tests.no_such_file'"),
                        ('tests.byo_models:nothing', "has no 'nothing'"),
                        ('tests.byo_models:not_a_module', 'not a flax.linen Module')]:
    with pytest.raises(ValueError, match=message):
      models.create(name, 7, image_shape=(16, 16, 3))
  with pytest.raises(ValueError, match="Unknown model 'resnet9'.*package.module:factory"):
    models.create('resnet9', 7)


def test_the_taps_add_no_computation_to_the_traced_program():
  """The interceptor acts at trace time: the tapped apply's program holds exactly the
  operations of the module's own apply, and returns the tapped arrays besides the logits."""
  user = byo_models.tiny_convnet(10)
  tapped = models.tap(user, 'auto', image_shape=(16, 16, 3))
  images = jnp.zeros((2, 16, 16, 3))
  variables = user.init(jax.random.PRNGKey(0), images, False)
  plain = jax.make_jaxpr(lambda v, x: user.apply(v, x, False))(variables, images)
  with_taps = jax.make_jaxpr(lambda v, x: tapped.apply(v, x, False))(variables, images)
  primitives = lambda jaxpr: [str(e.primitive) for e in jaxpr.jaxpr.eqns]
  assert primitives(with_taps) == primitives(plain)
  assert len(with_taps.jaxpr.outvars) == 1 + 4


def test_bench_distils_a_vit_from_a_test_file_into_a_zoo_cnn(capsys):
  """Cross-architecture AFD in the very step the trainer runs: a ViT teacher (token maps, one
  resolution) into a CNN student (three resolutions), through `python -m afd_jax.bench`."""
  from afd_jax import bench  # pylint: disable=g-import-not-at-top
  args = ['--teacher', 'tests.byo_models:tiny_vit', '--teacher-kwargs', '{"depth": 2}',
          '--student', 'resnet8', '--image-size', '16', '--batch', '8', '--num-classes', '10',
          '--steps', '1', '--rounds', '1', '--warmup', '0', '--method', 'afd', '--json']
  assert bench.main(args) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report['teacher'] == 'tests.byo_models:tiny_vit'
  assert report['results'][0]['method'] == 'afd' and report['results'][0]['median_step_ms'] > 0
  with pytest.raises(SystemExit) as exit_info:
    bench.main(args[:-1] + ['--student-taps', 'nothing*'])
  assert exit_info.value.code == 2
  assert "tap patterns ['nothing*'] match no module" in capsys.readouterr().err


def test_the_readme_snippet_for_your_own_training_loop_runs():
  """The README's 'AFD in your own training loop' code, executed as it stands."""
  text = (runs.REPO / 'README.md').read_text()
  section = text[text.index('## AFD in your own training loop'):]
  code = section[section.index('```python\n') + len('```python\n'):section.index('\n```\n')]
  assert len(code.splitlines()) < 20
  scope = {}
  exec(compile(code, 'README.md', 'exec'), scope)  # pylint: disable=exec-used
  assert np.isfinite(float(scope['loss']))
  grads = jax.tree.leaves(scope['grads'])
  assert grads and any(float(jnp.abs(g).max()) > 0 for g in grads)
  assert 'batch_stats' in scope['updates']


def test_an_nnx_model_is_the_student_of_a_zoo_teacher_in_the_train_step():
  """An NNX model through Flax's bridge, tapped at what it sows, distilled with AFD (+ KD) from
  a resnet14 in the sharded train step on 8 devices: every student parameter moves."""
  student = models.create('tests.byo_models:nnx_convnet', 4, kwargs={'channels': 3},
                          image_shape=(8, 8, 3))
  task, mesh = dataclasses.replace(tiny_task(), student=student), mesh_of(8)
  state, teacher_vars = setup(task, mesh)
  before = jax.device_get(state.params['student'])
  batch = sharding.global_batch(toy_batch(np.random.default_rng(0)), mesh)
  state, metrics = step.jit_train_step(task, mesh)(state, teacher_vars, batch)
  assert np.isfinite(float(metrics['loss'])) and float(metrics['afd']) > 0
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before,
                       jax.device_get(state.params['student']))
  assert jax.tree.leaves(moved) and all(jax.tree.leaves(moved))
  assert len(jax.tree.leaves(state.params['distiller'])) > 0
