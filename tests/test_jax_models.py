"""Models from the JAX world enter unedited (tests/jax_world_models.py has stand-ins in their
styles): each builds from a config section as student and as teacher with taps='auto', runs in
train and eval mode with its train flag where the module declares it, and distils through
`python -m afd_jax.main`; what cannot be tapped is refused in one line that says what to do,
and every config key a models/ message names exists."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import models
from configs import base
from tests import jax_world_models as world
from tests import runs

HERE = 'tests.jax_world_models'
RGB, GREY = (8, 8, 3), (8, 8, 1)
DROPOUT = {'dropout': jax.random.PRNGKey(7)}

# name, kwargs, image shape, the taps 'auto' must find
STYLES = [
    ('make', {}, RGB, ['unit0', 'unit1', 'unit2']),  # **kwargs factory, module without dtype
    ('PlainNet', {}, RGB, ['unit0', 'unit1', 'unit2']),  # the class itself as the factory
    ('DeterministicNet', {}, RGB, ['block0', 'block1']),
    ('IsTrainingNet', {}, RGB, ['net/block0', 'net/block1']),
    ('kw_vit', {}, RGB, ['Transformer/layers_0', 'Transformer/layers_1']),  # train keyword-only
    ('kw_vit', {'pool_type': 'map'}, RGB, ['Transformer/layers_0', 'Transformer/layers_1']),
    ('kw_vit', {'pool_type': 'tok'}, RGB, ['Transformer/layers_0', 'Transformer/layers_1']),
    ('PmapResNet', {}, RGB, ['PmapBlock_0', 'PmapBlock_1']),  # BatchNorm over 'batch'
    ('nnx_net', {}, GREY, ['block0', 'block1']),  # NNX, rngs in its constructor
]


def section(role: str, name: str, **options):
  config = base.get_base_config()[role]
  config.name, config.taps = f'{HERE}:{name}', 'auto'
  for key, value in options.items():
    config[key] = value
  return config


def build(name, kwargs=None, image_shape=RGB, role='student', **options):
  return models.from_config(section(role, name, kwargs=dict(kwargs or {}), **options), 10,
                            jnp.float32, image_shape)


def run(model, image_shape, train, seed=0, rngs=DROPOUT, variables=None):
  images = jax.random.normal(jax.random.PRNGKey(seed), (4,) + image_shape)
  variables = variables or model.init(jax.random.PRNGKey(1), images, train=False)
  if not train:
    return variables, model.apply(variables, images, train=False), None
  (logits, feats), state = model.apply(variables, images, train=True, mutable=['batch_stats'],
                                       rngs=rngs)
  return variables, (logits, feats), state


@pytest.mark.parametrize('name, kwargs, image_shape, taps', STYLES)
def test_each_style_builds_and_yields_auto_taps_as_student_and_as_teacher(name, kwargs,
                                                                          image_shape, taps):
  """Traced (abstractly) in eval and in train mode, where the failures of these styles lie;
  values are checked below, one claim each."""
  for role in ('student', 'teacher'):
    model = build(name, kwargs, image_shape, role)
    assert [t.name for t in model.taps()] == taps
    images = jax.ShapeDtypeStruct((4,) + image_shape, jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(1), x), images)
    for train in (False, True):
      (logits, feats), _ = jax.eval_shape(
          lambda v, x: model.apply(v, x, train=train, mutable=['batch_stats'], rngs=DROPOUT),
          variables, images)
      assert logits.shape == (4, 10) and logits.dtype == jnp.float32
      assert len(feats) == len(taps) and all(f.ndim == 4 and f.shape[0] == 4 for f in feats)


def test_dtype_goes_only_where_the_module_has_it():
  for name in ('make', 'PlainNet'):  # no dtype field: not given one (it would be a TypeError)
    assert not hasattr(models.create(f'{HERE}:{name}', 10, dtype=jnp.bfloat16,
                                     image_shape=RGB).module, 'dtype')
  for name in ('make_typed', 'TypedNet', 'PmapResNet'):  # a dtype field: given it
    assert models.create(f'{HERE}:{name}', 10, dtype=jnp.bfloat16,
                         image_shape=RGB).module.dtype == jnp.bfloat16


def test_num_classes_goes_only_where_the_module_has_it():
  model = models.create(f'{HERE}:forward_all', 7, dtype=jnp.bfloat16, image_shape=RGB).module
  assert model.outputs == 10 and not hasattr(model, 'num_classes')
  assert models.create(f'{HERE}:make', 7, image_shape=RGB).module.num_classes == 7


def test_use_running_average_is_the_inverse_flag():
  model = build('RunningAverageNet', taps='Conv_0')
  variables, _, _ = run(model, RGB, False)
  _, _, state = run(model, RGB, True, variables=variables)  # training updates the statistics
  before, after = (jax.tree.leaves(v['batch_stats']) for v in (variables, state))
  assert after and not all(np.allclose(a, b) for a, b in zip(after, before))
  # (eval, `run(..., False)` above, applies without a mutable batch_stats: a batch norm that
  # computed batch statistics there would have raised)


def test_an_optional_argument_of_another_name_is_refused_naming_train_arg():
  with pytest.raises(ValueError, match=r"optional 'mask'.*config\.student\.train_arg"):
    build('MaskNet')
  model = build('MaskNet', train_arg='none')
  assert model.apply(run(model, RGB, False)[0], jnp.ones((2,) + RGB), train=True,
                     mutable=['batch_stats'])[0][0].shape == (2, 10)


def test_train_reaches_the_flag_the_module_declares():
  """Dropout is on in training and off in eval whatever the flag's name or meaning; a flag no
  rule knows is named by `train_arg` ('!name' when it means eval)."""
  for name, options in [('DeterministicNet', {}), ('IsTrainingNet', {}),
                        ('CustomFlagNet', {'train_arg': 'use_dropout'})]:
    model = build(name, **options)
    variables, (eval_logits, _), _ = run(model, RGB, False)
    _, (again, _), _ = run(model, RGB, False, rngs={'dropout': jax.random.PRNGKey(8)},
                           variables=variables)
    _, (train_a, _), _ = run(model, RGB, True, variables=variables)
    _, (train_b, _), _ = run(model, RGB, True, rngs={'dropout': jax.random.PRNGKey(8)},
                             variables=variables)
    np.testing.assert_array_equal(eval_logits, again)
    assert not np.allclose(train_a, train_b), name  # dropout drew different masks
  images = jax.random.normal(jax.random.PRNGKey(0), (4,) + RGB)
  inverted = build('CustomFlagNet', train_arg='!use_dropout')  # eval now runs the dropout
  variables = inverted.init(jax.random.PRNGKey(1), images)
  eval_a = inverted.apply(variables, images, train=False, rngs=DROPOUT)[0]
  eval_b = inverted.apply(variables, images, train=False,
                          rngs={'dropout': jax.random.PRNGKey(8)})[0]
  assert not np.allclose(eval_a, eval_b)
  with pytest.raises(ValueError, match=r"has no parameter 'nope'.*use_dropout.*"
                                       r"config\.student\.train_arg"):
    build('CustomFlagNet', train_arg='nope')


def test_keyword_only_train_gives_the_modules_own_logits():
  model = build('kw_vit')
  variables, (logits, _), _ = run(model, RGB, False)
  images = jax.random.normal(jax.random.PRNGKey(0), (4,) + RGB)
  own, _ = world.KwViT().apply(variables, images, train=False)
  np.testing.assert_array_equal(logits, own)


def test_auto_taps_the_encoder_blocks_when_a_map_head_reuses_their_mlp():
  """The head calls Mlp once more (3 calls against 2 blocks): the blocks are still chosen."""
  model = build('kw_vit', {'pool_type': 'map'})
  images = jnp.zeros((2,) + RGB)
  mlp_calls = []

  def count(next_fun, args, kwargs, context):
    if isinstance(context.module, world.Mlp) and context.method_name == '__call__':
      mlp_calls.append(context.module.path)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(count):
    jax.eval_shape(lambda: model.module.init(jax.random.PRNGKey(0), images))
  assert len(mlp_calls) == 3
  assert [t.name for t in model.taps()] == ['Transformer/layers_0', 'Transformer/layers_1']


def test_scanned_blocks_are_refused_in_one_line_naming_what_can_be_tapped():
  with pytest.raises(ValueError) as error:
    build('kw_vit', {'scan': True})
  message = str(error.value)
  assert '\n' not in message and 'nn.scan' in message and 'Transformer/layers' in message
  assert message.endswith('Paths that can be tapped: embedding, Transformer, Transformer/norm, '
                          'head, returned:encoder/layer0/out, returned:encoder/layer1/out, '
                          'returned:pre_logits.')
  with pytest.raises(ValueError, match=r"match Transformer/layers, which runs inside"):
    build('kw_vit', {'scan': True}, taps='Transformer/*')


def test_what_a_scanned_model_returns_per_layer_taps_it_as_the_unscanned_blocks():
  """The paths the refusal offers work: a scanned ViT's per-layer outputs, tapped where it
  returns them, equal the unscanned ViT's block taps on the same (restacked) parameters."""
  scanned = build('kw_vit', {'scan': True}, taps='returned:encoder/layer*/out')
  assert [t.name for t in scanned.taps()] == ['returned:encoder/layer0/out',
                                              'returned:encoder/layer1/out']
  plain = build('kw_vit')
  variables, (logits, feats), _ = run(plain, RGB, False)
  params = dict(variables['params'])
  transformer = dict(params['Transformer'])
  layers = [transformer.pop(f'layers_{i}') for i in range(2)]
  transformer['layers'] = jax.tree.map(lambda *x: jnp.stack(x), *layers)
  params['Transformer'] = transformer
  _, (s_logits, s_feats), _ = run(scanned, RGB, False, variables={'params': params})
  np.testing.assert_allclose(s_logits, logits, rtol=1e-5, atol=1e-6)
  assert len(s_feats) == len(feats) == 2
  for a, b in zip(s_feats, feats):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_pmap_batch_norm_normalises_over_the_whole_batch():
  """BatchNorm(axis_name='batch'): the running mean after one step is 0.1 x the mean over the
  global batch of what the first convolution gives, as a pmean over every device was."""
  model = build('PmapResNet')
  assert model.calling.axis_names == ('batch',)
  variables, _, state = run(model, RGB, True)
  images = jax.random.normal(jax.random.PRNGKey(0), (4,) + RGB)
  conv = nn.Conv(8, (3, 3), use_bias=False).apply(
      {'params': variables['params']['conv_init']}, images)
  np.testing.assert_allclose(state['batch_stats']['bn_init']['mean'],
                             0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-7)


