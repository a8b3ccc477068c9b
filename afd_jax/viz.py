"""Attention-link heatmaps (mean attention, teacher layers (rows) x student layers (columns))
and segmentation predictions beside the truth."""
import io
import textwrap
from typing import Sequence, Tuple

import numpy as np
from etils import epath


def link_labels(distiller, teacher_labels: Sequence[str], student_labels: Sequence[str]):
  """The labels of the layers a distiller's attention links: all, or the subset its
  `attention_layers(T, S) -> (teacher indices, student indices)` names (SemCKD's stage-final
  taps)."""
  select = getattr(distiller, 'attention_layers', None)
  if select is None:
    return list(teacher_labels), list(student_labels)
  t_idx, s_idx = select(len(teacher_labels), len(student_labels))
  return [teacher_labels[i] for i in t_idx], [student_labels[i] for i in s_idx]


def plot_attention(attention: np.ndarray, teacher_labels: Sequence[str],
                   student_labels: Sequence[str], path: str, title: str = '') -> str:
  """Writes a PNG heatmap of `attention` (T x S) to `path` (atomically) and returns the path.
  Labels whose count does not match the attention's axis (e.g. every tap, for a method that
  links a subset: `link_labels` picks it) are replaced by layer numbers."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  attention = np.asarray(attention)
  t, s = attention.shape
  if len(teacher_labels) != t:
    teacher_labels = [f'layer {n}' for n in range(t)]
  if len(student_labels) != s:
    student_labels = [f'layer {m}' for m in range(s)]
  longest = max((len(str(label)) for label in teacher_labels), default=0)
  width = 1.6 + 0.45 * s + 0.04 * max(longest - 10, 0)  # room for `label:layer` rows
  title = textwrap.fill(title, max(20, int(width * 11)))  # a long title wraps, not clips
  fig, ax = plt.subplots(figsize=(width, 1.2 + 0.3 * t + 0.15 * title.count('\n')))
  image = ax.imshow(attention, cmap='viridis', vmin=0.0, aspect='auto')
  ax.set_xticks(range(s), list(student_labels), rotation=60, ha='right', fontsize=7)
  ax.set_yticks(range(t), list(teacher_labels), fontsize=7)
  ax.set_xlabel('student layer')
  ax.set_ylabel('teacher layer')
  if title:
    ax.set_title(title, fontsize=9)
  fig.colorbar(image, ax=ax, fraction=0.05, label='mean attention')
  return _write_png(fig, path, 120)


def plot_predictions(images: np.ndarray, columns: Sequence[Tuple[str, np.ndarray]],
                     num_classes: int, path: str, ignore_index: int = 255) -> str:
  """Writes a PNG grid to `path` (atomically): a row per image of `images` (N x H x W x C, any
  range), then one column per `(title, N x H x W labels)` of `columns` (truth, predictions),
  each class its colour, ignored pixels black. Returns the path."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  n = len(images)
  palette = plt.get_cmap('tab20', max(num_classes, 2))
  fig, axes = plt.subplots(n, 1 + len(columns), figsize=(1.6 * (1 + len(columns)), 1.6 * n),
                           squeeze=False)
  for row in range(n):
    image = np.asarray(images[row], np.float64)
    image = (image - image.min()) / max(image.max() - image.min(), 1e-12)
    axes[row, 0].imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap='gray')
    for col, (_, labels) in enumerate(columns, 1):
      labels = np.asarray(labels[row])
      colours = palette(np.clip(labels, 0, num_classes - 1))[..., :3]
      colours[labels == ignore_index] = 0.0
      axes[row, col].imshow(colours, interpolation='nearest')
  for col, title in enumerate(['image'] + [t for t, _ in columns]):
    axes[0, col].set_title(title, fontsize=8)
  for ax in axes.ravel():
    ax.set_axis_off()
  return _write_png(fig, path, 100)


def _write_png(fig, path: str, dpi: int) -> str:
  """`fig` as a PNG at `path` (local or GCS), written atomically; the figure is closed."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=dpi)
  plt.close(fig)
  out = epath.Path(path)
  tmp = out.with_name(out.name + '.tmp')
  tmp.write_bytes(buffer.getvalue())
  tmp.replace(out)
  return path
