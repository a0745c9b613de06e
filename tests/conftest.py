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


@pytest.fixture
def parse_flags():
  """parse_flags(*args) parses args as an entry point's command line (flagfiles looked up
  and expanded by experiments.common) into absl's FLAGS, in this process, so a test can
  call an entry point's `config_from_flags` and its library without a subprocess. The
  flags are reset to their defaults afterwards. Import the entry point first (it defines
  its flags)."""
  from absl import flags  # noqa: PLC0415
  from experiments import common  # noqa: PLC0415

  def parse(*args):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(common.resolve_flagfiles(["test", *map(str, args)]))
  yield parse
  flags.FLAGS.unparse_flags()
