"""Reliability: nothing lost, nothing wrong passed off as right, one line per bad input.

The SIGKILL resume tests live in tests/test_train.py. Here: NaN-aware metrics and strict
JSON, one-line errors for bad flags and data, the divergence guard, the workdir lock,
damaged checkpoints, predictor input validation and a full disk.
"""
import json
import math
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

from experiments import common
from experiments import eval_lib
from musica_jax import checkpoints
from musica_jax import config as config_lib
from musica_jax import metrics
from musica_jax import model_io
from musica_jax import schemes
from musica_jax import stage_net
from musica_jax import strict_json
from musica_jax import training

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
ENV.pop(common.VERBOSE_ENV, None)


def _strict_load(text: str):
  def refuse(name):
    raise ValueError(f"non-strict JSON constant {name}")
  return json.loads(text, parse_constant=refuse)


def _start(program: str, args, cwd=REPO, env=None):
  return subprocess.Popen([sys.executable, "-m", f"experiments.{program}", *map(str, args)],
                          cwd=cwd, env={**ENV, **(env or {})}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _run_all(cases, parallel: int = 4, timeout: int = 400):
  """Runs {name: (program, args)} a few at a time -> {name: (returncode, stdout, stderr)}."""
  out, names = {}, list(cases)
  for i in range(0, len(names), parallel):
    procs = {n: _start(*cases[n]) for n in names[i:i + parallel]}
    for n, p in procs.items():
      so, se = p.communicate(timeout=timeout)
      out[n] = (p.returncode, so, se)
  return out


def assert_one_line_error(result, program: str, *must_contain: str):
  """Non-zero exit, no traceback, no help dump, exactly one `PROGRAM: error:` line that
  names what it must (the flag, the file)."""
  rc, so, se = result
  assert rc != 0, (so[-2000:], se[-2000:])
  assert "Traceback" not in se, se[-3000:]
  assert "--helpfull" not in se + so and "flags:" not in se, se[-3000:]
  lines = [l for l in se.splitlines() if l.startswith(f"{program}: error:")]
  assert len(lines) == 1, se[-3000:]
  for text in must_contain:
    assert text in lines[0], (text, lines[0])
  return lines[0]


# ---------------------------------------------------------------------------------------
# 3. NaN-aware metrics, strict JSON.


def test_a_nonfinite_prediction_is_a_failure():
  nme = np.array([0.01, np.nan, np.inf, 0.05])
  assert metrics.failure_rate(nme, 0.08) == 0.5          # was 0.0 for NaN and 0.25 here
  assert metrics.auc(nme, 0.08) == pytest.approx((0.07 / 0.08 + 0.03 / 0.08) / 4)
  assert metrics.nonfinite_count(nme) == 2
  x, y = metrics.ced(nme, 0.08, num=3)
  assert y[-1] == 0.5
  s = metrics.summarise(np.full(3, np.nan))
  assert s["fr_008"] == 1.0 and s["auc_008"] == 0.0 and s["nonfinite_faces"] == 3
  per_face = {k: np.full((3, 4), np.nan) for k in (
      "nme_interpupil_per_iteration", "nme_interocular_per_iteration",
      "nme_box_per_iteration", "estimated_error")}
  per_face.update(iterations=np.full(4, 3), nme_interocular_init=np.full(4, 0.2),
                  nme_interpupil_init=np.full(4, 0.3))
  summary = eval_lib.summarise(per_face)
  assert summary["fr_008"] == 1.0 and summary["nonfinite_faces"] == 4


def test_strict_json_writes_null_for_nonfinite_values(tmp_path):
  data = {"nme": float("nan"), "list": [np.float32(np.inf), -math.inf, np.int64(3)],
          "array": np.array([1.5, np.nan]), "ok": 0.25, "flag": np.bool_(True)}
  back = _strict_load(strict_json.dumps(data))
  assert back == {"nme": None, "list": [None, None, 3], "array": [1.5, None], "ok": 0.25,
                  "flag": True}
  common.write_json(tmp_path / "r.json", data)
  assert _strict_load((tmp_path / "r.json").read_text())["nme"] is None
  assert (tmp_path / "r.json").stat().st_mode & 0o044 == 0o044   # readable by all


def test_every_result_writer_goes_through_strict_json():
  """No module writes JSON with Python's default (NaN-permitting) encoder."""
  allowed = {
      "musica_jax/strict_json.py": "the strict encoder itself",
      "experiments/sweep_thresholds.py": "its _plain() turns every non-finite into a string",
  }
  offenders = []
  for folder in ("musica_jax", "experiments", "data_pipelines"):
    for path in sorted((REPO / folder).rglob("*.py")):
      rel = str(path.relative_to(REPO))
      if rel in allowed:
        continue
      for i, line in enumerate(path.read_text().splitlines(), 1):
        if ("json.dump(" in line or "json.dumps(" in line) and "strict_json." not in line \
            and "sort_keys=True" not in line:      # a hash key, not a file
          offenders.append(f"{rel}:{i}: {line.strip()}")
  assert not offenders, offenders


def _broken_model(path):
  """A model whose activations overflow: finite weights x 1e30 -> NaN landmarks."""
  cfg = config_lib.for_scheme(schemes.get_scheme(68), 19, hidden_size=16)
  params = jax.tree.map(lambda x: np.asarray(x) * 1e30,
                        stage_net.init_stacked(jax.random.key(0), cfg))
  mean = np.stack(np.meshgrid(np.linspace(80, 150, 17), np.linspace(80, 150, 4)), -1)
  model_io.save_model(path, params, cfg, mean.reshape(-1, 2)[:68])
  return path


def test_evaluating_broken_weights_fails_and_writes_strict_json(tmp_path):
  model = _broken_model(tmp_path / "broken")
  out = tmp_path / "eval.json"
  proc = _start("evaluate", [
      "--flagfile=demo.flags", f"--model={model}", f"--output_json={out}",
      "--synthetic_train_size=8", "--synthetic_test_size=8", "--eval_batch_size=8",
      f"--tfds_dir={tmp_path / 'tfds'}", "--ts=0.01"])
  result = (proc.wait(timeout=400), proc.stdout.read(), proc.stderr.read())
  assert_one_line_error(result, "evaluate", "non-finite", "8 of 8 faces of test")
  doc = _strict_load(out.read_text())
  split = doc["splits"]["test"]
  assert split["nme_interocular"] is None and split["fr_008"] == 1.0
  assert split["nonfinite_faces"] == 8 and split["auc_008"] == 0.0
