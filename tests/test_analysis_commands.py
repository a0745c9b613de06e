"""The analysis commands accept --model=DIR|default; inspect_data draws Figure 5;
experiments.ablation makes its table from the rows' evaluations."""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import config as data_config
from experiments import ablation
from experiments import inspect_data
from musica_jax import model_io

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")


def _small(tmp_path, train=8):
  return ["--flagfile=demo.flags", f"--tfds_dir={tmp_path / 'tfds'}", "--eval_batch_size=8",
          f"--synthetic_train_size={train}", "--synthetic_test_size=8"]


def _run(module, *args):
  return subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=REPO,
                        env=ENV, capture_output=True, text=True, timeout=600)


def _small_data(tmp_path, train=8):
  """The DataConfig of _small (demo.flags: synthetic faces, 68 points, split test)."""
  return data_config.DataConfig(dataset="synthetic_faces", num_points=68, eval_split="test",
                                tfds_dir=str(tmp_path / "tfds"), eval_batch_size=8,
                                synthetic_train_size=train, synthetic_test_size=8)


def test_sweep_and_attention_map_run_the_shipped_model(tmp_path):
  from experiments import sweep_thresholds_lib  # noqa: PLC0415
  small = _small(tmp_path)
  out = tmp_path / "sweep.json"
  sweep_thresholds_lib.run(sweep_thresholds_lib.SweepConfig(
      output_json=str(out), model="default", plot=str(tmp_path / "fig2.png"), draws=3,
      num_ts=20), _small_data(tmp_path))
  data = json.loads(out.read_text())
  assert data["faces"] == 8 and data["workdir"] is None
  assert data["model_path"].endswith("default_model")
  shipped = json.loads((model_io.default_model_path() / model_io.CONFIG_FILE).read_text())
  assert data["model"]["patch_indices"] == shipped["model_config"]["patch_indices"]
  assert data["sweep"]["mean_iterations"][0] == 3.0
  png = tmp_path / "att.png"
  res = _run("attention_map", *small, "--model=default", f"--output={png}")
  assert res.returncode == 0, res.stderr[-3000:]
  att = json.loads(png.with_suffix(".json").read_text())
  assert att["faces"] == 8 and att["model_path"].endswith("default_model") and png.stat().st_size
  # Both --workdir and --model: one line, non-zero exit, no traceback.
  res = _run("attention_map", *small, f"--workdir={tmp_path}", "--model=default",
             f"--output={png}")
  assert res.returncode != 0 and "Traceback" not in res.stderr
  assert "exactly one of --workdir" in res.stderr + res.stdout


def test_figure5_picks_far_faces_and_first_axis_extremes():
  rng = np.random.default_rng(0)
  base = np.stack([np.cos(np.linspace(0, 6, 68)), np.sin(np.linspace(0, 6, 68))], -1) * 50
  shapes = base + rng.normal(0, 0.5, (60, 68, 2))
  # Faces 0-4: a deformation of one landmark group far from the rest (Mahalanobis outliers).
  shapes[:5, 48:68] += rng.normal(0, 6, (5, 20, 2))
  cfg = data_config.DataConfig(gdb_components=10)
  picks = inspect_data.figure5_faces(cfg, shapes, per_row=6, top=20, seed=1)
  score = picks["mahalanobis_score"]
  top20 = set(np.argsort(-score)[:20].tolist())
  assert set(picks["mahalanobis"].tolist()) <= top20 and len(set(picks["mahalanobis"])) == 6
  assert set(range(5)) <= top20
  first = picks["first_axis_score"]
  order = np.argsort(first)
  assert set(picks["first_axis"].tolist()) == set(order[:3].tolist()) | set(order[-3:].tolist())
  other = inspect_data.figure5_faces(cfg, shapes, per_row=6, top=20, seed=2)
  assert set(other["first_axis"].tolist()) == set(picks["first_axis"].tolist())
  with pytest.raises(ValueError, match="more than 20"):
    inspect_data.figure5_faces(cfg, shapes[:15])


def test_inspect_data_draws_figure5(tmp_path):
  png = tmp_path / "fig5.png"
  cfg = dataclasses.replace(_small_data(tmp_path, train=24), balancing="gdb")
  rep = inspect_data.draw_figure5(cfg, str(png))
  assert png.stat().st_size > 10000
  assert len(rep["mahalanobis"]) == len(rep["first_axis"]) == 6


def _row_evaluations(root, nmes: dict, split="common", faces=554, step=300, ratio=1.0):
  """Writes <root>/<row>/<split>.json as experiments.evaluate would for each row's NME."""
  for name, nme in nmes.items():
    d = root / name
    d.mkdir()
    (d / f"{split}.json").write_text(json.dumps({
        "checkpoint_step": step, "mmacs_full_cascade": 27.7,
        "splits": {split: {"faces": faces, "nme_interpupil": nme,
                           "nme_interocular": nme * ratio,
                           "mean_shape_baseline": {"nme_interpupil": 20.0}}}}))


def test_ablation_table_from_the_rows_evaluations(tmp_path):
  rows = [r for r in ablation.ROWS if r[0] in ("baseline", "global_gcn", "mobile")]
  _row_evaluations(tmp_path, {"baseline": 8.0, "global_gcn": 9.0}, step=200, ratio=0.7)
  recs = ablation.collect(rows, str(tmp_path), "/data/300w")
  by = {r["row"]: r for r in recs}
  assert by["global_gcn"]["change_pct"] == pytest.approx(12.5)
  assert by["baseline"]["change_pct"] == 0
  assert "nme_interpupil" not in by["mobile"]
  assert "--global_attention=gcn" in by["global_gcn"]["train_command"]
  assert "--data_dir=/data/300w" in by["global_gcn"]["train_command"]
  assert "--checkpoint=best" in by["global_gcn"]["evaluate_command"]
  for flag in ablation.BUDGET:
    assert flag in by["global_gcn"]["train_command"] and flag in by["mobile"]["train_command"]
  md = ablation.markdown(recs)
  assert "+12.5%" in md and "+12.37%" in md and "(not run)" in md


def test_ablation_table_states_the_noise_level(tmp_path):
  rows = [r for r in ablation.ROWS if r[0] in ("baseline", "baseline_seed1")]
  _row_evaluations(tmp_path, {"baseline": 8.0, "baseline_seed1": 8.4})
  md = ablation.markdown(ablation.collect(rows, str(tmp_path), None))
  assert "lands 5.0% from seed 0" in md
  assert "--seed=1" in md


def test_recipe_table_is_judged_on_val_only(tmp_path):
  rows = [r for r in ablation.RECIPE_ROWS if r[0] in ("baseline", "cosine", "batch64")]
  _row_evaluations(tmp_path, {"baseline": 8.0, "cosine": 7.6}, split="val", faces=202)
  for name in ("baseline", "cosine"):
    (tmp_path / name / "common.json").write_text("not read: the recipe table never looks at "
                                                 "the test set")
  recs = ablation.collect(rows, str(tmp_path), None, "val")
  by = {r["row"]: r for r in recs}
  assert by["cosine"]["change_pct"] == pytest.approx(-5.0)
  assert "--eval_split=val" in by["cosine"]["evaluate_command"]
  assert "--lr_schedule=cosine" in by["cosine"]["train_command"]
  # the batch row keeps the samples: 64 x 150 = 32 x 300, its flags after the budget's
  cmd = by["batch64"]["train_command"]
  assert cmd.index("--batch_size=64") > cmd.index("--batch_size=32")
  md = ablation.recipe_markdown(recs)
  assert "-5.0%" in md and "202 faces" in md and "(not run)" in md and "common" not in md
