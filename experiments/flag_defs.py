"""THE way the programs declare absl flags: `define_flag` and `define_from_dataclass`.

Every flag of the programs is defined through this module, nowhere else
(tests/test_flags.py fails on a `flags.DEFINE_*` call outside it):
- `experiments.config_flags`: one flag per field of the config dataclasses (model,
  training, loop, data), with `define_from_dataclass`, on import;
- `experiments.common`: the cluster flags (--workdir, --distributed, ...), on import (it
  imports config_flags, so every program accepts the same flagfiles);
- each program: its own flags in its `define_flags()` (`common.define_flag`, this module's
  `define_flag`), run only under `if __name__ == "__main__"`, so importing a program (tests,
  another program reusing its functions) defines none of them.

Both helpers are idempotent: a name already defined in this process keeps its first
definition, so any number of programs can be imported, and their `define_flags()` run, in
one process without a duplicate-flag error. A flag is registered under the module that
asked for it (as absl's own DEFINE_* do), so a program's `--help` lists its own flags.
"""
from __future__ import annotations

import dataclasses
import sys

from absl import flags

FLAGS = flags.FLAGS


def _calling_module(depth: int) -> str:
  """The name of the module `depth` frames above the caller of this function, as absl
  names it (sys.argv[0] for the program run as __main__)."""
  name = sys._getframe(depth + 1).f_globals.get("__name__", "")  # noqa: SLF001
  return sys.argv[0] if name == "__main__" else name


def define_flag(kind: str, name: str, default, help_: str, *, module_name: str | None = None,
                **kwargs) -> None:
  """flags.DEFINE_<kind>(name, default, help=help_, **kwargs) unless --name is already
  defined in this process. kind: string, integer, float, boolean/bool, enum (with
  enum_values=...), list, multi_string, multi_enum, ... Registered under `module_name`,
  by default the calling module's."""
  if name in FLAGS:
    return
  getattr(flags, f"DEFINE_{kind}")(name, default, help=help_,
                                   module_name=module_name or _calling_module(1), **kwargs)


def define_from_dataclass(cls, help_: dict, *, names=None, enums=None, defaults=None,
                          module_name: str | None = None) -> None:
  """One flag per field of dataclass `cls` (or per field in `names`), each through
  `define_flag`: the field's name, its default (or `defaults[name]`), the flag type from the
  default's type (bool, int, float, str; a tuple becomes a comma-separated list),
  `enums[name]` as the choices of a string field, the help text from `help_` (or a pointer
  to the dataclass)."""
  enums, defaults = enums or {}, defaults or {}
  module_name = module_name or _calling_module(1)
  for f in dataclasses.fields(cls):
    if names is not None and f.name not in names:
      continue
    default = defaults.get(f.name, f.default)
    text = help_.get(f.name, f"{cls.__name__}.{f.name} (see {cls.__module__}).")
    kwargs = {}
    if f.name in enums:
      kind, kwargs = "enum", {"enum_values": list(enums[f.name])}
    elif isinstance(default, bool):
      kind = "boolean"
    elif isinstance(default, int):
      kind = "integer"
    elif isinstance(default, float):
      kind = "float"
    elif isinstance(default, str):
      kind = "string"
    elif isinstance(default, tuple):
      kind, default = "list", [str(x) for x in default]
    else:
      raise TypeError(f"{cls.__name__}.{f.name}: no flag type for {type(default)}")
    define_flag(kind, f.name, default, text, module_name=module_name, **kwargs)
