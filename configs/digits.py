"""Smoke runs on the offline `digits` dataset (scikit-learn's 8x8 grey, 1,437 train / 360 test):
~2 min each on 2 CPU cores; too easy to separate methods (configs/quickstart.py shows the gain),
but it needs nothing beyond the Python packages. The tests' tiny runs start from it.

Three runs share this file (`get_config(arg)`):
  teacher  train resnet20 alone                   -> WORKDIR/teacher
  student  train resnet8 alone (no distillation)  -> WORKDIR/student
  afd      distil resnet20 -> resnet8 with AFD    -> WORKDIR/afd (teacher from WORKDIR/teacher)
  two_teachers  distil resnet20 and resnet8 (from WORKDIR/teacher and WORKDIR/student) into
           resnet8 with AFD over both teachers' layers and KD from their average

For example:
  python -m afd_jax.main --config=configs/digits.py:teacher --workdir=/tmp/digits/teacher
  python -m afd_jax.main --config=configs/digits.py:afd --workdir=/tmp/digits/afd \
      --config.teacher.checkpoint=/tmp/digits/teacher
  python -m afd_jax.main --config=configs/digits.py:two_teachers --workdir=/tmp/digits/two \
      '--config.teachers[0].checkpoint=/tmp/digits/teacher' \
      '--config.teachers[1].checkpoint=/tmp/digits/student'
"""
from afd_jax.data import stats
from configs.base import get_base_config, teacher_entry

RUNS = ('teacher', 'student', 'afd', 'two_teachers')


def get_config(arg: str = 'afd'):
  if arg not in RUNS:
    raise ValueError(f'digits.py takes one of {", ".join(RUNS)}, got {arg!r}.')
  c = get_base_config()
  c.name = f'digits-{arg}'
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
  if arg == 'two_teachers':
    c.teachers = [teacher_entry('resnet20'), teacher_entry('resnet8')]
  return c
