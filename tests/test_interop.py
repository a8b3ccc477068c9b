"""PyTorch weight import: every model name and the AFD module round-trip (torchvision's names
for the ImageNet ResNets; channels and classes read from the state dict), errors name every bad
entry, .pth files bare and wrapped, pickled code refused."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afd_jax import models
from afd_jax.distill import AFD
from afd_jax.interop import torch as torch_interop


def random_variables(name, num_classes=7, channels=3, size=32):
  model = models.create(name, num_classes)
  x = jnp.zeros((1, size, size, channels))
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)


# 1.2 and 2.5 GB of random weights: tested as narrow copies in test_vit.py.
FOUNDATION_SIZE = ('vit_l16', 'vit_h14')


@pytest.mark.parametrize('name', [n for n in models.names() if n not in FOUNDATION_SIZE])
def test_every_model_round_trips(name):
  variables = random_variables(name)
  state_dict = torch_interop.to_state_dict(name, variables)
  tokens = ('cls_token', 'dist_token', 'pos_embed')  # ViT/DeiT: timm's top-level names
  assert all('.' in k for k in state_dict if k not in tokens)
  back = torch_interop.convert(name, state_dict)
  jax.tree.map(np.testing.assert_array_equal, back, variables)


def test_torchvision_names_for_imagenet_resnets():
  sd = torch_interop.to_state_dict('resnet50im', random_variables('resnet50im', 1000))
  for key in ('conv1.weight', 'bn1.running_var', 'layer1.0.downsample.0.weight',
              'layer1.0.downsample.1.bias', 'layer4.2.conv3.weight', 'layer4.2.bn3.weight',
              'fc.weight', 'fc.bias'):
    assert key in sd, key
  assert sd['conv1.weight'].shape == (64, 3, 7, 7) and sd['fc.weight'].shape == (1000, 2048)


def test_in_channels_and_classes_come_from_the_state_dict():
  sd = torch_interop.to_state_dict('resnet8', random_variables('resnet8', 10, channels=1))
  variables = torch_interop.convert('resnet8', sd)
  logits, _ = models.create('resnet8', 10).apply(variables, jnp.zeros((2, 8, 8, 1)), train=False)
  assert logits.shape == (2, 10)


def test_every_bad_entry_is_named():
  sd = torch_interop.to_state_dict('resnet8', random_variables('resnet8'))
  del sd['layer1.0.bn1.running_mean']
  del sd['layer3.0.downsample.0.weight']
  sd['layer1.0.conv2.weight'] = np.zeros((16, 16, 5, 5), np.float32)
  sd['layer9.0.conv1.weight'] = np.zeros((1,), np.float32)
  sd['extra'] = np.zeros((1,), np.float32)
  with pytest.raises(ValueError) as info:
    torch_interop.convert('resnet8', sd)
  message = str(info.value)
  for part in ('missing entries', 'layer1.0.bn1.running_mean', 'layer3.0.downsample.0.weight',
               'unexpected entries', 'layer9.0.conv1.weight', 'extra',
               'wrongly shaped entries', 'layer1.0.conv2.weight: got (16, 16, 5, 5), expected '
               '(16, 16, 3, 3)'):
    assert part in message, part


def test_unknown_model_name():
  with pytest.raises(ValueError, match="Unknown model 'resnet9'.*afd"):
    torch_interop.convert('resnet9', {})


def test_afd_module_round_trip_and_errors():
  student = [jnp.zeros((2, 4, 4, c)) for c in (8, 16)]
  teacher = [jnp.zeros((2, 4, 4, c)) for c in (8, 8, 32)]
  variables = jax.jit(AFD(16).init, static_argnames='train')(jax.random.PRNGKey(0), student,
                                                             teacher, train=False)
  sd = torch_interop.to_state_dict('afd', variables)
  assert 'attention.linear_trans_s.bilinear.linear.weight' in sd
  assert sd['attention.linear_trans_s.bilinear.linear.weight'].shape == (3 * 16, 16)
  jax.tree.map(np.testing.assert_array_equal, torch_interop.convert('afd', sd), variables)
  del sd['attention.linear_trans_t.query_layer.1.bn.weight']
  sd['attention.linear_trans_s.key_layer.0.bn.bias'] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r'query_layer.1.bn.weight.*key_layer.0.bn.bias: got \(3,\)'):
    torch_interop.convert('afd', sd)


def test_not_a_mapping():
  with pytest.raises(ValueError, match='must be a mapping'):
    torch_interop.convert('resnet8', [1, 2])


def test_load_pth_bare_and_wrapped(tmp_path):
  torch = pytest.importorskip('torch', reason='torch is optional; CI installs the CPU build')
  variables = random_variables('resnet8')
  sd = {k: torch.from_numpy(v) for k, v in torch_interop.to_state_dict('resnet8', variables).items()}
  sd['bn1.num_batches_tracked'] = torch.tensor(3)
  torch.save(sd, tmp_path / 'bare.pth')
  torch.save({'model': {f'module.{k}': v for k, v in sd.items()}, 'epoch': 240},
             tmp_path / 'wrapped.pth')
  for path in ('bare.pth', 'wrapped.pth'):
    back = torch_interop.load('resnet8', str(tmp_path / path))
    jax.tree.map(np.testing.assert_array_equal, back, variables)


class NotData:
  def __reduce__(self):
    return (print, ('this must never run',))


def test_load_refuses_pickled_code(tmp_path):
  torch = pytest.importorskip('torch', reason='torch is optional; CI installs the CPU build')
  torch.save({'model': NotData()}, tmp_path / 'evil.pth')
  with pytest.raises(ValueError, match='refused: it holds pickled Python objects, not only tensors'):
    torch_interop.load('resnet8', str(tmp_path / 'evil.pth'))
