"""Launch scripts: the TPU pod dry run prints the commands; bad use is refused; the study runner
runs a teacher only where a student needs it, and keeps one that reproduces."""
import importlib.util
import json
import subprocess

import pytest

from tests import runs


def script(name, *args):
  return subprocess.run(['bash', str(runs.REPO / 'launch' / name), *args], capture_output=True,
                        text=True, timeout=60, cwd=runs.REPO)


def test_tpu_pod_dry_run_prints_every_step_for_all_workers():
  result = script('tpu_pod.sh', '--dry-run', '--create', '--name', 'afd', '--zone', 'us-central2-b',
                  '--type', 'v4-32', '--', '--config=configs/imagenet.py:method=afd',
                  '--workdir=gs://bucket/runs/afd')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0].startswith('gcloud compute tpus tpu-vm create afd --zone us-central2-b '
                             '--accelerator-type v4-32')
  assert any('git archive' in l for l in lines)
  ssh = [l for l in lines if 'tpu-vm ssh' in l]
  assert len(ssh) == 2 and all('--worker=all' in l for l in ssh)
  assert 'afd_jax.main' in ssh[-1] and 'method=afd' in ssh[-1] and 'gs://bucket/runs/afd' in ssh[-1]
  assert "jax\\[tpu\\]==0.10.2" in ssh[0]


def test_tpu_pod_refuses_missing_arguments():
  result = script('tpu_pod.sh', '--dry-run', '--name', 'afd')
  assert result.returncode == 2 and 'required' in result.stderr


def test_local_multiprocess_usage():
  result = script('local_multiprocess.sh')
  assert result.returncode == 2 and 'loopback' in result.stdout


def study_runner():
  """launch/fashion_mnist_study.py as a module (launch/ is not a package)."""
  spec = importlib.util.spec_from_file_location(
      'fashion_mnist_study', runs.REPO / 'launch' / 'fashion_mnist_study.py')
  study = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(study)
  return study


def test_study_trains_a_teacher_only_before_a_student_that_needs_it(tmp_path, monkeypatch):
  """A clone without workdirs: the student alone runs first, with no teacher; a student already
  recorded against its seed's teacher does not bring that teacher back; the first student of a
  seed that still has to run does."""
  study = study_runner()
  record = {'teacher-s0': {'params_sha256': 'a', 'top1': 88.0, 'commit': 'x'},
            'teacher-s1': {'params_sha256': 'b', 'top1': 88.0, 'commit': 'x'},
            'kd-s0': {'top1': 86.0, 'teacher_sha256': 'a', 'commit': 'x'}}
  calls = []

  def fake_run(root, method, seed, rec):
    calls.append((method, seed))
    if method == 'teacher':  # trained again, to the same parameters
      folder = tmp_path / f'teacher-s{seed}'
      folder.mkdir()
      (folder / 'summary.json').write_text(
          json.dumps({'params_sha256': rec[f'teacher-s{seed}']['params_sha256']}))

  monkeypatch.setattr(study, 'load_record', lambda: record)
  monkeypatch.setattr(study, 'run', fake_run)
  monkeypatch.setattr(study, 'report', lambda *a: None)
  monkeypatch.setattr('sys.argv', ['fashion_mnist_study.py', f'--root={tmp_path}',
                                   '--seeds=0,1', '--methods=none,kd'])
  study.main()
  assert calls == [('none', 0), ('none', 1), ('kd', 0), ('teacher', 1), ('kd', 1)]


@pytest.mark.parametrize('same', [True, False])
def test_study_keeps_a_teacher_trained_again_to_the_same_parameters(tmp_path, monkeypatch, same):
  """A teacher whose workdir was gone runs again: the same parameters bit for bit keep its record
  (and the students that distilled it stay current); other parameters replace it."""
  study = study_runner()
  record = {'teacher-s0': {'params_sha256': 'a', 'top1': 88.0, 'commit': 'old'},
            'kd-s0': {'top1': 86.0, 'teacher_sha256': 'a', 'commit': 'old'}}

  def fake_call(cmd, **unused_kwargs):  # the teacher's run, ending with its summary
    (tmp_path / 'teacher-s0' / 'summary.json').write_text(json.dumps(
        {'eval': {'top1': 88.0 if same else 87.5}, 'wall_time_sec': 1.0,
         'total_time_sec': 1.0, 'params_sha256': 'a' if same else 'b'}))
    return 0

  monkeypatch.setattr(study.subprocess, 'call', fake_call)
  monkeypatch.setattr(study, 'commit', lambda: 'new')
  monkeypatch.setattr(study, 'save_record', lambda rec: None)
  study.run(str(tmp_path), 'teacher', 0, record)
  note = ' '.join(study.teacher_note(str(tmp_path), [0], record))
  if same:
    assert record['teacher-s0'] == {'params_sha256': 'a', 'top1': 88.0, 'commit': 'old',
                                    'reproduced': ['new']}
    assert 'bit for bit' in note and 'seed 0 (trained at old, again at new)' in note
  else:
    assert record['teacher-s0']['replaces'] == {'top1': 88.0, 'commit': 'old'}
    assert record['teacher-s0']['params_sha256'] == 'b' and 'first study 88.00' in note
  assert study.is_current(record['kd-s0'], record, 'kd', 0) == same


@pytest.mark.parametrize('started_against_current', [True, False])
def test_study_resumes_a_rerun_started_against_the_current_teacher(tmp_path, monkeypatch,
                                                                     started_against_current):
  """A row being redone (its record distils an older teacher) whose rerun was interrupted: a folder
  started against the current teacher is resumed (here: it had finished, and only its record was
  missing); any other folder is kept aside as stale and the run starts again."""
  study = study_runner()
  record = {'teacher-s0': {'params_sha256': 'a', 'top1': 88.0, 'commit': 'old'},
            'kd-s0': {'top1': 86.0, 'teacher_sha256': 'x', 'commit': 'old'}}
  (tmp_path / 'teacher-s0').mkdir()
  (tmp_path / 'teacher-s0' / 'summary.json').write_text(json.dumps({'params_sha256': 'a'}))
  student = tmp_path / 'kd-s0'
  student.mkdir()
  done = {'eval': {'top1': 86.5}, 'wall_time_sec': 1.0, 'total_time_sec': 1.0,
          'params_sha256': 's'}
  (student / 'summary.json').write_text(json.dumps(done))
  if started_against_current:
    (student / study.STARTED_AGAINST).write_text('a\n')
  calls = []

  def fake_call(cmd, **unused_kwargs):
    calls.append(cmd)
    (student / 'summary.json').write_text(json.dumps({**done, 'eval': {'top1': 86.7}}))
    return 0

  monkeypatch.setattr(study.subprocess, 'call', fake_call)
  monkeypatch.setattr(study, 'commit', lambda: 'new')
  monkeypatch.setattr(study, 'save_record', lambda rec: None)
  study.run(str(tmp_path), 'kd', 0, record)
  assert record['kd-s0']['teacher_sha256'] == 'a'
  assert study.is_current(record['kd-s0'], record, 'kd', 0)
  if started_against_current:
    assert not calls and record['kd-s0']['top1'] == 86.5
    assert not (tmp_path / 'kd-s0.stale1').exists()
  else:
    assert len(calls) == 1 and record['kd-s0']['top1'] == 86.7
    assert (tmp_path / 'kd-s0.stale1' / 'summary.json').exists()
    assert (student / study.STARTED_AGAINST).read_text() == 'a\n'
