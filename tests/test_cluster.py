"""Cluster readiness: the user's command from an installed wheel, multi-process start."""
import dataclasses
import functools
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musica_jax import cascade
from musica_jax import config as config_lib
from musica_jax import layers
from musica_jax import model_io
from musica_jax import pyramid
from musica_jax import stage_net
from musica_jax import training

REPO = pathlib.Path(__file__).resolve().parents[1]
WFLW_SAMPLE = (REPO / ".." / "shared" / "data" / "wflw_sample").resolve()
# What a wheel build must not see (large, or not part of the package).
NOT_SOURCES = (".git", "results", "benchmarks", "workdirs", "build", "tmp", ".venv",
               "__pycache__", "*.egg-info", ".pytest_cache")


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "PMI_")) and k != "PYTHONPATH"}
  return {**env, "JAX_PLATFORMS": "cpu", "PIP_NO_INDEX": "1", **extra}


@pytest.mark.slow   # CI keeps tests/test_flags.py's installed-copy flagfile lookup (seconds)
def test_wheel_install_runs_the_users_command_outside_the_repository(tmp_path, tfds_dir):
  """Builds the wheel offline, installs it (not editable) into a folder, and runs
  `python -m experiments.train --flagfile=wflw98.flags` from a folder outside the repo:
  the flagfile resolves from the installed package data."""
  if not (WFLW_SAMPLE / "WFLW_annotations").is_dir():
    pytest.skip(f"WFLW sample not found at {WFLW_SAMPLE} (see ../shared/data/README.md)")
  src = tmp_path / "src"
  shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*NOT_SOURCES))
  env = _clean_env()
  wheels = tmp_path / "wheels"
  build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--no-build-isolation", "-w", str(wheels), str(src)],
                         capture_output=True, text=True, env=env, timeout=300)
  assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
  wheel, = wheels.glob("musica_jax-*.whl")
  target = tmp_path / "site"
  inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                         "--target", str(target), str(wheel)],
                        capture_output=True, text=True, env=env, timeout=300)
  assert inst.returncode == 0, inst.stdout[-2000:] + inst.stderr[-2000:]
  assert (target / "experiments" / "configs" / "wflw98.flags").is_file()
  assert (target / "experiments" / "launch" / "slurm.sbatch").is_file()
  for name in model_io.BUNDLED_MODELS:      # the shipped models travel in the wheel
    assert model_io.is_model_dir(model_io.default_model_path(name)) == model_io.is_model_dir(
        target / "musica_jax" / f"{name}_model"), name
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = _clean_env(PYTHONPATH=str(target))
  where = subprocess.run([sys.executable, "-c", "import experiments; print(experiments.__file__)"],
                         cwd=elsewhere, capture_output=True, text=True, env=env, timeout=60)
  assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
  run = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--flagfile=wflw98.flags",
       f"--data_dir={WFLW_SAMPLE}", f"--workdir={elsewhere / 'run'}", f"--tfds_dir={tfds_dir}",
       "--steps=2", "--batch_size=2", "--eval_batch_size=3", "--hidden_size=32",
       "--log_every=1", "--eval_every=0", "--checkpoint_every=2"],
      cwd=elsewhere, capture_output=True, text=True, env=env, timeout=600)
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
  assert "training 98 landmarks / 98 patches" in run.stdout
  assert "step 2/2" in run.stdout and "eval step 2 test: faces 3" in run.stdout
  assert (elsewhere / "run" / "checkpoints" / "2").is_dir()


_MODES_CODE = """
import os, pytest
from musica_jax import parallel
assert "single process" in parallel.initialize_distributed("none")
assert "no cluster" in parallel.initialize_distributed("auto")
os.environ["SLURM_NTASKS"] = "1"
assert "one task" in parallel.initialize_distributed("auto")
with pytest.raises(ValueError, match="--coordinator_address, --num_processes"):
  parallel.initialize_distributed("manual", "127.0.0.1:1234", None, 0)
with pytest.raises(ValueError, match="--distributed=mpi"):
  parallel.initialize_distributed("mpi")
print("ok")
"""


def test_distributed_modes_without_a_cluster():
  # A fresh process: jax.distributed must start before anything touches the XLA backend,
  # which earlier tests in this process have done.
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_"))
         and k not in ("KUBERNETES_SERVICE_HOST", "JAX_COORDINATOR_ADDRESS")}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", _MODES_CODE], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def _free_port_in_slurm_range():
  """A job id whose port (JAX's SLURM detection derives it from the id) is free here."""
  for job_id in range(os.getpid() % 4096, os.getpid() % 4096 + 4096):
    port = job_id % 4096 + 65536 - 4096
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
    return job_id
  pytest.skip("no free port in 61440-65535")


