"""One golden-vector generator per method (see ../make_method_vectors.py), and what they share."""
import importlib.util
import os


def load(repo_dir: str, relpath: str):
  """A file of the original code as a module of its own, by path (the repositories' package
  names clash: RepDistiller's and SemCKD's `distiller_zoo`, `models`)."""
  name = 'original_' + relpath.replace('/', '_').replace('.py', '')
  spec = importlib.util.spec_from_file_location(name, os.path.join(repo_dir, relpath))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def pairwise_arrays(losses, s_np, t_np, g_s) -> dict:
  """The arrays of a method with one loss per (student, teacher) pair: the summed loss (after
  its backward pass into the student maps `g_s`), each pair's loss, the inputs (NHWC) and the
  gradients with respect to the student maps."""
  import torch  # pylint: disable=g-import-not-at-top
  from make_vectors import f32, nhwc  # pylint: disable=g-import-not-at-top
  loss = sum(losses)
  loss.backward()
  out = {'loss': f32(loss), 'per_pair': f32(torch.stack(losses))}
  out.update({f'student/{i}': f for i, f in enumerate(s_np)})
  out.update({f'teacher/{i}': f for i, f in enumerate(t_np)})
  out.update({f'grad_student/{i}': nhwc(f.grad) for i, f in enumerate(g_s)})
  return out
