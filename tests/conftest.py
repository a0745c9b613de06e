import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data():
  """Path of ../shared/data; skips (with the reason) when the real data is absent."""
  if not (SHARED_DATA / "300w").is_dir():
    pytest.skip(f"real data not found at {SHARED_DATA} (see ../shared/data/README.md)")
  return SHARED_DATA
