"""Each distillation method's loss weights, on top of any config (`set_method`).

Objective: `ce_weight * CE + kd_weight * KD(T) + feature_weight * feature_loss`. Defaults (each
feature method's come from its registration in afd_jax/distill/, with their sources):

| method | CE  | KD (T 4) | feature weight | source                                        |
|--------|-----|----------|----------------|-----------------------------------------------|
| none   | 1   | 0        | -              | the student alone                             |
| kd     | 0.1 | 0.9      | -              | CRD (`-r 0.1 -a 0.9 -b 0`); method 'none'     |
| fitnet | 1   | 0        | 100            | CRD (`-a 0 -b 100`)                           |
| at     | 1   | 0        | 1000           | CRD (`-a 0 -b 1000`)                          |
| sp     | 1   | 0        | 3000           | CRD (`-a 0 -b 3000`)                          |
| cc     | 1   | 0        | 0.02           | CRD (`-a 0 -b 0.02`)                          |
| vid    | 1   | 0        | 1              | CRD (`-a 0 -b 1`)                             |
| rkd    | 1   | 0        | 1              | CRD (`-a 0 -b 1`; distance 25, angle 50)      |
| pkt    | 1   | 0        | 30000          | CRD (`-a 0 -b 30000`)                         |
| nst    | 1   | 0        | 50             | CRD (`-a 0 -b 50`)                            |
| crd    | 1   | 0        | 0.8            | CRD (`-a 0 -b 0.8`)                           |
| crd+kd | 1   | 1        | 0.8            | CRD (`-a 1 -b 0.8`)                           |
| ab     | 1   | 0        | 0 (+ its stage)| CRD: 30 epochs of connectors + student body   |
| ft     | 1   | 0        | 200            | CRD (`-b 200`), after 30 epochs of paraphraser |
| fsp    | 1   | 0        | 0 (+ its stage)| CRD: 30 epochs of student body under FSP      |
| semckd | 1   | 1        | 400            | SemCKD's scripts (`-a 1 -b 400`)              |
| reviewkd | 1 | 0        | 5              | ReviewKD's CIFAR-100 script (warm-up 20 ep.)  |
| dkd    | 1   | 0        | 1 (DKD's own alpha 1, beta 8, warm-up 20) | mdistiller cfg.py |
| afd    | 1   | 0.9      | 200            | the official AFD recipe (KD 0.9, T 4, beta 200) |

AB and FSP train only in their own stage before the main training (`config.pretrain.*`, the
CRD benchmark's `init_epochs`); their main-stage weight 0 is the benchmark's (helper/loops.py).
Per-pair values of DKD's beta and ReviewKD's weight: their registrations' `recipes`.

`kd_weight=` adds KD on top of any method (CRD's `-a`; e.g. `set_method(c, 'at', kd_weight=0.9)`
compares AT with AFD's recipe on equal terms). As a config file:
  --config=configs/methods.py:at       (base config, AT with CRD's weights)
  --config=configs/methods.py:at+kd    (the same, plus KD 0.9 at T 4)
  --config=configs/methods.py:crd+kd   (CRD+KD as its benchmark runs it: KD 1, `-a 1 -b 0.8`)
"""
from afd_jax.distill import registry
from configs.base import get_base_config

KD_TEMPERATURE = 4.0
_BASELINES = {'none': (1.0, 0.0), 'kd': (0.1, 0.9)}  # the student alone; CRD's KD
# The KD weight of `<method>+kd` where the method's own benchmark runs it with KD (otherwise
# 0.9): CRD+KD, RepDistiller scripts/run_cifar_distill.sh:32 (`--distill crd -a 1 -b 0.8`).
PLUS_KD_WEIGHT = {'crd': 1.0}


def logit_weights(method: str):
  """(ce_weight, kd_weight) of `method`: the student alone, CRD's KD, or a registered feature
  method's own defaults (afd_jax/distill/registry.py; its feature weight likewise)."""
  if method in _BASELINES:
    return _BASELINES[method]
  return registry.get(method).logit_weights  # ValueError listing the known methods


def choices():
  """Every method name `set_method` takes."""
  return tuple(_BASELINES) + registry.registered()


def set_method(config, method: str, kd_weight=None):
  """Sets `config.method` and `config.loss.{ce,kd,feature}_weight` (and `kd_temperature`) to
  `method`'s defaults (table above); `kd_weight`, when given, replaces the KD weight. Returns
  `config`."""
  if method not in choices():
    raise ValueError(f'Unknown method {method!r}. Known methods: {", ".join(choices())}.')
  ce, kd = logit_weights(method)
  config.method = 'none' if method == 'kd' else method
  config.loss.ce_weight = ce
  config.loss.kd_weight = kd if kd_weight is None else float(kd_weight)
  config.loss.kd_temperature = KD_TEMPERATURE
  config.loss.feature_weight = (registry.get(config.method).feature_weight
                                if config.method != 'none' else 0.0)
  return config


def apply_recipe(config, family: str):
  """Sets what the method's own recipe for `family` (e.g. 'cifar100') changes for the
  config's (teacher, student) pair (`Method.recipes`); the student alone and KD have none.
  Returns `config`."""
  if config.method == 'none':
    return config
  settings = registry.get(config.method).recipe(family, config.teacher.name, config.student.name)
  for key, value in settings.items():
    *sections, leaf = key.split('.')
    target = config
    for section in sections:
      target = getattr(target, section)
    setattr(target, leaf, value)
  return config


def get_config(arg: str = 'afd'):
  """The base config with method `arg` (one of `choices()`, optionally `+kd` for KD on top:
  0.9, or the method's own benchmark's weight, `PLUS_KD_WEIGHT`; a method whose recipe has KD
  already, e.g. afd or semckd, keeps its own weight)."""
  method, plus_kd = (arg[:-3], True) if arg.endswith('+kd') else (arg, False)
  plus = None
  if plus_kd and method in choices() and logit_weights(method)[1] == 0:
    plus = PLUS_KD_WEIGHT.get(method, 0.9)
  config = set_method(get_base_config(), method, kd_weight=plus)
  config.name = arg
  return config
