"""Quick-start on the offline `digits` dataset (8x8 grey, 1,437 train / 360 test): ~5 min on 2 CPU cores.

Three runs share this file (`get_config(arg)`):
  teacher  train resnet20 alone                   -> WORKDIR/teacher
  student  train resnet8 alone (no distillation)  -> WORKDIR/student
  afd      distil resnet20 -> resnet8 with AFD    -> WORKDIR/afd (teacher from WORKDIR/teacher)

`python -m afd_jax.quickstart --workdir=DIR` runs all three (reusing DIR/teacher when present)
and prints the table. One run by hand:
  python -m afd_jax.main --config=configs/quickstart.py:afd --workdir=/tmp/qs/afd \
      --config.teacher.checkpoint=/tmp/qs/teacher
"""
from afd_jax.data import stats
from configs.base import get_base_config

RUNS = ('teacher', 'student', 'afd')


def get_config(arg: str = 'afd'):
  if arg not in RUNS:
    raise ValueError(f'quickstart.py takes one of {", ".join(RUNS)}, got {arg!r}.')
  c = get_base_config()
  c.name = f'quickstart-{arg}'
  c.dataset.name = 'digits'
  c.dataset.augment = 'cifar'
  c.dataset.crop_padding = 1
  c.dataset.random_flip = False       # a mirrored digit is another symbol
  c.dataset.mean, c.dataset.std = stats.DIGITS_MEAN, stats.DIGITS_STD
  c.teacher.name = 'resnet20'
  c.student.name = 'resnet8'
  c.batch_size = 64
  c.eval_batch_size = 360
  c.num_epochs = 30
  c.optimizer.learning_rate = 0.05
  c.optimizer.decay_epochs = (20, 25)
  c.log_every_steps = 100
  c.afd.qk_dim = 64
  if arg == 'teacher':
    c.student.name = 'resnet20'
  if arg in ('teacher', 'student'):
    c.method, c.loss.kd_weight = 'none', 0.0
  return c
