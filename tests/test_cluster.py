"""Cluster readiness: the user's command from an installed wheel, multi-process start."""
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest

from musica_jax import parallel

REPO = pathlib.Path(__file__).resolve().parents[1]
WFLW_SAMPLE = (REPO / ".." / "shared" / "data" / "wflw_sample").resolve()
# What a wheel build must not see (large, or not part of the package).
NOT_SOURCES = (".git", "results", "benchmarks", "workdirs", "build", "tmp", ".venv",
               "__pycache__", "*.egg-info", ".pytest_cache")


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "PMI_")) and k != "PYTHONPATH"}
  return {**env, "JAX_PLATFORMS": "cpu", "PIP_NO_INDEX": "1", **extra}


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


def test_distributed_modes_without_a_cluster(monkeypatch):
  for k in list(os.environ):
    if k.startswith(("SLURM_", "OMPI_")) or k in ("KUBERNETES_SERVICE_HOST",
                                                   "JAX_COORDINATOR_ADDRESS"):
      monkeypatch.delenv(k)
  assert "single process" in parallel.initialize_distributed("none")
  assert "no cluster" in parallel.initialize_distributed("auto")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert "one task" in parallel.initialize_distributed("auto")
  with pytest.raises(ValueError, match="--coordinator_address, --num_processes"):
    parallel.initialize_distributed("manual", "127.0.0.1:1234", None, 0)
  with pytest.raises(ValueError, match="--distributed=mpi"):
    parallel.initialize_distributed("mpi")


def _free_port_in_slurm_range():
  """A free port of the range JAX's SLURM detection derives from the job id."""
  for job_id in range(os.getpid() % 4096, os.getpid() % 4096 + 4096):
    port = job_id % 4096 + 65536 - 4096
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
    return job_id, port
  pytest.skip("no free port in 61440-65535")


@pytest.mark.multiprocess
def test_slurm_environment_forms_two_processes(tmp_path):
  """Two processes started as `srun --ntasks=2` would start them (SLURM_* variables, no
  flags): --distributed=auto forms one 2-process JAX job that trains together."""
  job_id, _ = _free_port_in_slurm_range()
  args = ["--flagfile=demo.flags", "--synthetic_train_size=16", "--synthetic_test_size=4",
          "--batch_size=4", "--eval_batch_size=4", "--hidden_size=16",
          f"--tfds_dir={tmp_path / 'tfds'}", "--steps=2", "--log_every=1", "--eval_every=-1",
          "--checkpoint_every=2", f"--workdir={tmp_path / 'run'}"]
  procs = []
  for i in range(2):
    env = _clean_env(SLURM_JOB_ID=str(job_id), SLURM_STEP_NODELIST="localhost",
                     SLURM_NTASKS="2", SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                     SLURM_STEP_NUM_NODES="1")
    procs.append(subprocess.Popen([sys.executable, "-m", "experiments.train", *args],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env))
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, o[-1000:] + e[-3000:]
  assert "2 process(es)" in outs[0][0] and "step 2/2" in outs[0][0]
  assert "training" not in outs[1][0]          # only process 0 reports
  assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
