"""Training: flags and flagfiles, resume after SIGKILL, NaN guard, multi-device equivalence.

The runs call experiments.train_lib in this process (flags parsed by the `parse_flags`
fixture into experiments.train's Config); subprocesses only where a process must be
killed or several processes run."""
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from absl import app
from absl import flags

from experiments import common
from experiments import train
from experiments import train_lib
from musica_jax import restore
from musica_jax import run_config

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_flags(tmp_path_factory, tiny_run_flags):
  """A tiny synthetic run: prepared data shared by the tests of this module."""
  return tiny_run_flags(tmp_path_factory.mktemp("tfds"), 24, "--augment=true")


def _train_process(args, workdir, env=None, **kw):
  cmd = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *args]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, timeout=300, **kw)


def _config(parse_flags, args, workdir="unused"):
  """The Config `python -m experiments.train --workdir=W ARGS` trains."""
  parse_flags(f"--workdir={workdir}", *args)
  return train.config_from_flags()


def _train(parse_flags, args, workdir):
  """`python -m experiments.train --workdir=W ARGS`, in this process."""
  return train_lib.train_and_evaluate(_config(parse_flags, args, workdir), str(workdir))


def _final_params(workdir):
  """Step, raw and EMA parameters of the latest checkpoint, as flat numpy arrays."""
  state, _, _ = restore.restore_state(workdir)
  return int(state.step), [np.asarray(x) for x in jax.tree.leaves((state.params, state.ema_params))]


def test_flagfile_lookup_and_errors(tmp_path):
  resolved = common.resolve_flagfiles(["prog", "--flagfile=demo.flags", "--steps=3"])
  assert resolved[1:-1] == [l for l in (common.CONFIG_DIR / "demo.flags").read_text().splitlines()
                            if l.startswith("--")]
  assert resolved[0] == "prog" and resolved[-1] == "--steps=3"
  assert "--num_patches=98" in common.resolve_flagfiles(["p", "--flagfile=wflw98"])
  for name in ("wflw98", "wflw49", "wflw44", "300w68", "300w34", "300w19", "demo"):
    assert (common.CONFIG_DIR / f"{name}.flags").exists(), name
  with pytest.raises(SystemExit, match="nope.flags"):
    common.resolve_flagfiles(["p", "--flagfile=nope.flags"])


# 300w34.flags before it included 300w_base.flags (comments left out).
OLD_300W34 = """--dataset=ibug300w
--data_dir=../shared/data/300w
--num_points=68
--num_patches=34
--train_split=train_fit
--eval_split=val
--val_fraction=0.1
--val_seed=0
--flip_label_shift=0.52
--batch_size=128
--eval_batch_size=64
--balancing=gdb
--steps=30000
--learning_rate=1e-3
--decay_steps=15000
--decay_factor=0.1
--ema_decay=0.9999
--log_every=50
--eval_every=1000
--checkpoint_every=500
"""


def test_a_nested_flagfile_resolves_by_name_from_any_folder(tmp_path, monkeypatch, parse_flags):
  monkeypatch.chdir(tmp_path)                       # neither flagfile is here
  (tmp_path / "old34.flags").write_text(OLD_300W34)
  parse_flags("--workdir=w", "--flagfile=old34.flags")
  before = flags.FLAGS.flag_values_dict()
  parse_flags("--workdir=w", "--flagfile=300w34.flags")
  assert flags.FLAGS.flag_values_dict() == before
  cfg = _config(parse_flags, ["--flagfile=300w34.flags", "--num_patches=19", "--steps=7"])
  assert cfg.model.num_patches == 19 and cfg.train.steps == 7      # flags after it win
  assert cfg.data.dataset == "ibug300w" and cfg.data.flip_label_shift == 0.52  # the base's
  (tmp_path / "mine.flags").write_text("--flagfile=nope.flags\n")
  with pytest.raises(SystemExit, match="nope.flags .in mine.flags"):
    common.resolve_flagfiles(["p", "--flagfile=mine.flags"])
  (tmp_path / "loop.flags").write_text("--flagfile=loop.flags\n")
  with pytest.raises(SystemExit, match="includes itself"):
    common.resolve_flagfiles(["p", "--flagfile=loop.flags"])


