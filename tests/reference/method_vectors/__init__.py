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
