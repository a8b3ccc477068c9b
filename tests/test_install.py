"""`pip install .` and `pip install -e .` in a fresh virtual environment, offline: the declared
dependency ranges (pyproject.toml) must be satisfied by the pinned set (requirements.txt) that
this test environment has, and the installed package must import from outside the repository."""
import os
import shutil
import site
import subprocess
import sys
import venv

import pytest

from tests import runs


@pytest.fixture(scope='module')
def fresh_venv(tmp_path_factory):
  """A new venv whose only third-party packages are this environment's (through a .pth file), so
  that pip resolves the declared ranges against the pinned set without any download."""
  root = tmp_path_factory.mktemp('venv')
  venv.EnvBuilder(with_pip=True).create(root)
  python = root / 'bin' / 'python'
  purelib = subprocess.check_output(
      [str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
      text=True).strip()
  with open(os.path.join(purelib, 'pinned_set.pth'), 'w') as f:
    f.write('\n'.join(site.getsitepackages()) + '\n')
  return python


@pytest.mark.parametrize('editable', [False, True], ids=['install', 'editable'])
def test_pip_install_in_a_fresh_venv(fresh_venv, tmp_path, editable):
  had_build = (runs.REPO / 'build').exists()
  pip = [str(fresh_venv), '-m', 'pip', 'install', '--no-index', '--no-build-isolation', '-q',
         *(['-e'] if editable else []), f'{runs.REPO}[data,plot,test]']
  result = subprocess.run(pip, capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  probe = ('import afd_jax, afd_jax.models, afd_jax.distill, afd_jax.train; '
           'print(afd_jax.__file__); print(afd_jax.models.create("resnet8", 10).taps()[0].name)')
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  result = subprocess.run([str(fresh_venv), '-c', probe], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  location = result.stdout.splitlines()[0]
  if editable:
    assert location.startswith(str(runs.REPO / 'afd_jax'))
  else:
    assert 'site-packages' in location and not location.startswith(str(runs.REPO))
  subprocess.run([str(fresh_venv), '-m', 'pip', 'uninstall', '-y', '-q', 'afd_jax'], check=True,
                 capture_output=True, cwd=tmp_path)
  if not had_build:  # setuptools builds in the source tree; leave the checkout as it was
    shutil.rmtree(runs.REPO / 'build', ignore_errors=True)
