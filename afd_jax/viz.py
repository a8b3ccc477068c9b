"""Attention-link heatmaps: mean attention, teacher layers (rows) x student layers (columns)."""
import io
import textwrap
from typing import Sequence

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
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=120)
  plt.close(fig)
  out = epath.Path(path)  # local or GCS
  tmp = out.with_name(out.name + '.tmp')
  tmp.write_bytes(buffer.getvalue())
  tmp.replace(out)
  return path
