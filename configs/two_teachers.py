"""Two teachers -> one student on Fashion-MNIST, in the quick-start's protocol (configs/quickstart.py):
teacher a is the shipped resnet20, teacher b a wrn16x2 trained by afd_jax on the same first
20,000 training images with the same recipe; the resnet8 student sees the first 2,000.

Args: run (teacher_b | student | kd | afd), teachers (a | b | ab), seed. `teacher_b` trains the
wrn16x2; `student` trains resnet8 alone; `kd` and `afd` distil teacher a, teacher b, or both
(`config.teachers`: KD from the average of their probabilities, AFD over both teachers' layers),
with the quick-start's weights (KD: CE 1 + KD 0.9 at T 4; AFD: the same + 200 L_AFD).

  python -m afd_jax.main --config=configs/two_teachers.py:teacher_b --workdir=/tmp/tt/teacher_b
  python -m afd_jax.main --config=configs/two_teachers.py:afd,teachers=ab,seed=0 \\
      '--config.teachers[1].checkpoint=/tmp/tt/teacher_b' --workdir=/tmp/tt/afd-ab-s0
(teachers=b takes --config.teacher.checkpoint=/tmp/tt/teacher_b.) The study:
  .venv/bin/python launch/two_teacher_study.py
"""
from configs import quickstart
from configs.base import parse_arg, teacher_entry

RUNS = ('teacher_b', 'student', 'kd', 'afd')
TEACHER_A, TEACHER_B = 'resnet20', 'wrn16x2'


def get_config(arg: str = 'afd'):
  run, _, rest = (arg or 'afd').partition(',')
  a = parse_arg(rest, {'teachers': 'ab', 'seed': '0'}, 'two_teachers.py:<run>')
  if run not in RUNS or a['teachers'] not in ('a', 'b', 'ab'):
    raise ValueError(f'two_teachers.py takes a run ({", ".join(RUNS)}), then teachers=a|b|ab '
                     f'and seed=S; got {arg!r}.')
  c = quickstart.get_config(f'{"teacher" if run == "teacher_b" else run},seed={a["seed"]}')
  c.name = f'two_teachers-{run}' + (f'-{a["teachers"]}' if run in ('kd', 'afd') else '')
  c.name += f'-s{a["seed"]}'
  if run == 'teacher_b':
    c.student.name = TEACHER_B
  if run in ('kd', 'afd') and a['teachers'] == 'b':
    c.teacher.name, c.teacher.checkpoint = TEACHER_B, ''  # --config.teacher.checkpoint=...
  if run in ('kd', 'afd') and a['teachers'] == 'ab':
    c.teachers = [teacher_entry(TEACHER_A, quickstart.TEACHER_CHECKPOINT),
                  teacher_entry(TEACHER_B)]  # --config.teachers[1].checkpoint=...
  return c
