"""ImageNet (TFDS `imagenet2012`, manual download): ResNet-34 -> ResNet-18 with AFD.

Recipe (the independent port that reproduced the paper's 71.38 with 71.58, docs/method.md): 100
epochs, global batch 256, SGD lr 0.1 (x0.1 after epochs 30, 60, 90), momentum 0.9, weight decay
1e-4, beta 50; random-resized-crop 224 + flip, eval resize 256 / centre crop 224. Our choices
where the spec is silent: CE weight 1 and no KD (set `--config.loss.kd_weight=0.9` to add it).
The teacher is torchvision's ResNet-34 (`resnet34-333f7ec4.pth`, read with weights_only=True).

Args: method (none | kd | afd | fitnet | at | sp[+kd]), seed, model (train one model alone).
  python -m afd_jax.main --config=configs/imagenet.py:method=afd --workdir=runs/imagenet-afd \\
      --config.dataset.data_dir=/data/tfds --config.teacher.checkpoint=resnet34-333f7ec4.pth
TPU pod: launch/tpu_pod.sh with the same flags. Cost: 100 x 5,005 steps of 256 images; the data
streams from files (shuffle_buffer 16384) and each host reads its own share.
"""
from afd_jax.data import stats
from configs import methods
from configs.base import get_base_config, parse_arg

DEFAULTS = {'method': 'afd', 'seed': '0', 'model': ''}


def set_dataset(c) -> None:
  """TFDS imagenet2012 at 224x224 (random-resized crop + flip), streamed from its files."""
  c.dataset.name = 'imagenet2012'
  c.dataset.eval_split = 'validation'
  c.dataset.augment = 'imagenet'
  c.dataset.image_size = 224
  c.dataset.mean, c.dataset.std = stats.IMAGENET_MEAN, stats.IMAGENET_STD
  c.dataset.shuffle_buffer = 16384
  c.dataset.cache = False


def get_config(arg: str = ''):
  a = parse_arg(arg, DEFAULTS, 'imagenet.py')
  c = methods.get_config('none' if a['model'] else a['method'])
  c.seed = int(a['seed'])
  set_dataset(c)
  c.teacher.name, c.student.name = 'resnet34im', a['model'] or 'resnet18im'
  c.num_epochs, c.batch_size, c.eval_batch_size = 100, 256, 1000
  c.optimizer.learning_rate, c.optimizer.weight_decay = 0.1, 1e-4
  c.optimizer.decay_epochs = (31, 61, 91)  # 1-based: x0.1 after 30, 60 and 90 epochs
  c.log_every_steps = 500
  c.checkpoint_every_steps = 2000
  methods.apply_recipe(c, 'imagenet')  # AFD: beta 50, no KD (its registration's `recipes`)
  c.name = f'imagenet-{c.student.name}' + ('' if a['model'] else f'-{a["method"]}')
  return c
