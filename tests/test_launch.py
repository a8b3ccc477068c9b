"""Launch scripts: the TPU pod dry run prints the commands; bad use of it and of
local_multiprocess.sh is refused; the study runner runs a teacher only where a student needs it,
keeps one that reproduces, resumes a student started against the current teacher, and stops
where a student has no teacher run."""
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


def offline_study_runner(monkeypatch, fake_call):
  """The runner with each run's process replaced by `fake_call(cmd)`, commit 'new', and the
  record kept in memory only."""
  study = study_runner()
  monkeypatch.setattr(study.subprocess, 'call', lambda cmd, **unused_kwargs: fake_call(cmd))
  monkeypatch.setattr(study, 'commit', lambda: 'new')
  monkeypatch.setattr(study, 'save_record', lambda rec: None)
  return study


def write_summary(folder, **fields):
  """A finished run's summary.json (the fields the runner reads)."""
  folder.mkdir(exist_ok=True)
  (folder / 'summary.json').write_text(json.dumps(
      {'wall_time_sec': 1.0, 'total_time_sec': 1.0, **fields}))


@pytest.mark.parametrize('reproduces', [True, False])
def test_study_trains_a_teacher_only_before_a_student_that_needs_it(tmp_path, monkeypatch,
                                                                   reproduces):
  """A clone without workdirs: the student alone runs first, with no teacher; students recorded
  against their seed's teacher do not bring it back; the first student of a seed that still has
  to run does. A teacher trained again to other parameters makes the students of its seed that
  were current earlier in the pass run again."""
  study = study_runner()
  record = {'teacher-s0': {'params_sha256': 'a', 'top1': 88.0, 'commit': 'x'},
            'teacher-s1': {'params_sha256': 'b', 'top1': 88.0, 'commit': 'x'},
            'kd-s0': {'top1': 86.0, 'teacher_sha256': 'a', 'commit': 'x'},
            'kd-s1': {'top1': 86.0, 'teacher_sha256': 'b', 'commit': 'x'}}
  runs_done = []

  def fake_run(root, method, seed, rec):  # what run() records, for the runs it really runs
    key = f'{method}-s{seed}'
    if study.is_current(rec.get(key), rec, method, seed, root):
      return
    runs_done.append(key)
    if method == 'teacher':  # trained again: to the same parameters, or to new ones
      sha = rec[key]['params_sha256'] if reproduces else f'new{seed}'
      write_summary(tmp_path / key, params_sha256=sha)
      rec[key] = {**rec[key], 'params_sha256': sha}
    else:
      rec[key] = {'params_sha256': 's', 'teacher_sha256': study.teacher_sha256(root, seed)}

  monkeypatch.setattr(study, 'load_record', lambda: record)
  monkeypatch.setattr(study, 'run', fake_run)
  monkeypatch.setattr(study, 'report', lambda *a: None)
  monkeypatch.setattr('sys.argv', ['fashion_mnist_study.py', f'--root={tmp_path}',
                                   '--seeds=0,1', '--methods=none,kd,afd'])
  study.main()
  first_pass = ['none-s0', 'none-s1', 'teacher-s0', 'afd-s0', 'teacher-s1', 'afd-s1']
  assert runs_done == first_pass + ([] if reproduces else ['kd-s0', 'kd-s1'])
  for seed in (0, 1):
    for method in ('none', 'kd', 'afd'):
      assert study.is_current(record[f'{method}-s{seed}'], record, method, seed, str(tmp_path))


@pytest.mark.parametrize('same', [True, False])
def test_study_keeps_a_teacher_trained_again_to_the_same_parameters(tmp_path, monkeypatch, same):
  """A teacher whose workdir was gone runs again: the same parameters bit for bit keep its record
  (and the students that distilled it stay current); other parameters replace it."""
  record = {'teacher-s0': {'params_sha256': 'a', 'top1': 88.0, 'commit': 'old'},
            'kd-s0': {'top1': 86.0, 'teacher_sha256': 'a', 'commit': 'old'}}

  def fake_call(unused_cmd):  # the teacher's run, ending with its summary
    write_summary(tmp_path / 'teacher-s0', eval={'top1': 88.0 if same else 87.5},
                  params_sha256='a' if same else 'b')
    return 0

  study = offline_study_runner(monkeypatch, fake_call)
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


@pytest.mark.parametrize('marker', ['a', 'z', None])
def test_study_resumes_a_rerun_started_against_the_current_teacher(tmp_path, monkeypatch, marker):
  """A row being redone (its record distils an older teacher) whose rerun was stopped: a folder
  started against the current teacher ('a') is resumed (here it had finished, and only its record
  was missing); a folder started against another teacher, or by an older runner, is kept aside as
  stale and the run starts again."""
  record = {'teacher-s0': {'params_sha256': 'a', 'top1': 88.0, 'commit': 'old'},
            'kd-s0': {'top1': 86.0, 'teacher_sha256': 'x', 'commit': 'old'}}
  write_summary(tmp_path / 'teacher-s0', params_sha256='a')
  student = tmp_path / 'kd-s0'
  write_summary(student, eval={'top1': 86.5}, params_sha256='s')
  calls = []

  def fake_call(cmd):
    calls.append(cmd)
    write_summary(student, eval={'top1': 86.7}, params_sha256='s')
    return 0

  study = offline_study_runner(monkeypatch, fake_call)
  if marker:
    (student / study.STARTED_AGAINST).write_text(marker + '\n')
  study.run(str(tmp_path), 'kd', 0, record)
  assert record['kd-s0']['teacher_sha256'] == 'a'
  assert study.is_current(record['kd-s0'], record, 'kd', 0)
  if marker == 'a':
    assert not calls and record['kd-s0']['top1'] == 86.5
    assert not (tmp_path / 'kd-s0.stale1').exists()
  else:
    assert len(calls) == 1 and record['kd-s0']['top1'] == 86.7
    assert (tmp_path / 'kd-s0.stale1' / 'summary.json').exists()
    assert (student / study.STARTED_AGAINST).read_text() == 'a\n'


def test_study_stops_when_a_student_has_no_teacher_run(tmp_path):
  """A student whose seed's teacher has no finished run in the root (it diverged, say) stops the
  study with one line, before anything of the student's is made."""
  study = study_runner()
  record = {'teacher-s0': {'failed': 'non-finite loss', 'commit': 'x'}}
  with pytest.raises(SystemExit, match='kd-s0 needs teacher-s0, which has no finished run'):
    study.run(str(tmp_path), 'kd', 0, record)
  assert not (tmp_path / 'kd-s0').exists() and 'kd-s0' not in record
