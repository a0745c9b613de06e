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


@pytest.fixture
def highest_precision():
  """Float32 matmuls and convolutions at full float32 on every backend, for the test's
  duration (traced inside it: jit caches key on the setting).

  Tests that compare two compute paths (masked cascade vs fast path, scan vs loop,
  checkpoint vs export) use it: on NVIDIA GPUs (Ampere and later) JAX's default precision
  runs float32 products as TF32 (10-bit mantissa), which moves landmarks by ~1e-5 px and
  quitting scores by up to ~1e-2, and the kernels differ with the batch size (batch 1 vs 16), so
  two paths that agree to 1e-6 on a CPU would disagree there. "highest" makes the test
  check the same function on CPU, GPU and TPU."""
  import jax  # noqa: PLC0415
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """One TFDS data dir for the whole test session, so the real 300W data is prepared once."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def make_workdir():
  """make(workdir, steps=(2, 4, 6), data=None, mean_shape=None) -> (ModelConfig,
  TrainConfig): a training workdir made in-process (run_config.json + checkpoints at
  `steps`; raw and EMA weights differ from each other and from step to step): a tiny
  model, no training."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from data_pipelines import config as data_config  # noqa: PLC0415
  from musica_jax import checkpoints, run_config, schemes, training  # noqa: PLC0415
  from musica_jax import config as config_lib  # noqa: PLC0415

  def make(workdir, steps=(2, 4, 6), data=None, mean_shape=None):
    cfg = config_lib.for_scheme(schemes.get_scheme(68), 19, hidden_size=16)
    tcfg = training.TrainConfig(steps=max(steps))
    state = training.create_train_state(cfg, tcfg)
    if mean_shape is None:
      mean_shape = np.full((68, 2), 100.0, np.float32)
    run_config.save(workdir, cfg, data or data_config.DataConfig(), tcfg, mean_shape)
    ck = checkpoints.Checkpoints(str(workdir), keep=len(steps))
    for s in steps:
      state = state.replace(step=np.int32(s),
                            params=jax.tree.map(lambda x: x + 0.01, state.params),
                            ema_params=jax.tree.map(lambda x: x - 0.02, state.ema_params))
      ck.save(s, state)
    ck.wait()
    ck.close()
    return cfg, tcfg
  return make


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


@pytest.fixture(scope="session")
def tiny_run_flags():
  """flags(tfds_dir, train_size, *extra): the flags of a tiny synthetic training run
  (demo.flags, batch 8, hidden 32, a checkpoint every 2 steps, no evaluation) with its
  prepared data in `tfds_dir`."""
  return _tiny_run_flags


def _tiny_run_flags(tfds_dir, train_size: int = 24, *extra) -> list:
  return ["--flagfile=demo.flags", f"--synthetic_train_size={train_size}",
          "--synthetic_test_size=8", "--batch_size=8", "--eval_batch_size=8",
          "--hidden_size=32", f"--tfds_dir={tfds_dir}", "--log_every=1", "--eval_every=-1",
          "--checkpoint_every=2", *extra]


@pytest.fixture(scope="session")
def tiny_two_level_flags(tmp_path_factory, tiny_run_flags):
  """The flags of a tiny synthetic run of two iterations (16 faces), data prepared once."""
  return tiny_run_flags(tmp_path_factory.mktemp("tfds"), 16, "--levels=1,0")


@pytest.fixture
def train_config(parse_flags):
  """train_config(args, workdir): the Config `python -m experiments.train --workdir=W ARGS`
  trains (parsed in this process)."""
  from experiments import train  # noqa: PLC0415

  def make(args, workdir="unused"):
    parse_flags(f"--workdir={workdir}", *args)
    return train.config_from_flags()
  return make
