"""host_memory.keep_large_buffers: applied once per process on glibc, off by environment."""
import platform

import pytest

from musica_jax import host_memory


def test_applied_once_and_switchable(monkeypatch):
  monkeypatch.setattr(host_memory, "_applied", None)
  monkeypatch.setenv("MUSICA_KEEP_LARGE_BUFFERS", "0")
  assert host_memory.keep_large_buffers() is False
  monkeypatch.setattr(host_memory, "_applied", None)
  monkeypatch.delenv("MUSICA_KEEP_LARGE_BUFFERS")
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    pytest.skip("mallopt is glibc's")
  assert host_memory.keep_large_buffers() is True
  assert host_memory.keep_large_buffers() is True      # idempotent, remembered
