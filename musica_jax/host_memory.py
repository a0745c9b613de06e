"""Host memory settings that XLA:CPU's large buffers need to be fast.

glibc serves an allocation of 32 MB or more (its largest dynamic mmap threshold) with a
fresh mmap and returns it with munmap when it is freed, so every such XLA buffer is
page-faulted anew on each call: about 0.5 ms per MB on the development VM, more than the
arithmetic of most ops (a float32 x * 2 over a [64, 228, 228, 3] batch of crops: 9.7 ms
with the default, 1.5 ms with the settings below). `keep_large_buffers` makes glibc serve
them from the heap and keep freed memory for the next call (mallopt M_MMAP_THRESHOLD and
M_TRIM_THRESHOLD); the process then keeps its peak heap instead of giving it back to the
system. It is applied once per process by the predictor and training (which run the
same buffer sizes call after call); `MUSICA_KEEP_LARGE_BUFFERS=0` turns it off. A no-op
where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX / 2 on some builds; this is well below.
_THRESHOLD = 1 << 30

_applied: bool | None = None


def keep_large_buffers() -> bool:
  """Applies the settings once per process; returns whether they are in effect."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if os.environ.get("MUSICA_KEEP_LARGE_BUFFERS", "1") == "0":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  _applied = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(
      mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
  return _applied