def test_a_collective_outside_any_layer_is_refused_in_one_line_saying_what_to_do():
  with pytest.raises(ValueError, match=r"^PmeanNet runs a collective over the pmap axis 'batch'"
                                       r".*remove it.*axis_name='batch'") as error:
    build('PmeanNet')
  assert '\n' not in str(error.value)


def test_nnx_models_run_in_train_and_eval_mode_and_one_that_sows_nothing_is_told_to():
  model = build('nnx_net', image_shape=GREY)
  variables, (eval_logits, _), _ = run(model, GREY, False)
  _, _, state = run(model, GREY, True, variables=variables)
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), variables['batch_stats'],
                       state['batch_stats'])
  assert all(jax.tree.leaves(moved))  # training mode: the BatchNorm statistics moved
  _, (again, _), _ = run(model, GREY, False, rngs=None, variables=variables)
  np.testing.assert_array_equal(eval_logits, again)
  with pytest.raises(ValueError, match=r"nothing sown.*self\.sow\(nnx\.Intermediate"):
    build('nnx_silent_net', image_shape=GREY)


def test_token_messages_name_keys_that_exist_and_guess_the_prefix():
  with pytest.raises(ValueError, match=r'cannot lay 5 tokens \(0 prefix\).*'
                                       r'config\.student\.token_grid.*1 would fit'):
    build('kw_vit', {'pool_type': 'tok'}, prefix_tokens=0)


