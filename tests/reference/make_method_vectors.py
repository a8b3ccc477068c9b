"""Writes the golden vectors of the distillation methods' parity tests, computed by each
method's original PyTorch code (never stored in this repository; checked out beside it).

  REPDISTILLER_DIR=<HobbitLong/RepDistiller> SEMCKD_DIR=<DefangChen/SemCKD> \
  REVIEWKD_DIR=<dvlab-research/ReviewKD> MDISTILLER_DIR=<megvii-research/mdistiller> \
  DEIT_DIR=<facebookresearch/deit> TORCHDISTILLER_DIR=<irfanICMLL/TorchDistiller> \
  python tests/reference/make_method_vectors.py [--only NAME ...]

Each method's generator is `method_vectors/<name>.py` (`REPO`, `make(repo_dir) -> arrays`);
its arrays go to `method_<name>.npz`, byte-identical on a rerun (fixed zip timestamps, torch on
one thread). Needs torch and numpy only. The commits used are in README.md.
"""
import argparse
import importlib
import os
import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_vectors import savez  # pylint: disable=g-import-not-at-top

REPOS = {  # name: (environment variable, default checkout)
    'repdistiller': ('REPDISTILLER_DIR', '/tmp/orig/RepDistiller'),
    'semckd': ('SEMCKD_DIR', '/tmp/orig/SemCKD'),
    'reviewkd': ('REVIEWKD_DIR', '/tmp/orig/ReviewKD'),
    'mdistiller': ('MDISTILLER_DIR', '/tmp/orig/mdistiller'),
    'deit': ('DEIT_DIR', '/tmp/orig/deit'),
    'torchdistiller': ('TORCHDISTILLER_DIR', '/tmp/orig/TorchDistiller'),
}


def generators():
  """{method name: its generator module}, every file in method_vectors/."""
  return {p.stem: importlib.import_module(f'method_vectors.{p.stem}')
          for p in sorted((HERE / 'method_vectors').glob('*.py')) if p.stem != '__init__'}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--only', nargs='*', help='method names (default: every generator)')
  parser.add_argument('--out', default=str(HERE))
  args = parser.parse_args()
  torch.set_num_threads(1)
  found = generators()
  for name in args.only or sorted(found):
    if name not in found:
      parser.error(f'no generator method_vectors/{name}.py; there are: {", ".join(found)}')
    module = found[name]
    variable, default = REPOS[module.REPO]
    repo_dir = os.environ.get(variable, default)
    if not os.path.isdir(repo_dir):
      parser.error(f'{name}: set {variable} to a checkout of the original code ({module.REPO}).')
    arrays = module.make(repo_dir)
    path = pathlib.Path(args.out) / f'method_{name}.npz'
    savez(path, arrays)
    print(f'{path}: {len(arrays)} arrays, {path.stat().st_size} bytes')


if __name__ == '__main__':
  main()
