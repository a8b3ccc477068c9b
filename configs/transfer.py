"""Transfer learning, ImageNet ResNet-34 -> ResNet-18 on CUB-200-2011, Stanford Dogs, MIT
Indoor-67 or Stanford-40, with the ImageNet augmentations at 224x224 (docs/method.md).

Args: dataset (cub | dogs | mit67 | stanford40), method (none | kd | afd | fitnet | at | sp[+kd]),
model (fine-tune one model alone), seed.
1. Fine-tune the teacher from torchvision's ImageNet ResNet-34:
     python -m afd_jax.main --config=configs/transfer.py:dataset=cub,model=resnet34im \\
         --config.student.init_checkpoint=resnet34-333f7ec4.pth --workdir=runs/cub-r34
2. Distil into ResNet-18 (itself started from ImageNet weights):
     python -m afd_jax.main --config=configs/transfer.py:dataset=cub,method=afd \\
         --config.teacher.checkpoint=runs/cub-r34 \\
         --config.student.init_checkpoint=resnet18-5c106cde.pth --workdir=runs/cub-afd
`cub` and `dogs` are TFDS datasets (caltech_birds2011, stanford_dogs: `tfds build`); MIT-67 and
Stanford-40 are image folders (`--config.dataset.folder=DIR` with train/ and test/ or valid/).
The official code has no transfer recipe; ours: 60 epochs, batch 64, SGD lr 0.01 (x0.1 after
epochs 40 and 50), weight decay 5e-4, AFD beta 200 with KD 0.9 as on CIFAR. Cost: 60 epochs of
the training split (CUB: 5,994 images, 94 steps/epoch); step time at 224x224: see
docs/performance.md (resnet34im -> resnet18im) or `python -m afd_jax.bench`.
"""
from afd_jax.data import stats
from configs import methods
from configs.base import get_base_config, parse_arg

DATASETS = {  # name -> (config.dataset.name, eval split)
    'cub': ('caltech_birds2011', 'test'), 'dogs': ('stanford_dogs', 'test'),
    'mit67': ('image_folder', 'test'), 'stanford40': ('image_folder', 'test'),
}
DEFAULTS = {'dataset': 'cub', 'method': 'afd', 'model': '', 'seed': '0'}


def get_config(arg: str = ''):
  a = parse_arg(arg, DEFAULTS, 'transfer.py')
  if a['dataset'] not in DATASETS:
    raise ValueError(f'transfer.py: dataset must be one of {", ".join(DATASETS)}, '
                     f'got {a["dataset"]!r}.')
  c = methods.get_config('none' if a['model'] else a['method'])
  c.seed = int(a['seed'])
  c.dataset.name, c.dataset.eval_split = DATASETS[a['dataset']]
  c.dataset.augment = 'imagenet'
  c.dataset.image_size = 224
  c.dataset.mean, c.dataset.std = stats.IMAGENET_MEAN, stats.IMAGENET_STD
  c.dataset.cache = False
  c.teacher.name, c.student.name = 'resnet34im', a['model'] or 'resnet18im'
  c.num_epochs, c.batch_size, c.eval_batch_size = 60, 64, 256
  c.optimizer.learning_rate, c.optimizer.weight_decay = 0.01, 5e-4
  c.optimizer.decay_epochs = (41, 51)
  c.name = f'{a["dataset"]}-{c.student.name}' + ('' if a['model'] else f'-{a["method"]}')
  return c
