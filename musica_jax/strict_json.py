"""JSON that every parser accepts: NaN and infinities are written as null.

Python's `json` writes NaN / Infinity by default, which strict parsers (JavaScript's
JSON.parse, jq, Go, Rust's serde) reject. Every result file of this project goes through
`dumps`: a non-finite float becomes null (so a NaN metric reads as "no value" instead of
breaking the file); numpy scalars and arrays become plain numbers and lists.
"""
from __future__ import annotations

import json
import math

import numpy as np


def plain(data, nonfinite: str = "null"):
  """`data` with numpy values as Python ones and non-finite floats as None, or with
  nonfinite="string" as "inf" / "-inf" / "nan" (where an infinity is a setting, e.g. a
  threshold that disables a rule, and float(s) must read it back)."""
  if isinstance(data, dict):
    return {str(k) if not isinstance(k, str) else k: plain(v, nonfinite)
            for k, v in data.items()}
  if isinstance(data, (list, tuple)):
    return [plain(v, nonfinite) for v in data]
  if isinstance(data, np.ndarray):
    return plain(data.tolist(), nonfinite)
  if isinstance(data, (bool, np.bool_)):
    return bool(data)
  if isinstance(data, (int, np.integer)):
    return int(data)
  if isinstance(data, (float, np.floating)):
    value = float(data)
    if math.isfinite(value):
      return value
    return str(value) if nonfinite == "string" else None
  return data


def dumps(data, indent: int | None = None, sort_keys: bool = False, default=None,
          nonfinite: str = "null") -> str:
  """Strict JSON text of `data` (raises ValueError rather than write NaN)."""
  return json.dumps(plain(data, nonfinite), indent=indent, sort_keys=sort_keys,
                    allow_nan=False, default=default)


def dump(data, fh, indent: int | None = None) -> None:
  fh.write(dumps(data, indent=indent))
