"""The cross-device communication of a compiled XLA program, read from its optimised HLO.

  counts = collectives.summary(jax.jit(f).lower(*args).compile())
  # {'all-reduce': {'count': 3, 'bytes': 1234}, ..., 'total': {'count': 3, 'bytes': 1234}}

`bytes` is the payload of each operation (the size of the arrays it reduces, gathers or
scatters, from its result shape; the larger array for gathers and scatters), summed; what a
ring algorithm sends on the wire is about 2 (n - 1) / n times that for an all-reduce over n
devices. Asynchronous pairs (`all-reduce-start` / `-done`) count once.

`top_level_ops(hlo_text)` counts the operations a program launches (`launch_count` of a
`jax.stages.Compiled`): a figure for launch-bound accelerators.
"""
import re
from typing import Dict, List

KINDS = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')

_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's16': 2, 'u16': 2,
          'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8,
          'c64': 8, 'c128': 16}
# `%name = SHAPE op(` or `%name = SHAPE op-start(`; SHAPE is an array or a tuple of arrays.
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s*'
                          r'(?P<op>' + '|'.join(KINDS) + r')(?:-start)?\(')
_ARRAY = re.compile(r'\b(?P<dtype>[a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[(?P<dims>[\d,]*)\]')


def _array_bytes(shape_text: str):
  sizes = []
  for m in _ARRAY.finditer(shape_text):
    n = 1
    for d in filter(None, m.group('dims').split(',')):
      n *= int(d)
    sizes.append(n * _BYTES.get(m.group('dtype'), 4))
  return sizes


def summary_of_text(hlo_text: str) -> Dict[str, Dict[str, int]]:
  """Count and payload bytes of each kind of collective in an HLO module's text."""
  out = {kind: {'count': 0, 'bytes': 0} for kind in KINDS}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    sizes = _array_bytes(m.group('shape'))
    op = m.group('op')
    # An all-reduce's result is every reduced array; a start op of the others returns
    # (operand, result) pairs, so the payload is the largest array.
    payload = sum(sizes) if op == 'all-reduce' else max(sizes, default=0)
    out[op]['count'] += 1
    out[op]['bytes'] += payload
  out['total'] = {'count': sum(v['count'] for v in out.values()),
                  'bytes': sum(v['bytes'] for v in out.values())}
  return out


def summary(compiled) -> Dict[str, Dict[str, int]]:
  """`summary_of_text` of a `jax.stages.Compiled` (every module of it)."""
  return summary_of_text(compiled.as_text())


# Instructions that launch nothing: they name, group, pick out or reinterpret arrays.
NOT_LAUNCHED = frozenset({'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast'})
# A computation's first line, at column 0: `[ENTRY ]%name (params) -> shape {`.
_COMPUTATION = re.compile(r'^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\{\s*$')
# An instruction: `[ROOT ]%name = SHAPE opcode(...)`; the opcode is the first lower-case word
# after a space and before `(` (a shape's layout, `{1,0:T(8,128)}`, has none).
_OPCODE = re.compile(r'^\s+(?:ROOT\s+)?%?[\w.\-]+\s*=\s*\S.*?\s(?P<op>[a-z][a-z0-9\-]*)\(')
_WHILE_BODY = re.compile(r'\bbody=%?(?P<body>[\w.\-]+)')


def _computations(module_text: str):
  """{name: [(opcode, line), ...]} of one HLO module, and the name of its ENTRY computation."""
  bodies: Dict[str, List] = {}
  entry, current = None, None
  for line in module_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and not line.startswith('HloModule'):
      current = bodies.setdefault(header.group('name'), [])
      entry = header.group('name') if header.group('entry') else entry
      continue
    instruction = _OPCODE.match(line) if current is not None else None
    if instruction:
      current.append((instruction.group('op'), line))
  return bodies, entry


def top_level_ops(hlo_text: str) -> int:
  """The operations of the ENTRY computation and of the bodies of the while loops it calls
  (recursively, each body once per loop that calls it), not counting parameter, constant,
  tuple, get-tuple-element and bitcast instructions, summed over the text's modules.

  A fusion counts once (its fused computation's instructions do not), as does a call, a
  custom call or a while loop itself; a loop's condition does not count."""
  total = 0
  for module_text in re.split(r'^(?=HloModule\b)', hlo_text, flags=re.MULTILINE):
    bodies, entry = _computations(module_text)
    pending = [entry] if entry is not None else []
    while pending:
      for op, line in bodies.get(pending.pop(), ()):
        total += op not in NOT_LAUNCHED
        if op == 'while':
          pending.extend(m.group('body') for m in _WHILE_BODY.finditer(line))
  return total


def launch_count(compiled) -> int:
  """`top_level_ops` of a `jax.stages.Compiled`."""
  return top_level_ops(compiled.as_text())
