"""Model zoo: `create(name, num_classes)` -> a linen module returning `(logits, features)`.

`module.apply(variables, images, train)` takes `B x H x W x C` images (any size and channel
count the architecture admits) and returns float32 logits and a tuple of channels-last feature
taps (see AFD_SPEC.md); `module.taps()` names them. Variables: `{'params', 'batch_stats'}`.
"""
import functools
from typing import Dict, List

import flax.linen as nn

from afd_jax.models.resnet import BasicBlock, Bottleneck, ResNet
from afd_jax.models.resnet_cifar import CifarResNet
from afd_jax.models.taps import Tap, stage_final
from afd_jax.models.vgg import CONFIGS as VGG_CONFIGS
from afd_jax.models.vgg import VGG
from afd_jax.models.wrn import WideResNet

_p = functools.partial
_REGISTRY: Dict[str, functools.partial] = {
    **{f'wrn{d}x{w}': _p(WideResNet, depth=d, widen=w) for d in (16, 28, 40) for w in (1, 2)},
    **{f'resnet{d}': _p(CifarResNet, depth=d, widths=(16, 16, 32, 64))
       for d in (8, 14, 20, 32, 44, 56)},
    'resnet110': _p(CifarResNet, depth=110, widths=(16, 16, 32, 64), tap_every=2),
    'resnet8x4': _p(CifarResNet, depth=8, widths=(32, 64, 128, 256)),
    'resnet32x4': _p(CifarResNet, depth=32, widths=(32, 64, 128, 256)),
    'resnet18': _p(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock),
    'resnet34': _p(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock),
    'resnet18im': _p(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock, imagenet_stem=True),
    'resnet34im': _p(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock, imagenet_stem=True),
    'resnet50im': _p(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck, imagenet_stem=True),
    'vgg8': _p(VGG, blocks=VGG_CONFIGS['S']),
    'vgg13': _p(VGG, blocks=VGG_CONFIGS['B']),
}


def names() -> List[str]:
  """Every model name `create` accepts."""
  return sorted(_REGISTRY)


def create(name: str, num_classes: int, **options) -> nn.Module:
  """Builds model `name` with `num_classes` outputs; `options`: `dtype` (activations)."""
  if name not in _REGISTRY:
    raise ValueError(f'Unknown model {name!r}. Known models: {", ".join(names())}.')
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
    raise ValueError(f'num_classes must be a positive integer, got {num_classes!r}.')
  unknown = set(options) - {'dtype'}
  if unknown:
    raise ValueError(f'Unknown option(s) {sorted(unknown)} for model {name!r}; '
                     'accepted: dtype.')
  return _REGISTRY[name](num_classes=num_classes, **options)


__all__ = ['create', 'names', 'Tap', 'stage_final']
