"""The shared base configuration; every experiment file starts from `get_base_config()`.

Field names are stable: scripts and docs rely on them.
"""
from typing import Dict

import ml_collections

from afd_jax.distill import registry  # every method, registered (their options below)


def parse_arg(arg: str, defaults: Dict[str, str], file: str) -> Dict[str, str]:
  """`'k=v,k=v'` (the part after `file.py:`) over `defaults`; unknown keys are an error."""
  values = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in defaults:
      raise ValueError(f'{file} takes {",".join(f"{k}=..." for k in defaults)}; got {item!r}.')
    values[key] = value
  return values


def _model_options(section: ml_collections.ConfigDict) -> None:
  """Fields for any Flax model (`name` = 'package.module:factory'); see afd_jax/models/tapping.py."""
  section.kwargs = ml_collections.ConfigDict()  # keyword arguments of a factory
  section.taps = ''              # '' = the zoo's own taps ('auto' for a factory) | 'auto' |
                                 # comma-separated globs over module paths, e.g. 'layer*'
  section.prefix_tokens = -1     # token taps: class/register tokens to drop; -1 = from the model
  section.token_grid = ()        # token taps: (h, w); () = from the image's patch grid or sqrt(N)
  section.train_arg = ''         # train flag: '' = from __call__ | a name | '!name' (eval) | none
  section.head = ''              # segmentation: '' = the model's classifier | fpn (CNNs) |
                                 # progressive (ViTs): per-pixel logits (models/segmentation.py)
  section.head_width = 64        # channels of the segmentation head's levels
  section.head_upsamplings = 0   # progressive: 2x steps; 0 = log2 of the model's patch size


