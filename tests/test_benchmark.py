"""Smoke test of experiments/benchmark.py on a tiny model: JSON keys, no TensorFlow."""
import json
import subprocess
import sys
import types

import numpy as np
import pytest

CODE = """
import runpy, sys
sys.argv = ["benchmark", "--variants=tiny", "--batch_sizes=1,2", "--repeats=1",
            "--latency_samples=2", "--train_batch=2", "--train_repeats=1",
            "--early_exit_variants=tiny", "--early_exit_batch=4", "--bf16=false",
            "--compute_dtypes=float32,bfloat16", "--peak_size=256",
            "--output_json=" + sys.argv[1]]
try:
  runpy.run_module("experiments.benchmark", run_name="__main__")
except SystemExit as e:
  assert not e.code, e.code
assert "tensorflow" not in sys.modules, "the benchmark imported tensorflow"
# The shared flags (experiments.common, config_flags) read data_pipelines' TF-free config;
# nothing of the input pipeline may load.
data = {m for m in sys.modules if m.startswith("data_pipelines")}
assert data <= {"data_pipelines", "data_pipelines.config"}, data
print("ok")
"""


@pytest.mark.slow   # ~37 s on 2 cores; test_entry_points parses its flags in CI
def test_benchmark_smoke(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run([sys.executable, "-c", CODE, str(out)], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ok" in proc.stdout
  res = json.loads(out.read_text())
  assert {"device", "matmul_peak_gflops", "variants", "early_exit", "weights"} <= set(res)
  assert res["device"]["name"] and res["matmul_peak_gflops"] > 0
  assert set(res["matmul_peak_gflops_by_dtype"]) == {"float32", "bfloat16"}
  row = res["variants"]["tiny"]
  assert {"mmacs", "inference", "batch1_latency", "train_step"} <= set(row)
  assert set(row["inference"]) == {"float32", "bfloat16"}
  for by_batch in row["inference"].values():
    assert set(by_batch) == {"1", "2"}
    for r in by_batch.values():
      assert r["faces_per_s"] > 0 and 0 < r["fraction_of_matmul_peak"]
  lat = row["batch1_latency"]
  assert {"run_cascade_jit", "selective_f32"} <= set(lat)
  assert lat["selective_f32"]["p90_ms"] >= lat["selective_f32"]["p50_ms"] > 0
  train = row["train_step"]["2"]
  assert train["float32"]["samples_per_s"] > 0 and train["bfloat16"]["samples_per_s"] > 0
  assert train["bfloat16_speedup"] == pytest.approx(
      train["bfloat16"]["samples_per_s"] / train["float32"]["samples_per_s"])
  ee = res["early_exit"]["tiny"]
  assert "synthetic" in ee["weights"]
  assert ee["selective_matches_masked"] is True
  assert len(ee["capacities"]) == 2 and ee["batched"]["budget_speedup"] > 0
  assert 1.0 <= ee["mean_iterations"] <= 3.0
  assert ee["batched"]["speedup"] > 0 and ee["batch1"]["speedup"] > 0


def test_dial_through_predictor_picks_the_budget_and_times_both_paths_per_face():
  """The batch-1 comparison runs both paths on each face back to back (so a drift of the
  machine's speed cannot favour one path), with the smallest budget within 2% NME."""
  from experiments import dial_benchmark_lib as dial
  calls = []

  class FakePredictor:
    def predict(self, photos, boxes, budget=None):
      calls.append((len(photos) if isinstance(photos, list) else 1, budget))
      return np.zeros(1)

    def stream(self, budget=None):          # face by face: a stream keeps the budget
      return types.SimpleNamespace(
          predict=lambda photos, boxes: self.predict(photos, boxes, budget=budget))

  rows = [{"working_point": f"budget {b}", "budget": b,
           "batch4": {"nme_change_vs_full_pct": c}, "batch1": {"nme_change_vs_full_pct": c1}}
          for b, c, c1 in ((2.9, 0.5, 1.0), (2.5, 1.9, 2.5), (2.0, 6.0, 9.0))]
  faces = dial._Faces(photos=[np.zeros((4, 4, 3))] * 4, boxes=[None] * 4, crops=None, gt=None)
  # n1 = all the faces (the default): the batch-1 row must still call face by face.
  out = dial._through_predictor(FakePredictor(), faces, rows, b=4, n1=4, rounds=2)
  assert out["batch4"]["budget"] == 2.5 and out["batch1"]["budget"] == 2.9
  singles = [c for c in calls if c[0] == 1]
  assert len(singles) == 4 * 2 * 2                     # faces x rounds x paths
  # Face by face: each face's calls come together, both paths in every round.
  for i in range(4):
    face = singles[4 * i:4 * i + 4]
    assert sorted(b is None for _, b in face) == [False, False, True, True]
  assert all(v["speedup"] > 0 for v in out.values())


def test_dial_budgets_beyond_the_models_iterations_are_one_line_errors(monkeypatch):
  """A 2-iteration model (the phone model) refuses a budget or a Ts budget above 2 by
  naming the flag, before any face is read."""
  from absl import app
  from experiments import dial_benchmark_lib as dial
  pred = types.SimpleNamespace(model_config=types.SimpleNamespace(num_stages=2),
                               quit_info={"design": "test"})
  monkeypatch.setattr(dial, "_load", lambda model, batch: pred)
  data_cfg = types.SimpleNamespace(eval_batch_size=4)
  with pytest.raises(app.UsageError, match=r"--ts_for_budgets=2.5: outside 1 to the model's 2"):
    dial.run(dial.DialConfig(output_json="x.json", budgets=(2.0, 1.5)), data_cfg)
  with pytest.raises(app.UsageError, match=r"--budgets=2.75: outside"):
    dial.run(dial.DialConfig(output_json="x.json", budgets=(2.75, 1.5), ts_for_budgets=()),
             data_cfg)
