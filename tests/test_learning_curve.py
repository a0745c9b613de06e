"""experiments.learning_curve: reading a training log and the per-doubling fit."""
import json

import numpy as np
import pytest
from absl import app

from experiments import learning_curve


def _write_log(wd, records, batch_size=32, eval_split="val"):
  wd.mkdir(parents=True, exist_ok=True)
  (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  (wd / "run_config.json").write_text(json.dumps(
      {"data": {"batch_size": batch_size, "eval_split": eval_split}}))


def test_fit_recovers_the_change_per_doubling_after_the_last_decay(tmp_path):
  records = []
  for step in range(100, 3300, 100):
    lr = 1e-3 if step <= 1600 else 1e-4
    records.append({"step": step, "train/nme": 0.05, "train/learning_rate": lr})
    if step % 400 == 0:
      # Before the decay a steep trend, after it -0.25 per doubling from a lower level.
      v = 14.0 - 1.0 * np.log2(step) if step <= 1600 else 6.0 - 0.25 * np.log2(step)
      records.append({"step": step, "eval/nme_interocular": v})
  _write_log(tmp_path / "run", records)
  run = learning_curve.read_run(tmp_path / "run")
  s = learning_curve.summarise(run, "nme_interocular", fit_points=4)
  assert s["eval_split"] == "val" and s["batch_size"] == 32 and s["last_step"] == 3200
  assert s["fit_steps"] == [2000, 2400, 2800, 3200]       # only evaluations after the decay
  assert s["per_doubling"] == pytest.approx(-0.25, abs=1e-9)
  assert s["best_step"] == 3200


def test_a_resumed_step_counts_once_and_the_plot_is_written(tmp_path):
  records = [{"step": 500, "eval/nme_interocular": 9.0},
             {"step": 1000, "eval/nme_interocular": 8.0},
             {"step": 1000, "eval/nme_interocular": 7.0},      # redone after a resume
             {"step": 1000, "train/nme": 0.07, "train/learning_rate": 1e-3}]
  _write_log(tmp_path / "run", records)
  run = learning_curve.read_run(tmp_path / "run")
  assert run["eval"] == [(500, {"nme_interocular": 9.0}), (1000, {"nme_interocular": 7.0})]
  learning_curve.plot({"run": run}, "nme_interocular", tmp_path / "c.png")
  assert (tmp_path / "c.png").stat().st_size > 1000


def test_a_folder_without_a_log_is_a_usage_error(tmp_path):
  with pytest.raises(app.UsageError, match="no metrics.jsonl"):
    learning_curve.read_run(tmp_path)