# Stands in for SLURM's `srun` on localhost: starts SLURM_NTASKS copies of the command with
# the variables SLURM gives each task, and fails when one of them fails.
FAKE_SRUN = """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NODELIST=localhost SLURM_STEP_NUM_NODES=1 \
      "$@" > "$FAKE_SRUN_LOGS/task$i.out" 2> "$FAKE_SRUN_LOGS/task$i.err" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
"""


@pytest.mark.slow   # CI keeps test_train's two processes on localhost matching one process
@pytest.mark.multiprocess
def test_slurm_recipe_forms_a_two_process_job(tmp_path):
  """experiments/launch/slurm.sbatch as a 2-task SLURM job would run it (its srun replaced
  by a localhost stand-in that sets the SLURM_* variables of each task): --distributed=auto
  forms one 2-process JAX job that trains to the end."""
  bin_dir, logs = tmp_path / "bin", tmp_path / "logs"
  bin_dir.mkdir()
  logs.mkdir()
  (bin_dir / "srun").write_text(FAKE_SRUN)
  (bin_dir / "srun").chmod(0o755)
  env = _clean_env(
      PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}",
      PYTHON=sys.executable, FAKE_SRUN_LOGS=str(logs),
      SLURM_JOB_ID=str(_free_port_in_slurm_range()), SLURM_NTASKS="2",
      SLURM_JOB_NODELIST="localhost", MUSICA_DATA_DIR="", MUSICA_WORKDIR=str(tmp_path / "run"),
      MUSICA_TFDS_DIR=str(tmp_path / "tfds"))
  env["MUSICA_DATA_DIR"] = str(tmp_path)          # unused by synthetic data, must be set
  proc = subprocess.run(
      ["bash", str(REPO / "experiments" / "launch" / "slurm.sbatch"), "demo.flags",
       "--synthetic_train_size=16", "--synthetic_test_size=4", "--batch_size=4",
       "--eval_batch_size=4", "--hidden_size=16", "--steps=2", "--log_every=1",
       "--eval_every=-1", "--checkpoint_every=2"],
      cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
  out = [(logs / f"task{i}.out").read_text() for i in range(2)]
  err = [(logs / f"task{i}.err").read_text() for i in range(2)]
  assert proc.returncode == 0, proc.stderr[-1000:] + err[0][-2000:] + err[1][-2000:]
  assert "2 process(es)" in out[0] and "step 2/2" in out[0], out[0]
  assert "training" not in out[1]                # only process 0 reports
  assert (tmp_path / "run" / "checkpoints" / "2").is_dir()


# --- accelerator-aware execution and bfloat16 compute ------------------------------------

SMALL = config_lib.ModelConfig(num_landmarks=10, patch_indices=(0, 2, 4, 6, 8, 9),
                               hidden_size=64, image_size=64)


def _inputs(cfg, batch, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  images = jax.random.normal(k1, (batch, cfg.image_size, cfg.image_size, 3))
  init = jax.random.uniform(k2, (cfg.num_landmarks, 2), minval=10, maxval=cfg.image_size - 10)
  target = init + 3 * jax.random.normal(k3, (batch, cfg.num_landmarks, 2))
  return images, init, target


def _stage(cfg, params, images, init, compiled=True):
  """(HLO text, outputs) of one jitted iteration (`cascade.stage_forward`) on the batch:
  the compiled module, or the lowered StableHLO (operand types spelled out)."""
  layout, xs = cascade.stage_inputs(cfg)
  atlas = pyramid.build_atlas(images, layout)
  shape = cascade.broadcast_init(init, images.shape[0], cfg)
  hidden = jnp.zeros((images.shape[0], cfg.hidden_size))
  fn = jax.jit(functools.partial(cascade.stage_forward, cfg))
  args = (cascade.stage_params(params, 0), atlas, shape, hidden,
          {k: v[0] for k, v in xs.items()})
  lowered = fn.lower(*args)
  return (lowered.compile().as_text() if compiled else lowered.as_text()), fn(*args)


@pytest.mark.usefixtures("highest_precision")   # compares paths: no TF32 (conftest.py)
def test_accelerator_path_runs_one_batched_pass_without_a_loop(monkeypatch):
  """On the CPU backend forced into the accelerator path, the compiled stage has no loop
  over face groups (the CPU path has one) and computes the same outputs."""
  params = stage_net.init_stacked(jax.random.key(1), SMALL)
  images, init, _ = _inputs(SMALL, batch=8)
  monkeypatch.setattr(cascade, "TARGET_CHUNK_PATCHES", 13)     # CPU: 4 groups of 2 faces
  assert cascade.face_group_size(8, 6, execution="cpu") == 2
  cpu_hlo, cpu_out = _stage(dataclasses.replace(SMALL, execution="cpu"), params, images, init)
  assert cascade.face_group_size(8, 6, execution="accelerator") == 8
  acc_hlo, acc_out = _stage(dataclasses.replace(SMALL, execution="accelerator"), params,
                            images, init)
  loop = re.compile(r"\bwhile\(")
  assert loop.search(cpu_hlo), "the CPU path should loop over face groups"
  assert not loop.search(acc_hlo), "the accelerator path loops"
  for a, b in zip(jax.tree.leaves(cpu_out), jax.tree.leaves(acc_out)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # "auto" (the default): chunked on the CPU backend only.
  assert cascade.face_group_size(8, 6) == (2 if jax.default_backend() == "cpu" else 8)


def test_bfloat16_compute_uses_bf16_products_and_keeps_f32_parameters():
  cfg16 = dataclasses.replace(SMALL, compute_dtype="bfloat16")
  params = stage_net.init_stacked(jax.random.key(1), SMALL)
  images, init, _ = _inputs(SMALL, batch=4)
  hlo16, out16 = _stage(cfg16, params, images, init, compiled=False)
  hlo32, out32 = _stage(SMALL, params, images, init, compiled=False)
  dots16 = [l for l in hlo16.splitlines() if "dot_general" in l and "->" in l]
  dots32 = [l for l in hlo32.splitlines() if "dot_general" in l and "->" in l]
  # conv1, conv2, attention, recurrent, head: bf16 operands, f32 results.
  assert len(dots16) == 5 and all(
      re.search(r"\(tensor<[^>]*bf16>, tensor<[^>]*bf16>\) -> tensor<[^>]*f32>", l)
      for l in dots16), dots16
  assert len(dots32) == 5 and not any("bf16" in l for l in dots32)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out16))
  shape16, shape32 = out16[0], out32[0]
  assert float(jnp.abs(shape16 - shape32).max()) < 0.05
  with pytest.raises(ValueError, match="compute_dtype"):
    dataclasses.replace(SMALL, compute_dtype="float16")


def test_bf16_matmul_backward_products_are_bf16_with_f32_gradients():
  """The custom gradient of the bf16 product: bf16 operands in all three products, float32
  accumulation, float32 gradients for float32 parameters, close to the f32 gradient."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (16, 48)).astype(jnp.bfloat16)
  w = jax.random.normal(k2, (48, 8))
  g = jax.random.normal(k3, (16, 8))
  loss16 = lambda x, w: (layers.bf16_matmul(x, w) * g).sum()
  loss32 = lambda x, w: ((x.astype(jnp.float32) @ w) * g).sum()
  dx16, dw16 = jax.grad(loss16, argnums=(0, 1))(x, w)
  dx32, dw32 = jax.grad(loss32, argnums=(0, 1))(x, w)
  assert dx16.dtype == jnp.bfloat16 and dw16.dtype == jnp.float32
  np.testing.assert_allclose(dw16, dw32, rtol=0.02, atol=0.1)
  np.testing.assert_allclose(dx16.astype(jnp.float32), dx32, rtol=0.02, atol=0.1)
  text = jax.jit(jax.value_and_grad(loss16, argnums=(0, 1))).lower(x, w).as_text()
  dots = [l for l in text.splitlines() if "dot_general" in l and "->" in l]
  assert len(dots) == 3 and all(
      re.search(r"\(tensor<[^>]*bf16>, tensor<[^>]*bf16>\) -> tensor<[^>]*f32>", l)
      for l in dots), dots


def _train(compute_dtype, steps=40):
  tcfg = training.TrainConfig(steps=steps, learning_rate=3e-3, decay_steps=1000,
                              compute_dtype=compute_dtype)
  state = training.create_train_state(SMALL, tcfg)
  images, init, target = _inputs(SMALL, batch=8, seed=3)
  fake = _FakeScheme()
  step = jax.jit(functools.partial(training.train_step, model_cfg=SMALL, train_cfg=tcfg,
                                   scheme=fake))
  losses_ = []
  for _ in range(steps):
    state, m = step(state, {"image": images, "landmarks": target}, init)
    losses_.append(float(m["loss"]))
  return state, np.asarray(losses_)


class _FakeScheme:
  """What train_step reads of a landmark scheme (inter-ocular NME), for the 10-point model."""
  outer_eye_corners = (0, 9)


def test_bfloat16_training_tracks_float32():
  """Same seed and data: bf16 compute learns like f32; parameters, EMA and Adam stay f32."""
  s32, l32 = _train("float32")
  s16, l16 = _train("bfloat16")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((s16.params, s16.ema_params,
                                                               s16.opt_state)) if x.ndim)
  assert int(s16.nonfinite_steps) == 0
  assert l16[-1] < 0.75 * l16[0] and l32[-1] < 0.75 * l32[0]
  assert abs(l16[-1] - l32[-1]) < 0.05 * l32[-1], (l16[-5:], l32[-5:])
