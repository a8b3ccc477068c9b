"""Writes replay_afd_float64.npz: a few AFD training steps of the official code, in float64.

  AFD_OFFICIAL_DIR=<checkout of clovaai/attention-feature-distillation> \
  python tests/reference/make_replay_vectors.py

(or --official DIR; --out DIR). The official teacher and student (resnet20 -> resnet8) and its
AFD module get weights redrawn by weights.py from the seeds kept in the file, are cast to
float64 (`.double()`), and train for STEPS steps as the official `utils.train_kl` trains:
teacher in eval mode, student and AFD module in train mode, loss CE + alpha KD(T) + beta AFD,
torch SGD (momentum, weight decay) over the student's and the AFD module's parameters. The
batches are stored as they are. tests/test_float64.py replays them with afd_jax's train step.
"""
import argparse
import os
import pathlib
import sys
import types

import numpy as np
import torch

import make_vectors  # pylint: disable=g-import-not-at-top (tests/reference/make_vectors.py)

HERE = pathlib.Path(__file__).resolve().parent
TEACHER, STUDENT, NUM_CLASSES = 'resnet20', 'resnet8', 10
SIZE, BATCH, STEPS, QK_DIM = 10, 4, 5, 32
# The official main.py's defaults (lr, momentum, weight decay, alpha, temperature, beta).
RECIPE = {'lr': 0.05, 'momentum': 0.9, 'weight_decay': 5e-4, 'alpha': 0.9,
          'temperature': 4.0, 'beta': 200.0}
SEED = 3000  # teacher SEED, student SEED + 1, AFD module SEED + 2, batches SEED + 3
# Final arrays stored (official state_dict names): small ones, one of each kind.
FINAL_STUDENT = ('fc.weight', 'fc.bias', 'conv1.weight', 'bn1.running_mean', 'bn1.running_var',
                 'layer3.0.bn2.running_var', 'layer3.0.downsample.1.running_mean')
FINAL_AFD = ('attention.p_t', 'attention.p_s', 'attention.linear_trans_s.bilinear.bn.running_var',
             'attention.linear_trans_t.query_layer.0.linear.bias',
             'attention.linear_trans_s.key_layer.2.bn.running_mean')


def resnet_layers(name: str) -> list:
  """The official `utils.LAYER` rule for CIFAR ResNets (every block); resnet8 has no entry."""
  depth = int(name[len('resnet'):])
  return [int(i) for i in np.arange(1, (depth - 2) // 2 + 1)]


def build(off, seed: int):
  """Teacher, student and AFD module with redrawn weights, in float64; their descriptions."""
  described = {}
  nets = {}
  for k, name in enumerate((TEACHER, STUDENT)):
    torch.manual_seed(seed + k)
    nets[name] = make_vectors.build(off, name, NUM_CLASSES)
    described[name] = make_vectors.load_generated(nets[name], seed + k, 1.0)
  args = types.SimpleNamespace(qk_dim=QK_DIM, guide_layers=resnet_layers(TEACHER),
                               hint_layers=resnet_layers(STUDENT))
  args.t_shapes = make_vectors.probe_shapes(off, TEACHER, SIZE, args.guide_layers)
  args.s_shapes = make_vectors.probe_shapes(off, STUDENT, SIZE, args.hint_layers)
  args.n_t, args.unique_t_shapes = off.unique_shape(args.t_shapes)
  torch.manual_seed(seed + 2)
  afd = off.AFD(args)
  described['afd'] = make_vectors.load_generated(afd, seed + 2, 1.0)
  return nets[TEACHER].double(), nets[STUDENT].double(), afd.double(), described


def batches(seed: int):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((STEPS, BATCH, SIZE, SIZE, 3))  # float64, channels-last
  labels = rng.integers(0, NUM_CLASSES, (STEPS, BATCH))
  return images, labels


def replay(off, teacher, student, afd, images, labels) -> dict:
  """The official training loop (utils.train_kl) over the given batches; per-step terms."""
  from distill.KD import DistillKL  # pylint: disable=g-import-not-at-top
  criterion_ce, criterion_kl = torch.nn.CrossEntropyLoss(), DistillKL(RECIPE['temperature'])
  trainable = torch.nn.ModuleList([student, afd])
  optimizer = torch.optim.SGD(trainable.parameters(), lr=RECIPE['lr'],
                              momentum=RECIPE['momentum'], weight_decay=RECIPE['weight_decay'])
  student.train()
  afd.train()
  teacher.eval()
  terms = {'ce': [], 'kd': [], 'afd': [], 'loss': []}
  for x, y in zip(images, labels):
    inputs = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    targets = torch.from_numpy(y)
    with torch.no_grad():
      feat_t, output_t = teacher(inputs, is_feat=True)
      feat_t = [f.detach() for f in feat_t]
    feat_s, output_s = student(inputs, is_feat=True)
    loss_ce = criterion_ce(output_s, targets)
    loss_kl = criterion_kl(output_s, output_t)
    loss_kd = afd(feat_s, feat_t)
    loss = loss_ce + RECIPE['alpha'] * loss_kl + RECIPE['beta'] * loss_kd
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for key, value in (('ce', loss_ce), ('kd', loss_kl), ('afd', loss_kd), ('loss', loss)):
      terms[key].append(value.item())
  return {f'step/{k}': np.array(v, np.float64) for k, v in terms.items()}


def vectors(off) -> dict:
  teacher, student, afd, described = build(off, SEED)
  images, labels = batches(SEED + 3)
  out = {'teacher': np.array(TEACHER), 'student': np.array(STUDENT),
         'num_classes': np.int64(NUM_CLASSES), 'qk_dim': np.int64(QK_DIM),
         'images': images, 'labels': labels.astype(np.int64),
         **{f'recipe/{k}': np.float64(v) for k, v in RECIPE.items()}}
  for prefix, name in (('teacher', TEACHER), ('student', STUDENT), ('afd', 'afd')):
    out.update({f'{prefix}/{k}': v for k, v in described[name].items()})
  out.update(replay(off, teacher, student, afd, images, labels))
  student_sd, afd_sd = student.state_dict(), afd.state_dict()
  out.update({f'final_student/{k}': student_sd[k].numpy() for k in FINAL_STUDENT})
  out.update({f'final_afd/{k}': afd_sd[k].numpy() for k in FINAL_AFD})
  assert all(v.dtype != np.float32 for v in out.values())
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--official', default=os.environ.get('AFD_OFFICIAL_DIR'),
                      help='checkout of the official AFD code (default: $AFD_OFFICIAL_DIR)')
  parser.add_argument('--out', default=str(HERE), help='folder to write (default: this one)')
  args = parser.parse_args()
  if not args.official:
    parser.error('name the official checkout with --official or AFD_OFFICIAL_DIR')
  torch.set_num_threads(1)  # one fixed summation order
  off = make_vectors.load_official(args.official, None)
  path = pathlib.Path(args.out) / 'replay_afd_float64.npz'
  make_vectors.savez(path, vectors(off))
  print(path, path.stat().st_size)


if __name__ == '__main__':
  sys.exit(main())
