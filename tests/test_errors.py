"""Bad input through the CLI: a non-zero exit, one line naming the problem, no traceback, and
nothing of the user's changed (checkpoint files, workdirs, the offending file itself)."""
import os
import pickle
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import pytest

from afd_jax import checkpoint, models, weights
from tests import runs


class RunsCode:
  """Unpickling this would run `touch MARKER`: the test checks that nothing ran it."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def cli_refuses(args, workdir, message, prefix=()):
  """Runs the CLI (in this process, or in a subprocess under `prefix`); asserts exit 2, exactly
  one `error:` line containing `message`, no traceback."""
  if prefix:
    cmd = [*prefix, sys.executable, '-m', 'afd_jax.main', *args, f'--workdir={workdir}']
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=runs.env(1),
                            cwd=runs.REPO)
  else:
    result = runs.cli_in_process(args, str(workdir))
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
  assert 'Traceback' not in result.stdout + result.stderr
  assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
  return errors[0]


def snapshot(path):
  """Digest of a file or a folder's files (what must stay byte-identical)."""
  path = str(path)
  if os.path.isdir(path):
    return runs.tree_digest(path)
  with open(path, 'rb') as f:
    return f.read()


def test_pth_that_is_not_a_pytorch_file(digits_data_dir, tmp_path):
  pytest.importorskip('torch', reason='torch is optional; CI installs the CPU build')
  path = tmp_path / 'x.pth'
  path.write_text('not a checkpoint, just some text\n')
  args = runs.flag_args(digits_data_dir, num_train_steps=1, teacher__checkpoint=str(path))
  line = cli_refuses(args, tmp_path / 'w', f'teacher checkpoint {path}: not a PyTorch checkpoint')
  assert snapshot(path) == b'not a checkpoint, just some text\n', line


def test_pth_with_pickled_objects_is_refused_and_never_executed(digits_data_dir, tmp_path):
  torch = pytest.importorskip('torch', reason='torch is optional; CI installs the CPU build')
  marker = tmp_path / 'code_ran'
  payload = RunsCode(marker)
  assert pickle.loads(pickle.dumps(payload)) == 0 and marker.exists()  # the payload is live...
  marker.unlink()
  path = tmp_path / 'evil.pth'
  torch.save({'conv1.weight': torch.zeros(2), 'extra': payload}, path)
  before = snapshot(path)
  args = runs.flag_args(digits_data_dir, num_train_steps=1, teacher__checkpoint=str(path))
  cli_refuses(args, tmp_path / 'w', 'refused: it holds pickled Python objects, not only tensors')
  assert not marker.exists()  # ...and loading it ran nothing.
  assert snapshot(path) == before


def test_workdir_that_is_a_file(digits_data_dir, tmp_path):
  path = tmp_path / 'afile'
  path.write_text('user data\n')
  cli_refuses(runs.flag_args(digits_data_dir, num_train_steps=1), path,
              f'--workdir {path} is a file, not a folder')
  assert path.read_text() == 'user data\n'


def test_workdir_that_cannot_be_written(digits_data_dir):
  root = tempfile.mkdtemp(prefix='afd_readonly_')
  try:
    os.chmod(root, 0o755)
    workdir = os.path.join(root, 'run')
    os.makedirs(workdir)
    with open(os.path.join(workdir, 'notes.txt'), 'w') as f:
      f.write('keep me\n')
    os.chmod(workdir, 0o555)
    before = snapshot(workdir)
    # root writes anywhere: then run the CLI as root without the capability to override
    # permission bits (util-linux's setpriv), so that 0555 means what it says.
    prefix = ()
    if os.geteuid() == 0:
      if not shutil.which('setpriv'):
        pytest.skip('running as root and setpriv (util-linux) is missing: cannot drop '
                    'CAP_DAC_OVERRIDE to make a folder unwritable')
      prefix = ('setpriv', '--bounding-set=-dac_override,-dac_read_search', '--')
    cli_refuses(runs.flag_args(digits_data_dir, num_train_steps=1), workdir,
                f'--workdir {workdir} cannot be written', prefix=prefix)
    assert snapshot(workdir) == before
  finally:
    os.chmod(os.path.join(root, 'run'), 0o755)
    subprocess.run(['rm', '-rf', root], check=False)


def test_teacher_workdir_whose_checkpoints_are_all_unreadable(digits_data_dir, tmp_path):
  # A teacher workdir as train.py writes it (two checkpoints), without training one.
  teacher = tmp_path / 'teacher'
  variables = models.create('resnet8', 10).init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)),
                                               train=False)
  ckpt = checkpoint.Checkpoints(str(teacher), async_save=False)
  for step in (2, 4):
    ckpt.save(step, {'params': {'student': variables['params']},
                     'batch_stats': {'student': variables['batch_stats']}, 'step': step},
              {'fingerprint': {'student.name': 'resnet8', 'num_classes': 10}, 'step': step})
  ckpt.close()
  assert weights.restore_raw_variables(str(teacher))[1]['step'] == 4  # readable before
  steps = sorted(p for p in (teacher / 'checkpoints').iterdir() if p.name.isdigit())
  assert len(steps) == 2
  for step_dir in steps:  # every array file of every checkpoint becomes garbage
    for p in (step_dir / 'state').rglob('*'):
      if p.is_file() and p.stat().st_size > 0:
        p.write_bytes(b'\0garbage' * 64)
  before = snapshot(teacher)
  args = runs.flag_args(digits_data_dir, num_train_steps=1, teacher__checkpoint=str(teacher))
  cli_refuses(args, tmp_path / 'w', f'no readable checkpoint in {teacher / "checkpoints"}')
  assert snapshot(teacher) == before
