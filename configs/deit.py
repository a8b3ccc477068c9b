"""ViT students trained with a ViT recipe: DeiT (Touvron et al. 2021) on ImageNet, and the same
recipe shrunk for 28/32-pixel images.

`recipe=imagenet` is DeiT's (facebookresearch/deit main.py and README): a DeiT-Ti/S/B student
(deit_s16 by default for DeiT's methods, vit_s16 for the others; `student=` any zoo ViT), a zoo CNN
teacher (resnet50im with torchvision's weights by default; DeiT's own is a RegNetY-16GF), 300
epochs, AdamW lr 5e-4 x batch / 512, weight decay 0.05 (none on biases, norms, position
embeddings and tokens), 5 warm-up epochs from 1e-6, cosine to 1e-5, label smoothing 0.1, drop
path 0.1, RandAugment rand-m9-mstd0.5-inc1, mixup 0.8 / cutmix 1.0 (switch 0.5), random
erasing 0.25, a moving average of the student (0.99996), batch 1024; hard distillation at
alpha 0.5 (`deit_hard`: CE 0.5 + 0.5 CE(dist head, argmax teacher)). DeiT-S reaches 79.9 alone
and 81.2 distilled from a RegNetY-16GF in the paper.

  python -m afd_jax.main --config=configs/deit.py:recipe=imagenet,method=deit_hard \\
      --config.dataset.data_dir=/data/tfds --config.teacher.checkpoint=resnet50-0676ba61.pth \\
      --workdir=runs/deit_s16-hard
Cost: 300 x 1,251 steps of 1,024 images; on a TPU pod use launch/tpu_pod.sh with the same flags.
The teacher's input: the dataset's statistics; a teacher trained with others takes
`--config.teacher.mean=... --config.teacher.std=...` (the step re-normalises its input).

`recipe=small` is the same recipe for small images (Fashion-MNIST, 28 x 28, Debian's package):
a deit_micro4 student for DeiT's methods, else vit_micro4 (patch 4, width 64, 4 blocks), AdamW 1e-3 at batch 128,
weight decay 0.05, 1 warm-up epoch, cosine to 1e-5, 15 epochs of the 60,000 images, label
smoothing 0.1, crop + flip, and the quick-start's resnet20 teacher;
docs/results/cross_architecture.md uses it. RandAugment, mixup and erasing are off: this ViT
underfits at this length (its training accuracy stays at its test accuracy: 85.4 % after 10
epochs alone, 2026-12-04), so it has nothing for them to regularise.

Args: recipe (imagenet | small), method (none | kd | a registered method: deit_hard,
deit_soft, afd, sp, ...), student, teacher, seed.
"""
from afd_jax.data import stats
from afd_jax.distill import registry
from configs import imagenet as imagenet_config
from configs import methods, quickstart
from configs.base import parse_arg

DEFAULTS = {'recipe': 'imagenet', 'method': 'deit_hard', 'student': '', 'teacher': '',
            'seed': '0'}
# The default student: with a distillation token for DeiT's methods, else the same ViT without
# one (an untrained second head would spoil the averaged evaluation).
STUDENTS = {'imagenet': ('deit_s16', 'vit_s16'), 'small': ('deit_micro4', 'vit_micro4')}
TEACHERS = {'imagenet': 'resnet50im', 'small': 'resnet20'}


def imagenet(c) -> None:
  """DeiT's ImageNet recipe (see the module docstring)."""
  imagenet_config.set_dataset(c)
  c.dataset.randaugment_ops, c.dataset.randaugment_magnitude = 2, 9.0
  c.dataset.randaugment_magnitude_std = 0.5
  c.dataset.random_erasing = 0.25
  c.mixup.mixup_alpha, c.mixup.cutmix_alpha, c.mixup.switch_prob = 0.8, 1.0, 0.5
  c.loss.label_smoothing = 0.1
  c.student.drop_path_rate = 0.1
  c.ema_decay = 0.99996
  c.num_epochs, c.batch_size, c.eval_batch_size = 300, 1024, 1000
  opt = c.optimizer
  opt.name, opt.learning_rate, opt.lr_batch_scale, opt.weight_decay = 'adamw', 5e-4, 512, 0.05
  opt.schedule, opt.warmup_epochs, opt.warmup_init_lr = 'cosine', 5.0, 1e-6
  opt.min_learning_rate = 1e-5
  c.log_every_steps, c.checkpoint_every_steps = 500, 2000


def small(c) -> None:
  """The recipe for 28/32-pixel images (see the module docstring)."""
  c.dataset.name = 'fashion_mnist_local'
  c.dataset.mean, c.dataset.std = stats.FASHION_MNIST_MEAN, stats.FASHION_MNIST_STD
  c.dataset.crop_padding = 2
  c.loss.label_smoothing = 0.1
  c.teacher.checkpoint = quickstart.TEACHER_CHECKPOINT
  c.num_epochs, c.batch_size, c.eval_batch_size = 15, 128, 1000
  opt = c.optimizer
  opt.name, opt.learning_rate, opt.weight_decay = 'adamw', 1e-3, 0.05
  opt.schedule, opt.warmup_epochs, opt.warmup_init_lr = 'cosine', 1.0, 1e-6
  opt.min_learning_rate = 1e-5
  c.log_every_steps, c.keep_checkpoints = 100, 2


RECIPES = {'imagenet': imagenet, 'small': small}


def get_config(arg: str = ''):
  a = parse_arg(arg, DEFAULTS, 'deit.py')
  if a['recipe'] not in RECIPES:
    raise ValueError(f'deit.py: recipe must be one of {", ".join(RECIPES)}, got '
                     f'{a["recipe"]!r}.')
  c = methods.get_config(a['method'])
  RECIPES[a['recipe']](c)
  c.seed = int(a['seed'])
  distilled = c.method != 'none' and registry.get(c.method).needs_distillation_token
  c.student.name = a['student'] or STUDENTS[a['recipe']][0 if distilled else 1]
  c.teacher.name = a['teacher'] or TEACHERS[a['recipe']]
  c.name = f'deit-{a["recipe"]}-{c.student.name}-{a["method"]}-s{c.seed}'
  return c