def test_every_config_key_a_models_message_names_exists():
  """Every `config.a.b` that afd_jax/models/ writes (its messages, and the docstrings they
  point to) is a key of configs/base.py's config; the keys that never existed are gone."""
  sources = ''.join(p.read_text() for p in (runs.REPO / 'afd_jax' / 'models').glob('*.py'))
  keys = set(re.findall(r'\bconfig\.([a-z_]+(?:\.[a-z_]+)*)', sources))
  assert {'student.token_grid', 'teacher.prefix_tokens', 'student.train_arg',
          'teacher.taps', 'student.kwargs'} <= keys
  config = base.get_base_config()
  for key in keys:
    node = config
    for part in key.split('.'):
      assert part in node, key
      node = node[part]
  assert not re.search(r'taps_(grid|prefix)', sources)


def test_styles_distil_through_the_cli(digits_data_dir, tmp_path):
  """`python -m afd_jax.main` (in this process), AFD + KD on digits for two steps on 8 devices:
  the pmap-BatchNorm ResNet (a module class as the factory) as the student, its statistics
  over the sharded global batch; a ViT with keyword-only `train` and a MAP head as the teacher.
  Each style's other role is built above, in the same way."""
  args = runs.flag_args(digits_data_dir, num_train_steps=2, student__name=f'{HERE}:PmapResNet',
                        student__taps='auto', teacher__name=f'{HERE}:map_vit',
                        teacher__taps='auto')
  result = runs.cli_in_process(args, workdir=str(tmp_path / 'w'))
  assert result.returncode == 0, result.stderr[-2000:]
  summary = runs.summary(tmp_path / 'w')
  assert summary['status'] == 'finished' and summary['final_step'] == 2
  assert np.isfinite(summary['train']['loss']) and summary['train']['afd'] > 0


@pytest.mark.parametrize('role', ['student', 'teacher'])
def test_what_cannot_be_tapped_is_refused_by_the_cli_in_one_line(digits_data_dir, tmp_path,
                                                                 role):
  for name, message in [('scan_vit', 'nn.scan'), ('nnx_silent_net', 'self.sow(')]:
    args = runs.flag_args(digits_data_dir, num_train_steps=1,
                          **{f'{role}__name': f'{HERE}:{name}', f'{role}__taps': 'auto'})
    result = runs.cli_in_process(args, workdir=str(tmp_path / name))
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr + result.stdout
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
