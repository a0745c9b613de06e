"""experiments.evaluate on exported models: the shipped default model reproduces its own
evaluation JSON on the real 300W common set, and the side by side with dlib comes from the
same run."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from musica_jax import model_io

REPO = pathlib.Path(__file__).resolve().parents[1]
DLIB_JSON = REPO / "results" / "dlib_300w_common.json"
HAVE_DLIB = (importlib.util.find_spec("dlib") is not None
             and importlib.util.find_spec("face_recognition_models") is not None)


def _evaluate(*args):
  """experiments.evaluate as a program (its flags are absl flags of that program)."""
  return subprocess.run([sys.executable, "-m", "experiments.evaluate", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


@pytest.fixture(scope="module")
def default_model_run(shared_data, tfds_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("eval") / "default.json"
  proc = _evaluate("--flagfile=300w19.flags", "--eval_split=common",   # the flagfile's: val
                   f"--data_dir={shared_data / '300w'}", f"--tfds_dir={tfds_dir}",
                   "--model=default", f"--with_dlib={HAVE_DLIB}",
                   f"--dlib_box_fit_json={DLIB_JSON}", f"--output_json={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text()), out


def test_shipped_model_reproduces_its_evaluation(default_model_run):
  result, out = default_model_run
  got = result["splits"]["common"]
  model = model_io.load_model(model_io.default_model_path())
  meta = model.metadata
  want = meta["evaluation"]["splits"]["common"]     # the f32 checkpoint's evaluation
  assert got["faces"] == want["faces"] == 554
  # bfloat16 storage rounds the weights: NMEs move in the 4th digit (measured 5e-4).
  tol = 1e-3 if model.dtype == "float32" else 5e-3
  for key in ("nme_interpupil", "nme_interocular", "fr_008", "auc_008"):
    assert got[key] == pytest.approx(want[key], abs=tol), key
  assert result["model_name"] == meta["name"]
  assert json.loads(out.read_text())["splits"]["common"]["faces"] == 554
  assert out.with_suffix(".ced.png").stat().st_size > 0


@pytest.mark.skipif(not HAVE_DLIB, reason="dlib / face-recognition-models not installed "
                    "(optional: pip install 'musica-jax[peers]')")
def test_side_by_side_with_dlib_from_the_same_run(default_model_run):
  result, _ = default_model_run
  rows = result["side_by_side"]["common"]["rows"]
  assert [r["method"].split()[0] for r in rows] == ["MuSiCa", "dlib"]
  assert rows[0]["nme_interpupil"] == result["splits"]["common"]["nme_interpupil"]
  assert rows[0]["faces"] == rows[1]["faces"] == 554
  earlier = json.loads(DLIB_JSON.read_text())["rows"][0]   # same box fit -> same dlib numbers
  for key in ("nme_interpupil", "nme_interocular", "fr_008"):
    assert rows[1][key] == pytest.approx(earlier[key], abs=1e-4), key


def test_model_source_errors_name_the_flag(tmp_path):
  both = _evaluate("--flagfile=demo.flags", f"--workdir={tmp_path}", "--model=default",
                   f"--output_json={tmp_path / 'o.json'}")
  assert both.returncode != 0 and "exactly one of --workdir" in both.stderr
  missing = _evaluate("--flagfile=demo.flags", f"--model={tmp_path / 'nowhere'}",
                      f"--output_json={tmp_path / 'o.json'}")
  assert missing.returncode != 0
  assert f"--model={tmp_path / 'nowhere'}" in missing.stderr and "not a directory" in missing.stderr
  assert "shipped model: 'default' or 'musica68'" in missing.stderr
  # --stage_patches reads another schedule of a --model's weights; with a run it would be
  # ignored (the run's config wins), so it is refused.
  run = _evaluate("--flagfile=demo.flags", f"--workdir={tmp_path}", "--stage_patches=1,2",
                  f"--output_json={tmp_path / 'o.json'}")
  assert run.returncode != 0 and "--stage_patches: only with --model" in run.stderr
  assert "Traceback" not in run.stderr, run.stderr


def test_budget_dial_on_the_common_set(shared_data, tfds_dir, tmp_path):
  """--budget runs the fast path with the shipped model's quitting profile: about that
  many mean iterations (the last, partly padded batch may use fewer slots), an NME between
  the full cascade's and that of one iteration."""
  if not model_io.is_model_dir(model_io.DEFAULT_MODEL_DIR):
    pytest.skip("no default model ships with this checkout")
  out = tmp_path / "budget.json"
  proc = _evaluate("--flagfile=300w19.flags", "--eval_split=common",
                   f"--data_dir={shared_data / '300w'}", f"--tfds_dir={tfds_dir}",
                   "--model=default", "--budget=2.0", f"--output_json={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(out.read_text())["splits"]["common"]
  assert 1.9 <= res["mean_iterations"] <= 2.1
  assert res["nme_interocular"] < res["nme_early_exit"] < res["nme_per_iteration"][0]
  bad = _evaluate("--flagfile=300w19.flags", f"--data_dir={shared_data / '300w'}",
                  f"--tfds_dir={tfds_dir}", "--model=default", "--budget=7",
                  f"--output_json={tmp_path / 'x.json'}")
  assert bad.returncode != 0 and "--budget" in bad.stderr and "Traceback" not in bad.stderr
