"""Quick-start on Fashion-MNIST (Debian's `dataset-fashion-mnist`, read offline): what distillation
buys a small student that sees little data.

The teacher, a resnet20, was trained by our own code on the first 20,000 training images and
ships with the repository (launch/quickstart_teacher/, with the command that made it). Each
student is a resnet8 trained on only the first 2,000 training images (a tenth of the teacher's),
so the time goes to the students and the teacher's knowledge has something to add:
  student  resnet8 alone (cross-entropy)
  kd       Hinton KD from the teacher: CE 1 + KD 0.9 (T 4), AFD's logit weights
  afd      the official AFD recipe: CE 1 + KD 0.9 + 200 L_AFD (so KD and AFD differ only by
           AFD's feature term)
Eval: the full 10,000-image test split after the last epoch.

`python -m afd_jax.quickstart --workdir=DIR` runs the three students and prints the table. One
run by hand (args: run, optionally seed=S):
  python -m afd_jax.main --config=configs/quickstart.py:afd,seed=1 --workdir=/tmp/qs/afd
`configs/quickstart.py:teacher` retrains the teacher (launch/quickstart_teacher/README.md).
"""
import os

from afd_jax.data import stats
from configs import methods
from configs.base import parse_arg

RUNS = ('teacher', 'student', 'kd', 'afd')
STUDENT_RUNS = ('student', 'kd', 'afd')
TEACHER_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  'launch', 'quickstart_teacher', 'resnet20_fashion_mnist.msgpack')
TEACHER_SUBSET, STUDENT_SUBSET = 20000, 2000


def get_config(arg: str = 'afd'):
  """`arg`: a run name (RUNS), optionally followed by `,seed=S` and `,student=NAME` (another
  student, e.g. `vit_mini4` for CNN -> ViT distillation; default resnet8)."""
  run, _, rest = (arg or 'afd').partition(',')
  a = parse_arg(rest, {'seed': '0', 'student': 'resnet8'}, 'quickstart.py:<run>')
  if run not in RUNS:
    raise ValueError(f'quickstart.py takes one of {", ".join(RUNS)} (then ,seed=S), got {run!r}.')
  c = methods.get_config({'teacher': 'none', 'student': 'none'}.get(run, run))
  if run == 'kd':  # AFD's logit weights, so that KD and AFD differ only by AFD's feature term
    c.loss.ce_weight, c.loss.kd_weight = 1.0, 0.9
  c.name = (f'quickstart-{run}' + (f'-{a["student"]}' if a['student'] != 'resnet8' else '')
            + (f'-s{a["seed"]}' if a['seed'] != '0' else ''))
  c.seed = int(a['seed'])
  c.dataset.name = 'fashion_mnist_local'
  c.dataset.mean, c.dataset.std = stats.FASHION_MNIST_MEAN, stats.FASHION_MNIST_STD
  c.dataset.crop_padding = 2
  c.teacher.name = 'resnet20'
  c.teacher.checkpoint = TEACHER_CHECKPOINT if run in ('kd', 'afd') else ''
  c.student.name = 'resnet20' if run == 'teacher' else a['student']
  c.dataset.train_subset = TEACHER_SUBSET if run == 'teacher' else STUDENT_SUBSET
  c.num_epochs = 8
  c.batch_size, c.eval_batch_size = 128 if run == 'teacher' else 64, 1000
  c.optimizer.learning_rate = 0.1 if run == 'teacher' else 0.05
  c.optimizer.weight_decay = 5e-4
  c.optimizer.schedule = 'cosine'
  c.eval_every_epochs = 8             # once, after the last epoch
  c.log_every_steps = 100
  c.keep_checkpoints = 1
  c.afd.qk_dim = 64
  return c
