"""Redraw the attention-link heatmap of an AFD (or SemCKD) run.

  python -m afd_jax.visualize --workdir=DIR [--from_checkpoint] [--out=PATH]

By default it draws the mean attention saved at the run's last eval (DIR/attention/*.npy).
With --from_checkpoint it recomputes it: the latest checkpoint's student and meta-network
(inference mode) and the run's teacher, averaged over the whole eval split. Writes
DIR/attention.png (or --out) and prints the strongest link of every teacher layer. SemCKD's
learned layer weights (`B x T x S` over its stage-final taps, each student column summing to 1)
are drawn the same way, labelled with the taps it uses (`viz.link_labels`).
"""
import glob
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging

from afd_jax import checkpoint, cli, data, distill, sharding, step, train, viz, weights
from afd_jax import task as task_lib
from afd_jax.errors import UserError
from afd_jax.state import distiller_variables, student_variables



def define_flags():
  """The CLI's flags (defined only when run as a program, so the module imports as a library)."""
  flags.DEFINE_string('workdir', None, 'Workdir of an AFD run.')
  flags.DEFINE_bool('from_checkpoint', False,
                    'Recompute over the eval split from the latest checkpoint.')
  flags.DEFINE_string('out', '', 'Output PNG (default: WORKDIR/attention.png).')
  flags.mark_flag_as_required('workdir')


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise UserError(f'{path} not found: is {workdir} the workdir of a run?')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.method not in distill.registry.with_attention():  # AFD, SemCKD
    raise UserError(f'{workdir} is a {config.method!r} run; only the methods that learn layer '
                    f'links have an attention to draw: '
                    f'{", ".join(distill.registry.with_attention())}.')
  return config


def saved_attention(workdir: str):
  files = sorted(glob.glob(os.path.join(workdir, 'attention', '*.npy')))
  if not files:
    raise UserError(f'no saved attention in {workdir}/attention (the run has not reached an '
                    'eval yet); use --from_checkpoint.')
  return np.load(files[-1]), int(os.path.basename(files[-1])[:-4])


def tap_names(workdir: str, config, shape):
  """(teacher, student) names of the rows and columns of an attention of `shape`: the taps
  saved beside the attention (else the zoo's models'); where the attention links a subset of
  them (SemCKD's stage-final taps), the subset the distiller names (`viz.link_labels`)."""
  path = os.path.join(workdir, 'attention', 'taps.json')
  task = None
  if os.path.exists(path):
    with open(path) as f:
      names = json.load(f)
    t_names, s_names = names['teacher'], names['student']
  else:
    task = task_lib.task_from_config(config, 1, 1)
    t_names = [t.name for t in task.teacher.taps()]
    s_names = [t.name for t in task.student.taps()]
  if tuple(shape) == (len(t_names), len(s_names)):  # every tap
    return t_names, s_names
  task = task or task_lib.task_from_config(config, 1, 1)
  return viz.link_labels(task.distiller, t_names, s_names)


def distiller_attention(distiller, variables, s_feats, t_feats):
  """The distiller's `B x T x S` attention in inference mode. A distiller built for batches of
  at most `batch_size` examples (SemCKD: its MLPs read rows of the batch's Gram matrix) sees
  the batch in consecutive chunks of that size."""
  batch = s_feats[0].shape[0]
  size = getattr(distiller, 'batch_size', None) or batch
  chunks = []
  for start in range(0, batch, size):
    part = lambda fs: [f[start:start + size] for f in fs]  # pylint: disable=cell-var-from-loop
    chunks.append(distiller.apply(variables, part(s_feats), part(t_feats), train=False)[1])
  return chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks, axis=0)


def checkpoint_attention(workdir: str, config):
  """Mean attention over the eval split, from the latest checkpoint (inference mode)."""
  mesh = sharding.make_mesh(config.mesh_shape)
  info = data.dataset_info(config, process_count=jax.process_count())
  task = task_lib.task_from_config(config, info.num_classes, 1, train.DTYPES[config.dtype],
                               info.image_shape)
  teacher_vars = weights.load_teacher(config, task.teacher, info.num_classes, info.image_shape)
  rep = sharding.replicated(mesh)
  init = step.jit_init_state(task, mesh, info.image_shape, jax.eval_shape(lambda: teacher_vars))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                          jax.eval_shape(init, jax.random.PRNGKey(0)))
  restored = checkpoint.Checkpoints(workdir, create=False).restore_latest(abstract)
  if restored is None:
    raise UserError(f'no readable checkpoint in {workdir}/checkpoints.')
  state = restored[0]

  @jax.jit
  def attention_sum(state, teacher_vars, batch):
    _, t_feats = task.teacher.apply(teacher_vars, batch['image'], train=False)
    _, s_feats = task.student.apply(student_variables(state), batch['image'], train=False)
    attention = distiller_attention(task.distiller,
                                    distiller_variables(state),
                                    s_feats, t_feats)
    return jnp.einsum('b,bts->ts', batch['mask'], attention), jnp.sum(batch['mask'])

  total, count = 0.0, 0.0
  teacher_vars = jax.device_put(teacher_vars, rep)
  for batch in data.eval_iterator(config, info, process_index=jax.process_index(),
                                  process_count=jax.process_count()):
    s, n = attention_sum(state, teacher_vars, sharding.global_batch(batch, mesh))
    total, count = total + s, count + n
  return np.asarray(total / count), int(state.step), task


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  workdir = flags.FLAGS.workdir
  try:
    config = load_config(workdir)
    if flags.FLAGS.from_checkpoint:
      with train.float64_mode(config):  # a float64 run's checkpoint is float64
        attention, step_count, task = checkpoint_attention(workdir, config)
      source = f'checkpoint at step {step_count}, eval split'
      t_names, s_names = viz.link_labels(task.distiller, [t.name for t in task.teacher.taps()],
                                         [t.name for t in task.student.taps()])
    else:
      attention, step_count = saved_attention(workdir)
      source = f'saved at step {step_count}'
      t_names, s_names = tap_names(workdir, config, np.shape(attention))
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  out = flags.FLAGS.out or os.path.join(workdir, 'attention.png')
  viz.plot_attention(attention, t_names, s_names, out,
                     title=f'{task_lib.teacher_title(config)} -> {config.student.name} ({source})')
  print(f'{out}: mean attention, {len(t_names)} teacher x {len(s_names)} student layers '
        f'({source})')
  for n, row in enumerate(attention):
    print(f'  {t_names[n]:>16s} -> {s_names[int(np.argmax(row))]:<12s} {row.max():.3f}')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