def test_flag_defaults_are_the_dataclass_defaults(parse_flags):
  from musica_jax import config as config_lib  # noqa: PLC0415
  cfg = _config(parse_flags, ["--dataset=synthetic_faces", "--seed=5"])
  assert cfg.model == config_lib.for_scheme(68)
  assert cfg.train == config_lib.TrainConfig(seed=5) and cfg.loop == config_lib.LoopConfig()
  cfg = _config(parse_flags, ["--dataset=synthetic_faces", "--lr_schedule=cosine",
                              "--warmup_steps=10", "--compute_dtype=bfloat16", "--nouse_attention",
                              "--levels=1,0", "--eval_every=-1", "--divergence_factor=0"])
  assert (cfg.train.lr_schedule, cfg.train.warmup_steps, cfg.train.compute_dtype) == (
      "cosine", 10, "bfloat16")
  assert cfg.model.levels == (1, 0) and not cfg.model.use_attention
  assert (cfg.loop.eval_every, cfg.loop.divergence_factor) == (-1, 0.0)
  with pytest.raises(flags.Error, match="lr_schedule"):
    _config(parse_flags, ["--lr_schedule=linear"])
  with pytest.raises(app.UsageError, match="--keep_checkpoints=0"):
    _config(parse_flags, ["--dataset=synthetic_faces", "--keep_checkpoints=0"])


def test_unknown_flag_and_missing_data_dir_fail_clearly(tmp_path, tiny_flags, parse_flags):
  with pytest.raises(flags.Error, match="bogus_flag"):
    _config(parse_flags, [*tiny_flags, "--bogus_flag=1"])
  with pytest.raises(common.USER_ERRORS) as out:
    _train(parse_flags, ["--flagfile=300w68.flags", "--data_dir=/nonexistent/300w", "--steps=2"],
           tmp_path / "b")
  assert "/nonexistent/300w" in str(out.value)


def test_flags_after_flagfile_override_it(tmp_path, tiny_flags, parse_flags, capsys):
  _train(parse_flags, [*tiny_flags, "--steps=2", "--num_patches=34"], tmp_path / "w")
  out = capsys.readouterr()
  run = run_config.load(tmp_path / "w")
  assert run["model_config"].num_patches == 34       # demo.flags says 19
  assert run["train"]["steps"] == 2
  assert run["loop"] == {"log_every": 1, "eval_every": -1, "checkpoint_every": 2,
                         "keep_checkpoints": 3, "divergence_factor": 10.0}
  assert "step 2/2" in out.out and "samples/s" in out.out and "ETA" in out.out
  assert (tmp_path / "w" / "metrics.jsonl").exists()
  assert list((tmp_path / "w" / "tensorboard").glob("events.out.tfevents*"))


def test_sigkill_mid_run_then_resume_gives_the_same_parameters(tmp_path, tiny_flags,
                                                               parse_flags, capsys):
  steps = ["--steps=10"]
  _train(parse_flags, [*tiny_flags, *steps], tmp_path / "ref")

  work = tmp_path / "killed"
  cmd = [sys.executable, "-m", "experiments.train", f"--workdir={work}", *tiny_flags, *steps]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600        # generous: a loaded 2-core CI box compiles slowly
  while (time.time() < deadline and proc.poll() is None
         and not (work / "checkpoints" / "4").exists()):
    time.sleep(0.05)
  assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the kill"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  finished = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
  assert finished and max(finished) < 10, f"the kill came too late: {finished}"
  capsys.readouterr()
  _train(parse_flags, [*tiny_flags, *steps], work)
  assert "resumed from checkpoint at step" in capsys.readouterr().out

  step_a, a = _final_params(tmp_path / "ref")
  step_b, b = _final_params(work)
  assert step_a == step_b == 10
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, tiny_flags,
                                                               parse_flags):
  work = tmp_path / "nan"
  _train(parse_flags, [*tiny_flags, "--steps=2"], work)
  with pytest.raises(common.UserError, match="non-finite loss"):
    _train(parse_flags, [*tiny_flags, "--steps=12", "--learning_rate=1e30",
                         "--checkpoint_every=1"], work)
  step, leaves = _final_params(work)
  assert 2 <= step < 12
  assert all(np.all(np.isfinite(x)) for x in leaves)


