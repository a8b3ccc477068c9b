"""Semantic segmentation: a teacher with an FPN head distilled into a smaller one.

Args: data (scenes | pets | folder), method (teacher | none | kd | cwd | afd | at | fitnet | ...:
any method that distils segmentation), seed.
- scenes (the offline study): `fashion_mnist_scenes`, 48x48 grey scenes of Fashion-MNIST
  garments, 11 classes (background + 10); teacher resnet20 + FPN, student resnet8 + FPN (head
  width 32); 10 epochs of the first 5,000 training scenes, batch 64, SGD 0.05 with cosine decay,
  weight decay 5e-4, random scale 0.75-1.5, crop 48, flip. Eval: the 2,000 test scenes, mIoU.
  On an idle 2-core CPU (2026-12-08) a step takes 1.4 s for the teacher, 0.8-1.0 s for a
  distilled student: about 18 and 11-13 minutes a run.
- pets: TFDS `oxford_iiit_pet` (prepare it first: `tfds build oxford_iiit_pet`), 2 classes
  (pet, background; the trimap's border ignored), crops of 128, resnet18im + FPN teacher and
  resnet8 + FPN student... at this size a GPU's work.
- folder: `mask_folder`, the layout Cityscapes and VOC convert to (`root/<split>/images/*`,
  `root/<split>/masks/*.png`, 255 ignored); set --config.dataset.folder and
  --config.dataset.num_classes (Cityscapes: 19). Crops of 512, resnet50im + FPN teacher,
  resnet18im + FPN student, 80 epochs, batch 16 (commands: docs/segmentation.md; the cost
  of such a run has not been measured here).
Method weights: none = CE; kd = CE + pixel KD (T 1, weight 1); cwd = CE + 3 CWD (T 4, the CWD
authors' recipe); afd = CE + 200 L_AFD over the backbone and head taps (no KD, to compare the
feature losses alone); other registered methods at their own defaults.

  python -m afd_jax.main --config=configs/segmentation.py:method=teacher,seed=0 \\
      --workdir=workdirs/segmentation/teacher-s0
  python -m afd_jax.main --config=configs/segmentation.py:method=cwd,seed=0 \\
      --config.teacher.checkpoint=workdirs/segmentation/teacher-s0 \\
      --workdir=workdirs/segmentation/cwd-s0
"""
from afd_jax.data import stats
from configs import methods
from configs.base import parse_arg

DEFAULTS = {'data': 'scenes', 'method': 'cwd', 'seed': '0'}
DATA = {  # dataset name, crop, (teacher, student), classes
    'scenes': ('fashion_mnist_scenes', 48, ('resnet20', 'resnet8')),
    'pets': ('oxford_iiit_pet', 128, ('resnet18im', 'resnet8')),
    'folder': ('mask_folder', 512, ('resnet50im', 'resnet18im')),
}
LOGIT_WEIGHTS = {  # (CE, KD) of segmentation's methods; KD at temperature 1
    'none': (1.0, 0.0), 'kd': (1.0, 1.0), 'afd': (1.0, 0.0)}


def get_config(arg: str = ''):
  a = parse_arg(arg, DEFAULTS, 'segmentation.py')
  if a['data'] not in DATA:
    raise ValueError(f'segmentation.py: data must be one of {", ".join(DATA)}, got '
                     f'{a["data"]!r}.')
  name, crop, (teacher, student) = DATA[a['data']]
  method = 'none' if a['method'] == 'teacher' else a['method']
  c = methods.set_method(methods.get_base_config(), method)
  c.loss.ce_weight, c.loss.kd_weight = LOGIT_WEIGHTS.get(method, methods.logit_weights(method))
  c.loss.kd_temperature = 1.0
  c.name = f'segmentation-{a["data"]}-{a["method"]}-s{a["seed"]}'
  c.seed = int(a['seed'])
  c.dataset.name, c.dataset.image_size = name, crop
  c.teacher.name, c.teacher.head = teacher, 'fpn'
  c.student.name, c.student.head = teacher if a['method'] == 'teacher' else student, 'fpn'
  if a['data'] == 'scenes':
    c.dataset.mean, c.dataset.std = stats.FASHION_MNIST_SCENES_MEAN, stats.FASHION_MNIST_SCENES_STD
    c.dataset.scale = (0.75, 1.5)
    c.teacher.head_width = c.student.head_width = 32
    c.dataset.train_subset = 5000
    c.num_epochs, c.batch_size, c.eval_batch_size = 10, 64, 500
  else:
    c.dataset.mean, c.dataset.std = stats.IMAGENET_MEAN, stats.IMAGENET_STD
    c.num_epochs, c.batch_size, c.eval_batch_size = (80, 16, 16) if a['data'] == 'folder' else (
        40, 32, 32)
  c.optimizer.learning_rate, c.optimizer.weight_decay = 0.05, 5e-4
  c.optimizer.schedule = 'cosine'
  c.afd.qk_dim = 64
  c.log_every_steps = 50
  c.keep_checkpoints = 2
  return c
