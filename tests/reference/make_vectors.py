"""Writes the golden vectors of tests/test_reference.py, computed by the official PyTorch code.

  AFD_OFFICIAL_DIR=<checkout of clovaai/attention-feature-distillation> \
  AFD_CRD_DIR=<checkout of HobbitLong/RepDistiller> python tests/reference/make_vectors.py

(or --official / --crd). The official AFD code has no VGG; vgg8 comes from the CRD benchmark
code it inherits its models from. Needs torch and numpy only. Weights, feature maps and images
are not stored: weights.py redraws them from the seeds kept in each file. See README.md.
"""
import argparse
import importlib.util
import io
import os
import pathlib
import sys
import types
import zipfile

import numpy as np
import torch

import weights  # pylint: disable=g-import-not-at-top (tests/reference/weights.py)

HERE = pathlib.Path(__file__).resolve().parent
NUM_CLASSES = 10
# model: (input size, init gain): one per family; odd sizes where the net allows it.
MODELS = {
    'wrn16x2': (24, 1.0),
    'resnet20': (17, 1.0),
    'resnet110': (12, 1.0),
    'resnet8x4': (16, 1.0),
    'resnet18': (15, 1.0),
    'resnet50im': (19, 1.0),
    'vgg8': (16, 1.0),
}
# (teacher, student, qk_dim, input size the feature shapes are taken at, batch)
PAIRS = [('wrn40x2', 'wrn16x2', 128, 12, 3), ('resnet110', 'resnet20', 64, 9, 4)]


