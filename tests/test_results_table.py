"""experiments.results_table: rows from evaluation JSONs, training time from metrics.jsonl."""
import json

from absl import app
import pytest

from experiments import results_table


def _eval_json(path, patches, ip, workdir=None, dlib=None):
  split = {"faces": 554, "nme_interpupil": ip, "nme_interocular": ip * 0.7, "fr_008": 0.01,
           "auc_008": 0.5, "nme_interpupil_per_iteration": [ip + 2, ip + 1, ip]}
  result = {"model": {"num_landmarks": 68, "patch_indices": list(range(patches))},
            "checkpoint_step": 300, "mmacs_full_cascade": 27.7, "workdir": workdir,
            "splits": {"common": split}}
  if dlib is not None:
    row = {"method": "dlib ERT 68", "faces": 554, "nme_interpupil": dlib,
           "nme_interocular": 3.6, "fr_008": 0.05, "auc_008": 0.63}
    result["side_by_side"] = {"common": {"rows": [dict(split, method="MuSiCa"), row]}}
  path.write_text(json.dumps(result))
  return str(path)


def test_training_time_sums_logged_intervals_up_to_the_step(tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  (wd / "run_config.json").write_text(json.dumps({"data": {"batch_size": 64,
                                                             "eval_split": "val"}}))
  logs = [{"step": 100, "train/steps_per_s": 0.5, "train/interval_s": 200.0},
          {"step": 200, "train/steps_per_s": 1.0, "train/interval_s": 100.0},
          {"step": 300, "train/steps_per_s": 2.0, "train/interval_s": 50.0},
          {"step": 400, "train/steps_per_s": 1.0, "train/interval_s": 100.0}]
  (wd / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in logs))
  got = results_table.training_budget(str(wd), 300)
  assert got["batch_size"] == 64 and got["chosen_on"] == "val"
  assert got["train_hours"] == pytest.approx((200 + 100 + 50) / 3600)
  assert results_table.training_budget(str(tmp_path / "gone"), 300) == {}


def test_running_average_logs_with_a_resume():
  # Process 1: steps 0..300 at a running average; killed after 300, resumed from the
  # checkpoint at 200: process 2 redoes 300 and goes on to 400.
  logs = [{"step": 100, "train/steps_per_s": 0.5},     # t = 200 s
          {"step": 200, "train/steps_per_s": 1.0},     # t = 200 s (fast 2nd interval: 0 s)
          {"step": 300, "train/steps_per_s": 1.0},     # t = 300 s
          {"step": 300, "train/steps_per_s": 0.5},     # new process from 200: t = 200 s
          {"step": 400, "train/steps_per_s": 1.0}]     # t = 200 s
  # Paid: 200 + 0 + 100 (process 1) + the redone 300 not again + 400: 200 - 200 = 0.
  assert results_table._seconds(logs) == pytest.approx(300.0)
  logs[-1]["train/steps_per_s"] = 0.5                  # t = 400 s -> the last step took 200 s
  assert results_table._seconds(logs) == pytest.approx(500.0)


def test_rows_sorted_with_dlib_once_and_paper_column(tmp_path):
  a = _eval_json(tmp_path / "a.json", 19, 5.2, dlib=5.0)
  b = _eval_json(tmp_path / "b.json", 68, 4.8, dlib=5.0)
  md, rows = results_table.table([a, b])
  assert [r["nme_interpupil"] for r in rows] == [4.8, 5.0, 5.2]
  assert sum(bool(r.get("is_dlib")) for r in rows) == 1
  assert rows[0]["paper_interpupil"] == 4.63 and rows[2]["paper_interpupil"] == 5.22
  assert "4.80 (4.63)" in md and md.count("\n") == 2 + 3
  assert md.count("| not recorded |") == 2        # neither JSON nor workdir says


def test_missing_split_is_a_clear_error(tmp_path):
  a = _eval_json(tmp_path / "a.json", 19, 5.2)
  with pytest.raises(app.UsageError, match="no split 'full'"):
    results_table.table([a], "full")


def test_a_weight_averaged_model_reports_each_ingredients_budget(tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  (wd / "run_config.json").write_text(json.dumps({"data": {"batch_size": 64,
                                                             "eval_split": "val"}}))
  (wd / "metrics.jsonl").write_text("\n".join(json.dumps(
      {"step": s, "train/steps_per_s": 1.0, "train/interval_s": 360.0})
      for s in (100, 200, 300)))
  path = tmp_path / "soup.json"
  _eval_json(path, 34, 4.6)
  result = json.loads(path.read_text())
  result.update(checkpoint_step=None, workdir=None, averaged_from=[
      {"model_name": "a", "weight": 0.5, "checkpoint_step": 200, "trained_in": str(wd),
       "checkpoint_chosen_on": "val"},
      {"model_name": "b", "weight": 0.5, "checkpoint_step": 300,
       "trained_in": str(tmp_path / "gone"), "checkpoint_chosen_on": "val"}])
  path.write_text(json.dumps(result))
  md, rows = results_table.table([str(path)])
  assert ("weight average of 0.5 x (200 steps x 64 faces, 0.2 h) + 0.5 x (step 300)" in md)
  assert rows[0]["chosen_on"] == "val"
