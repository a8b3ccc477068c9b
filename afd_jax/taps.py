"""What a feature tap is: a name (the PyTorch module that produces it) and a stage. Shared by
models (which declare their taps) and distillers (which derive layer choices from them)."""
import dataclasses
from typing import List, Sequence


@dataclasses.dataclass(frozen=True)
class Tap:
  """One tapped feature map.

  Attributes:
    name: the PyTorch module path of the block whose output this is (e.g. 'layer2.0').
    stage: 1-based index of the resolution stage the tap belongs to.
  """
  name: str
  stage: int


def stage_final(taps: Sequence[Tap]) -> List[int]:
  """Indices of the last tap of every stage, in stage order."""
  last = {}
  for i, tap in enumerate(taps):
    last[tap.stage] = i
  return [last[s] for s in sorted(last)]