def teacher_entry(name: str, checkpoint: str = '', *, weight: float = 1.0, label: str = '',
                  **fields) -> ml_collections.ConfigDict:
  """One entry of `config.teachers`: `config.teacher`'s fields at their defaults, with `name`,
  `checkpoint` and `fields` set; `label` names its taps (`label:layer`; '' = `name`) and its
  variables; `weight` is its share of KD (the weights are normalised to sum 1)."""
  entry = ml_collections.ConfigDict(get_base_config().teacher.to_dict())
  entry.name, entry.checkpoint, entry.label, entry.weight = name, checkpoint, label, float(weight)
  for key, value in fields.items():
    entry[key] = value
  return entry


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'afd'                 # a label for logs and summary.json
  c.seed = 0
  c.method = 'afd'               # feature loss: none | a registered method (afd_jax/distill/:
                                 # afd, fitnet, at, sp)

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'cifar100'    # a TFDS name, 'digits', 'fashion_mnist_local' or 'image_folder';
                                 # segmentation: fashion_mnist_scenes, oxford_iiit_pet, mask_folder
  c.dataset.num_classes = 0      # mask_folder: its masks' classes (255 = ignored)
  c.dataset.scale = (0.5, 2.0)   # segmentation: the random scale range before the crop
  c.dataset.data_dir = ''        # TFDS data_dir ('' = TFDS default, ~/tensorflow_datasets)
  c.dataset.folder = ''          # image_folder: root with train/ and test/ (or valid/);
                                 # fashion_mnist_local: the IDX folder (default: Debian's)
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'test'
  c.dataset.train_subset = 0     # >0: use only the first N training examples
  c.dataset.augment = 'cifar'    # cifar (pad + random crop + flip) | imagenet | none
  c.dataset.crop_padding = 4     # cifar augmentation: zero padding before the random crop
  c.dataset.random_flip = True   # horizontal flips (cifar and imagenet augmentation)
  c.dataset.image_size = 32      # imagenet augmentation: output size (eval: resize 256/224 ratio);
                                 # segmentation: the crop (eval: resized to it)
  c.dataset.mean = (0.5071, 0.4867, 0.4408)
  c.dataset.std = (0.2675, 0.2565, 0.2761)
  c.dataset.shuffle_buffer = 0   # 0: a full permutation of the split each epoch
  c.dataset.num_shards = 0       # disjoint shares of the train split, 0 = one per process; fix it
                                 # to get the same batches on any number of processes
  c.dataset.cache = True         # keep decoded examples in memory (small datasets)
  # ViT recipe augmentations (0 = off): RandAugment (timm's rand-m9-mstd0.5-inc1 is ops 2,
  # magnitude 9, magnitude_std 0.5) before normalisation; random erasing after it.
  c.dataset.randaugment_ops = 0
  c.dataset.randaugment_magnitude = 9.0
  c.dataset.randaugment_magnitude_std = 0.5
  c.dataset.random_erasing = 0.0  # probability per image (DeiT: 0.25, timm's 'pixel' mode)

  c.teacher = ml_collections.ConfigDict()
  c.teacher.name = 'wrn40x2'
  c.teacher.checkpoint = ''      # our run's workdir (Orbax) or a PyTorch .pth; '' = no teacher
  c.teacher.dtype = ''           # the teacher's activations: '' = config.dtype | float32 | bfloat16
  c.teacher.mean = ()            # the input statistics the teacher was trained with; () = the
  c.teacher.std = ()             # dataset's: the step re-normalises the teacher's input to them
  c.teacher.shard = False        # split the teacher's weights over the mesh's model axis
                                 # (FSDP-style, sharding.fsdp) instead of replicating them
  _model_options(c.teacher)

  # Several teachers at once: a list of `teacher_entry(...)` sections (each as c.teacher, plus
  # `label` and a KD `weight`), used instead of c.teacher where set. KD distils their weighted
  # ensemble (loss.kd_over_teachers); a method with `several_teachers` (AFD) takes the union of
  # their taps, named `label:layer`; other methods refuse several teachers.
  c.teachers = []

  c.student = ml_collections.ConfigDict()
  c.student.name = 'wrn16x2'
  c.student.init_checkpoint = ''  # start from these weights (our workdir or a .pth); a classifier
                                 # of another class count is re-initialised (transfer learning)
  c.student.drop_path_rate = 0.0  # stochastic depth of the zoo's ViTs (DeiT: 0.1)
  c.student.shard = False        # split the train state (student, distiller, optimizer state,
                                 # EMA) over the mesh's model axis (sharding.fsdp); checkpoints
                                 # restore onto any mesh shape and either setting
  _model_options(c.student)

  c.loss = ml_collections.ConfigDict()
  c.loss.ce_weight = 1.0
  c.loss.kd_weight = 0.9         # Hinton KD on logits; 0 disables
  c.loss.kd_temperature = 4.0
  c.loss.kd_over_teachers = 'average'  # several teachers: average (KL to their weighted mean
                                 # probabilities) | sum (weighted sum of each one's KL)
  c.loss.feature_weight = 200.0  # beta, the weight of the feature loss
  c.loss.label_smoothing = 0.0   # of the CE targets (DeiT: 0.1)

  # Mixup / CutMix on the batch, inside the step (the teacher sees the same images), as timm's
  # Mixup in 'batch' mode; 0 alphas = off (DeiT: mixup 0.8, cutmix 1.0, switch_prob 0.5).
  c.mixup = ml_collections.ConfigDict()
  c.mixup.mixup_alpha = 0.0
  c.mixup.cutmix_alpha = 0.0
  c.mixup.prob = 1.0             # probability of mixing a batch at all
  c.mixup.switch_prob = 0.5      # with both alphas > 0: probability of CutMix instead of Mixup

  c.afd = ml_collections.ConfigDict()
  c.afd.qk_dim = 128

  # Baselines (configs/methods.py sets each method's loss weights). AT pairs the stage-final
  # taps of every stage both models have; SP uses each model's last tap; both are parameter-free.
  c.fitnet = ml_collections.ConfigDict()
  c.fitnet.student_tap = -1      # -1: last tap of the middle stage (CRD's hint_layer=2); else a
  c.fitnet.teacher_tap = -1      # tap index into model.taps()
  c.fitnet.relu = True           # regressor 1x1 conv -> BN -> ReLU, as CRD's ConvReg

  # Every other registered method's own settings, at their defaults (Method.options).
  for name in registry.registered():
    options = registry.get(name).options
    if options and name not in c:
      c[name] = ml_collections.ConfigDict(dict(options))

  # The method's own stage before the main training (AB, FT, FSP: the CRD benchmark's
  # init_epochs); -1 takes the method's default (afd_jax/distill/<method>.py's Pretrain).
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.epochs = -1.0
  c.pretrain.learning_rate = -1.0
  c.pretrain.momentum = -1.0
  c.pretrain.weight_decay = -1.0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'sgd'           # sgd | adamw (decoupled weight decay, masked: see optim.py)
  c.optimizer.learning_rate = 0.05   # for the global batch size below
  c.optimizer.lr_batch_scale = 0     # >0: learning_rate * batch_size / this (DeiT: 512)
  c.optimizer.b1 = 0.9               # adamw
  c.optimizer.b2 = 0.999             # adamw
  c.optimizer.eps = 1e-8             # adamw
  c.optimizer.clip_grad_norm = 0.0   # >0: clip gradients to this global norm
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 5e-4    # PyTorch-style: added to the gradient before momentum
  c.optimizer.decay_bias_and_bn = True  # official: decay every parameter
  c.optimizer.schedule = 'step'      # step | cosine | constant
  c.optimizer.decay_epochs = (150, 180, 210)  # 1-based epochs from which lr *= decay_factor
  c.optimizer.decay_factor = 0.1
  c.optimizer.warmup_epochs = 0.0
  c.optimizer.warmup_init_lr = 0.0   # the warm-up's first learning rate (DeiT: 1e-6)
  c.optimizer.min_learning_rate = 0.0  # cosine: the floor it decays to (DeiT: 1e-5)

  c.num_epochs = 240
  c.batch_size = 64              # global, over all devices and hosts
  c.eval_batch_size = 256        # global
  c.num_train_steps = -1         # >0: stop after this many steps (tests, smoke runs)
  c.dtype = 'float32'            # activations: float32 | bfloat16 (parameters stay float32) |
                                 # float64: the whole step and state (checks numerics; CPU/GPU)
  c.mesh_shape = (-1, 1)         # (data, model); -1 = all remaining devices
  c.bn_group_size = 0            # training batch-norm statistics over groups of this many
                                 # consecutive examples; 0 = the global batch (synchronised BN).
                                 # Dividing the per-device batch: no cross-device reduction per
                                 # layer, same result on any device count (layers.batch_norm_groups)

  c.prefetch = True              # make the next global batch while a step runs (double
                                 # buffering); False makes it just before its step
  c.log_every_steps = 50
  c.eval_every_epochs = 1
  c.checkpoint_every_steps = 0   # 0: only at the end of every epoch (and on preemption)
  c.keep_checkpoints = 3
  c.keep_best = True             # also keep the checkpoint with the best eval top-1
  c.resume_from = ''             # a workdir to start from when this workdir has no checkpoint
  c.plot_attention = True
  c.plot_predictions = True      # segmentation: predictions.png (image, truth, student, teacher)
  c.ema_decay = 0.0              # >0: keep an exponential moving average of the student's
                                 # parameters (DeiT: 0.99996) and evaluate it too (eval_ema)
  c.debug_nan_at_step = 0        # >0: make the CE loss NaN at this step (tests the divergence guard)
  return c