def savez(path: pathlib.Path, arrays: dict):
  """np.savez_compressed, with fixed zip timestamps so that a rerun is byte-identical."""
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as zf:
    for key, value in arrays.items():
      buffer = io.BytesIO()
      np.lib.format.write_array(buffer, np.asarray(value), allow_pickle=False)
      info = zipfile.ZipInfo(key + '.npy', date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      zf.writestr(info, buffer.getvalue())


def f32(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy().astype(np.float32)


def nhwc(t: torch.Tensor) -> np.ndarray:
  return f32(t).transpose(0, 2, 3, 1) if t.ndim == 4 else f32(t)


def load_official(official: str, crd: str):
  sys.path.insert(0, official)
  import models  # pylint: disable=g-import-not-at-top
  from distill.AFD import AFD  # pylint: disable=g-import-not-at-top
  from utils import LAYER, unique_shape  # pylint: disable=g-import-not-at-top
  vgg = None
  if crd:  # by file path: RepDistiller's own `models` package would clash with AFD's
    spec = importlib.util.spec_from_file_location('crd_vgg', os.path.join(crd, 'models', 'vgg.py'))
    vgg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vgg)
  return types.SimpleNamespace(models=models, AFD=AFD, LAYER=LAYER, unique_shape=unique_shape,
                               vgg=vgg)


def build(off, name: str, num_classes: int) -> torch.nn.Module:
  if name == 'vgg8':
    return off.vgg.vgg8_bn(num_classes=num_classes)  # CRD's 'vgg8' (conv + BN + ReLU)
  return off.models.__dict__[name](num_classes=num_classes)


def tap_indices(off, name: str, num_feats: int) -> list:
  """Indices of the taps (docs/method.md) in the official `is_feat` list."""
  if name in off.LAYER:
    return [int(i) for i in off.LAYER[name]]
  if name == 'vgg8':
    return list(range(num_feats - 1))  # CRD: [relu(block0), ..., relu(block4), pooled]
  return list(range(1, num_feats - 1))  # [stem, every block, pooled]


def keys_and_shapes(module: torch.nn.Module):
  """State_dict names (without num_batches_tracked) and shapes, padded with -1 to 4 dims."""
  sd = module.state_dict()
  names = [k for k in sd if not k.endswith('num_batches_tracked')]
  shapes = np.full((len(names), 4), -1, np.int64)
  for i, k in enumerate(names):
    shapes[i, :sd[k].ndim] = sd[k].shape
  return names, shapes


def load_generated(module: torch.nn.Module, seed: int, gain: float):
  """Loads weights.state_dict(seed, ...) into `module`; returns the stored description."""
  names, shapes = keys_and_shapes(module)
  sd = weights.state_dict(seed, names, [s[s >= 0] for s in shapes], gain)
  result = module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
  assert not result.unexpected_keys and all(
      k.endswith('num_batches_tracked') for k in result.missing_keys), result
  return {'seed': np.int64(seed), 'gain': np.float64(gain), 'keys': np.array(names),
          'shapes': shapes}


def model_vectors(off, name: str, size: int, gain: float, seed: int) -> dict:
  torch.manual_seed(seed)
  model = build(off, name, NUM_CLASSES).eval()
  out = load_generated(model, seed, gain)
  shape = (2, size, size, 3)
  images = weights.images(seed + 1, shape)
  with torch.no_grad():
    feats, logits = model(torch.from_numpy(images.transpose(0, 3, 1, 2)), is_feat=True)
  taps = tap_indices(off, name, len(feats))
  out.update({'name': np.array(name), 'num_classes': np.int64(NUM_CLASSES),
              'input_seed': np.int64(seed + 1), 'input_shape': np.array(shape),
              'tap_indices': np.array(taps), 'logits': f32(logits)})
  out.update({f'feature/{k}': nhwc(feats[i]) for k, i in enumerate(taps)})
  return out


def probe_shapes(off, name: str, size: int, layers) -> list:
  with torch.no_grad():
    feats, _ = build(off, name, NUM_CLASSES)(torch.zeros(2, 3, size, size), is_feat=True)
  return [feats[i].shape for i in layers]


def afd_vectors(off, teacher: str, student: str, qk_dim: int, size: int, batch: int,
                seed: int) -> dict:
  """One train-mode step of the official AFD module on ReLU-of-noise features."""
  args = types.SimpleNamespace(qk_dim=qk_dim, guide_layers=off.LAYER[teacher],
                               hint_layers=off.LAYER[student])
  args.t_shapes = probe_shapes(off, teacher, size, args.guide_layers)
  args.s_shapes = probe_shapes(off, student, size, args.hint_layers)
  args.n_t, args.unique_t_shapes = off.unique_shape(args.t_shapes)
  torch.manual_seed(seed)
  module = off.AFD(args).train()
  out = load_generated(module, seed, 1.0)
  t_shapes = np.array([(batch, s[2], s[3], s[1]) for s in args.t_shapes])
  s_shapes = np.array([(batch, s[2], s[3], s[1]) for s in args.s_shapes])
  t_np = weights.features(seed + 1, t_shapes)
  s_np = weights.features(seed + 2, s_shapes)
  # The official module indexes full `is_feat` lists; give it lists with the taps in place.
  t_full = [None] * (max(args.guide_layers) + 1)
  s_full = [None] * (max(args.hint_layers) + 1)
  for n, i in enumerate(args.guide_layers):
    t_full[i] = torch.from_numpy(t_np[n].transpose(0, 3, 1, 2))
  s_torch = [torch.from_numpy(f.transpose(0, 3, 1, 2)).requires_grad_() for f in s_np]
  for m, i in enumerate(args.hint_layers):
    s_full[i] = s_torch[m]
  # cal_diff(v_s, v_t, att) is called once per teacher layer n with att = attention[:, n].
  attention, terms, cal_diff = [], [], module.attention.cal_diff
  def recording_cal_diff(v_s, v_t, att):
    attention.append(att.detach().clone())
    terms.append(cal_diff(v_s, v_t, att))
    return terms[-1]
  module.attention.cal_diff = recording_cal_diff
  loss = module(s_full, t_full)
  loss.backward()
  out.update({
      'teacher': np.array(teacher), 'student': np.array(student), 'qk_dim': np.int64(qk_dim),
      'teacher_seed': np.int64(seed + 1), 'teacher_shapes': t_shapes,
      'student_seed': np.int64(seed + 2), 'student_shapes': s_shapes,
      'loss': f32(loss), 'per_teacher_layer': f32(torch.stack(terms)),
      'attention': f32(torch.stack(attention, dim=1))})
  out.update({f'grad_student/{m}': nhwc(f.grad) for m, f in enumerate(s_torch)})
  out.update({f'grad_sd/{k}': f32(p.grad) for k, p in module.named_parameters()})
  out.update({f'sd_after/{k}': f32(v) for k, v in module.state_dict().items()
              if k.endswith('running_mean') or k.endswith('running_var')})
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--official', default=os.environ.get('AFD_OFFICIAL_DIR'),
                      help='checkout of the official AFD code (default: $AFD_OFFICIAL_DIR)')
  parser.add_argument('--crd', default=os.environ.get('AFD_CRD_DIR'),
                      help='checkout of RepDistiller, for vgg8 (default: $AFD_CRD_DIR)')
  parser.add_argument('--out', default=str(HERE), help='folder to write (default: this one)')
  args = parser.parse_args()
  if not args.official:
    parser.error('name the official checkout with --official or AFD_OFFICIAL_DIR')
  torch.set_num_threads(1)  # one fixed summation order
  off = load_official(args.official, args.crd)
  out = pathlib.Path(args.out)
  for seed, (teacher, student, qk_dim, size, batch) in enumerate(PAIRS):
    path = out / f'afd_{teacher}_{student}.npz'
    savez(path, afd_vectors(off, teacher, student, qk_dim, size, batch, 100 * seed + 1000))
    print(path, path.stat().st_size)
  for seed, (name, (size, gain)) in enumerate(MODELS.items()):
    if name == 'vgg8' and off.vgg is None:
      print('vgg8 skipped: name a RepDistiller checkout with --crd or AFD_CRD_DIR')
      continue
    path = out / f'model_{name}.npz'
    savez(path, model_vectors(off, name, size, gain, 100 * seed))
    print(path, path.stat().st_size)


if __name__ == '__main__':
  main()
