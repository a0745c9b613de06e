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


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """One TFDS data dir for the whole test session, so the real 300W data is prepared once."""
  return str(tmp_path_factory.mktemp("tfds"))
