"""Portable provenance: what a model file records about where it came from (the dataset,
split, steps, the commands) without the builder's file system. Absolute paths become
placeholders: a path recorded under a known key (the training workdir, the model
directory, the data folder) becomes that key's placeholder wherever it appears (in the
commands too); any other absolute path keeps only its last component, as `<...>/name`.
Relative paths (`../shared/data/300w`, a flagfile name) are kept as given.
"""
from __future__ import annotations

import re
from typing import Any

# Keys whose absolute-path values name something a reader can place.
PLACEHOLDERS = {"workdir": "$WORKDIR", "trained_in": "$WORKDIR", "model_path": "$MODEL_DIR",
                "data_dir": "$DATA_DIR", "tfds_dir": "$TFDS_DIR", "init_from": "$INIT_FROM"}
# A POSIX absolute path: '/' not preceded by a name character or '.', '~', '$', '>' (so
# '../a/b', '~/a', '$WORKDIR/a' and '<...>/a' are left alone), up to a space or separator.
ABSOLUTE_PATH = re.compile(r"(?<![\w.~$/>-])/[^\s=,;:'\"]+")


def _known_paths(obj: Any, found: dict[str, str]) -> None:
  if isinstance(obj, dict):
    for k, v in obj.items():
      if isinstance(v, str) and k in PLACEHOLDERS and ABSOLUTE_PATH.fullmatch(v):
        found.setdefault(v.rstrip("/"), PLACEHOLDERS[k])
      else:
        _known_paths(v, found)
  elif isinstance(obj, (list, tuple)):
    for v in obj:
      _known_paths(v, found)


def portable(obj: Any) -> Any:
  """`obj` (JSON-like: dicts, lists, strings, numbers) with every absolute path replaced
  (see the module docstring); other values unchanged."""
  found: dict[str, str] = {}
  _known_paths(obj, found)
  order = sorted(found, key=len, reverse=True)

  def fix(s: str) -> str:
    for path in order:
      s = re.sub(r"(?<![\w.~$/>-])" + re.escape(path) + r"(?=$|[/\s=,;:'\"])", found[path], s)
    return ABSOLUTE_PATH.sub(lambda m: "<...>/" + m.group().rstrip("/").rsplit("/", 1)[-1], s)

  def walk(x: Any) -> Any:
    if isinstance(x, str):
      return fix(x)
    if isinstance(x, dict):
      return {k: walk(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [walk(v) for v in x]
    return x
  return walk(obj)


def absolute_paths(obj: Any) -> list[str]:
  """Every absolute path left in the strings of `obj` (a check for tests and tools)."""
  out: list[str] = []

  def walk(x: Any) -> None:
    if isinstance(x, str):
      out.extend(ABSOLUTE_PATH.findall(x))
    elif isinstance(x, dict):
      for v in x.values():
        walk(v)
    elif isinstance(x, (list, tuple)):
      for v in x:
        walk(v)
  walk(obj)
  return out
