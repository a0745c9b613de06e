"""The one atomic file writer: a file is either its old content or its complete new content.

Everything the project writes for later (model files, quit heads, run configs, result JSONs,
checkpoint checksums, dataset statistics and reports) goes through `write`: the content is
written to a temporary file beside the target and renamed over it, so a kill or a full disk
never leaves a half-written file under the real name; on an error the temporary file is
removed. Files get the usual permissions (0666 less the umask; mkstemp's 0600 is for
secrets, not results).
"""
from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Callable, IO


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def write(path, write_fn: Callable[[IO], None], binary: bool = False) -> pathlib.Path:
  """write_fn(open file) into a temporary file beside `path`, then rename it over `path`."""
  path = pathlib.Path(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  except OSError as e:     # name the file asked for, not the hidden temporary one
    raise type(e)(e.errno, f"cannot write {path}: {e.strerror or e}", str(path)) from None
  try:
    with os.fdopen(fd, "wb" if binary else "w") as fh:
      write_fn(fh)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return path


def write_text(path, text: str) -> pathlib.Path:
  return write(path, lambda fh: fh.write(text))