def test_four_devices_match_one_device():
  code = textwrap.dedent("""
      import functools, jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh
      from musica_jax import config, parallel, schemes, training
      assert jax.device_count() == 4, jax.devices()
      cfg = config.ModelConfig(num_landmarks=68, patch_indices=schemes.IBUG68.patch_indices(19),
                               hidden_size=32)
      tcfg = training.TrainConfig(steps=3)
      rng = np.random.default_rng(0)
      init = jnp.asarray(rng.uniform(60, 160, (68, 2)), jnp.float32)
      batches = [dict(image=rng.normal(size=(8, 228, 228, 3)).astype(np.float32),
                      landmarks=(init + rng.normal(size=(8, 68, 2)) * 4).astype(np.float32))
                 for _ in range(3)]
      def run(devices):
        mesh = Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
        rep = parallel.replicated(mesh)
        state = jax.device_put(training.create_train_state(cfg, tcfg), rep)
        fn = jax.jit(functools.partial(training.train_step, model_cfg=cfg, train_cfg=tcfg,
                                       scheme=schemes.IBUG68),
                     in_shardings=(rep, parallel.batch_sharding(mesh), rep),
                     out_shardings=(rep, rep))
        for b in batches:
          b = {k: jax.device_put(v, parallel.batch_sharding(mesh)) for k, v in b.items()}
          state, m = fn(state, b, jax.device_put(init, rep))
        return jax.device_get(state.params), float(m["loss"])
      p4, l4 = run(jax.devices())
      p1, l1 = run(jax.devices()[:1])
      for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
      assert abs(l4 - l1) < 1e-4 * max(1, abs(l1))
      print("equal", l4, l1)
  """)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "equal" in out.stdout


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow    # ~37 s on 2 cores (two JAX processes); four local devices: below
@pytest.mark.multiprocess
def test_two_processes_on_localhost_match_one_process(tmp_path, tiny_flags):
  """A real 2-host job (jax.distributed over gloo on localhost CPU), each process reading
  its own half of the global batch, ends with the same parameters as a 1-process run."""
  args = [*tiny_flags, "--steps=3"]
  port = _free_port()
  # The 1-process reference runs on CPU too (a subprocess: this one may hold a GPU), at the
  # same time as the two processes of the job.
  cmd = [sys.executable, "-m", "experiments.train"]
  popen = lambda extra: subprocess.Popen(
      [*cmd, *extra, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  single = popen([f"--workdir={tmp_path / 'single'}"])
  procs = [popen([f"--workdir={tmp_path / 'multi'}", f"--coordinator_address=127.0.0.1:{port}",
                  "--num_processes=2", f"--process_id={i}"]) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  single_err = single.communicate(timeout=300)[1]
  assert single.returncode == 0, single_err[-3000:]
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, e[-3000:]
  assert "2 process(es)" in outs[0][0] and "step 3/3" in outs[0][0]
  assert "step" not in outs[1][0] and "training" not in outs[1][0]   # only process 0 reports
  step_a, a = _final_params(tmp_path / "single")
  step_b, b = _final_params(tmp_path / "multi")
  assert step_a == step_b == 3
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)


@pytest.mark.slow    # ~19 s on 2 cores: a benchmark program end to end
def test_pipeline_benchmark_end_to_end_mode(tmp_path, tiny_flags):
  out_json = tmp_path / "tp.json"
  flags_ = [f for f in tiny_flags if not f.startswith(("--log_every", "--eval_every",
                                                        "--checkpoint_every"))]
  out = subprocess.run([sys.executable, "-m", "experiments.pipeline_benchmark", *flags_,
                        "--num_batches=2", "--warmup_batches=1", "--end_to_end",
                        f"--output_json={out_json}"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  import json
  r = json.loads(out_json.read_text())
  for key in ("samples_per_sec", "train_step_alone_samples_per_sec",
              "end_to_end_samples_per_sec", "end_to_end_slowdown"):
    assert r[key] == r[key] and r[key] < float("inf"), key
  assert r["samples_per_sec"] > 0 and r["end_to_end_samples_per_sec"] > 0
  assert r["patches"] == 19
