"""CIFAR-100, the official AFD recipe: 240 epochs, batch 64, SGD 0.05 (x0.1 from epochs 150, 180,
210), weight decay 5e-4, crop + flip; AFD: CE + 0.9 KD (T 4) + 200 L_AFD, qk_dim 128.

Args (`configs/cifar100.py:k=v,...`): teacher, student, method (none | kd | any registered
method, `+kd` adds KD to it; weights: configs/methods.py, per-pair values: each method's `recipes`), seed. The pairs of the
benchmark table (docs/method.md): wrn40x2->wrn16x2, wrn40x2->wrn40x1, resnet56->resnet20,
resnet110->resnet20, resnet110->resnet32, resnet32x4->resnet8x4, vgg13->vgg8.

1. Train the teacher (method=none trains `student` alone; `model=` says the same):
     python -m afd_jax.main --config=configs/cifar100.py:model=wrn40x2 --workdir=runs/wrn40x2
2. Distil it (or point teacher.checkpoint at a CRD/official .pth):
     python -m afd_jax.main --config=configs/cifar100.py:teacher=wrn40x2,student=wrn16x2,method=afd \\
         --config.teacher.checkpoint=runs/wrn40x2 --workdir=runs/wrn40x2-wrn16x2-afd
Cost: 240 epochs x 781 steps = 187,440 steps. The WRN-40-2 -> WRN-16-2 AFD step takes ~1.3 s on
a 2-core CPU (about 70 h: use an accelerator); measured step times: docs/performance.md.
The dataset: `tfds build cifar100` once (needs network), or any prepared TFDS data_dir.
"""
from afd_jax.data import stats
from configs import methods
from configs.base import parse_arg

PAIRS = (('wrn40x2', 'wrn16x2'), ('wrn40x2', 'wrn40x1'), ('resnet56', 'resnet20'),
         ('resnet110', 'resnet20'), ('resnet110', 'resnet32'), ('resnet32x4', 'resnet8x4'),
         ('vgg13', 'vgg8'))
DEFAULTS = {'teacher': 'wrn40x2', 'student': 'wrn16x2', 'method': 'afd', 'seed': '0', 'model': ''}


def get_config(arg: str = ''):
  a = parse_arg(arg, DEFAULTS, 'cifar100.py')
  if a['model']:
    a['student'], a['method'] = a['model'], 'none'
  c = methods.get_config(a['method'])
  c.seed = int(a['seed'])
  c.dataset.name = 'cifar100'
  c.dataset.mean, c.dataset.std = stats.CIFAR100_MEAN, stats.CIFAR100_STD
  c.teacher.name, c.student.name = a['teacher'], a['student']
  c.num_epochs, c.batch_size, c.eval_batch_size = 240, 64, 1000
  c.optimizer.learning_rate, c.optimizer.weight_decay = 0.05, 5e-4
  c.optimizer.decay_epochs = (150, 180, 210)
  c.log_every_steps = 200
  # Per-pair settings of the methods' own CIFAR-100 recipes (DKD's beta, ReviewKD's weight,
  # FT's stage rate for VGG students): each method's registration (`recipes`).
  methods.apply_recipe(c, 'cifar100')
  distilled = c.method != 'none' or c.loss.kd_weight > 0
  c.name = (f'cifar100-{a["teacher"]}-{a["student"]}-{a["method"]}' if distilled
            else f'cifar100-{a["student"]}')
  return c
