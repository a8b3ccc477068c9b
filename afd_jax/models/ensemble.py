"""Several models as one frozen teacher (`config.teachers`).

`Ensemble(members, labels, inputs)` is called like a model: `apply(variables, images)` returns
`(logits, features)` with `logits` stacked `K x B x C` (member k's in row k, float32) and
`features` every member's taps in order; `taps()` names them `label:layer`, their stages
numbered on from the previous member's. Its variables hold each member's under its label
(`{'params': {label: ...}, 'batch_stats': {label: ...}}`), so each member keeps its own
checkpoint, placement and dtype. Member k sees `images * scale + shift` where `inputs[k]` is
`(scale, shift)` per channel (its own training statistics), the images as they are where None.

Like `Tapped`, this is a plain object with `init`/`apply`/`taps` rather than a linen module:
the members keep their own variable trees, under labels the user chose.
"""
import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from afd_jax.taps import Tap

Renormalisation = Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]


@dataclasses.dataclass(frozen=True, eq=False)
class Ensemble:
  """Frozen teachers evaluated side by side on one batch; see the module docstring."""
  members: Tuple[Any, ...]
  labels: Tuple[str, ...]
  inputs: Tuple[Renormalisation, ...] = ()

  def __post_init__(self):
    if len(self.labels) != len(self.members) or not self.members:
      raise ValueError(f'an ensemble needs one label per member, got {len(self.labels)} labels '
                       f'for {len(self.members)} members.')
    repeated = sorted({label for label in self.labels if self.labels.count(label) > 1})
    if repeated:
      raise ValueError(f'teachers need distinct labels; {", ".join(repeated)} is used twice '
                       '(set config.teachers[i].label).')
    if self.inputs and len(self.inputs) != len(self.members):
      raise ValueError('an ensemble needs one input renormalisation (or None) per member.')

  def taps(self) -> Tuple[Tap, ...]:
    """Every member's taps, named `label:layer`, stages numbered on across members."""
    out, offset = [], 0
    for label, member in zip(self.labels, self.members):
      member_taps = member.taps()
      out += [Tap(f'{label}:{t.name}', t.stage + offset) for t in member_taps]
      offset += max((t.stage for t in member_taps), default=0)
    return tuple(out)

  def member_input(self, k: int, images: jax.Array) -> jax.Array:
    """The images as member `k` expects them (`inputs[k]`)."""
    if not self.inputs or self.inputs[k] is None:
      return images
    scale, shift = (jnp.asarray(v, images.dtype) for v in self.inputs[k])
    return images * scale + shift

  def member_variables(self, variables: Dict[str, Any], k: int) -> Dict[str, Any]:
    """Member `k`'s own variables (every collection's entry under its label)."""
    label = self.labels[k]
    return {col: tree[label] for col, tree in variables.items() if label in tree}

  def init(self, rngs, images, train: bool = False):
    """Every member's variables under its label; member k's from `fold_in(rngs, k)`."""
    out: Dict[str, Dict[str, Any]] = {}
    for k, (label, member) in enumerate(zip(self.labels, self.members)):
      own = member.init(jax.random.fold_in(rngs, k), self.member_input(k, images), train=train)
      for col, tree in own.items():
        out.setdefault(col, {})[label] = tree
    return out

  def apply(self, variables, images, train: bool = False, *, mutable=False, **kwargs):
    """`(K x B x C logits, every member's taps)`. The ensemble is a frozen teacher: no
    mutable collections, no other call options."""
    if mutable is not False or kwargs or train:
      raise ValueError('several teachers are applied frozen (train=False), with no mutable '
                       'collections or other options.')
    logits, features = [], []
    for k, member in enumerate(self.members):
      member_logits, member_features = member.apply(
          self.member_variables(variables, k), self.member_input(k, images), train=False)
      logits.append(member_logits.astype(jnp.float32))
      features += list(member_features)
    return jnp.stack(logits), tuple(features)


  def member(self, k: int) -> 'Member':
    """Member `k` alone, applied to the ensemble's variables (e.g. to evaluate it)."""
    return Member(self, k)


@dataclasses.dataclass(frozen=True, eq=False)
class Member:
  """One teacher of an `Ensemble`: `apply(ensemble_variables, images)` is its own
  `(logits, features)` on its own input."""
  ensemble: Ensemble
  index: int

  def apply(self, variables, images, train: bool = False):
    e, k = self.ensemble, self.index
    return e.members[k].apply(e.member_variables(variables, k), e.member_input(k, images),
                              train=train)


def is_ensemble(model) -> bool:
  return isinstance(model, Ensemble)


def members_of(model) -> Sequence[Tuple[str, Any]]:
  """`(label, member)` of an ensemble, or `(None, model)` for one model."""
  return tuple(zip(model.labels, model.members)) if is_ensemble(model) else ((None, model),)
