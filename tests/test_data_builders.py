"""TFDS builders on the shared real data and on small local folders; inspect_data."""
import dataclasses
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from data_pipelines import config as config_lib
from data_pipelines import datasets
from data_pipelines import input_pipeline
from data_pipelines import readers
from experiments import inspect_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ibug300w_counts_and_values(shared_data, tfds_dir):
  cfg = config_lib.DataConfig(dataset="ibug300w", data_dir=str(shared_data / "300w"),
                              tfds_dir=tfds_dir)
  sizes = input_pipeline.split_sizes(cfg)
  assert sizes["train"] == 2012 and sizes["common"] == 554
  assert sizes["lfpw_trainset"] == 805 and sizes["helen_testset"] == 330
  assert "challenging" not in sizes and "full" not in sizes   # no ibug folder here
  with pytest.raises(ValueError, match="ibug"):
    datasets.load_split(cfg, "challenging")
  data = datasets.load_split(cfg, "common")
  i = list(data.file_ids).index("lfpw/testset/image_0001")
  raw = np.loadtxt(shared_data / "300w" / "lfpw/testset/image_0001.pts", skiprows=3,
                   max_rows=68)
  np.testing.assert_allclose(data.landmarks[i], raw - 1.0, atol=1e-4)   # 1-based -> 0-based
  np.testing.assert_allclose(data.boxes[i], [*data.landmarks[i].min(0), *data.landmarks[i].max(0)])
  rep = inspect_data.inspect(cfg, top_k=20)
  assert rep["splits"]["train"]["faces"] == 2012 and rep["splits"]["common"]["faces"] == 554
  assert rep["splits"]["train"]["skipped"]["count"] == 0
  top = rep["balancing"]["top"]
  assert len(top) == 20 and top[0]["oversampling_vs_median"] > 1.5
  # The validation carve: ~10% of the training faces, whole photos, disjoint from train_fit.
  carve = rep["val_carve"]
  assert carve["overlap"] == 0 and carve["source"] == "train"
  assert sum(carve["faces"].values()) == 2012 and 201 <= carve["faces"]["val"] <= 204
  assert rep["splits"]["val"]["faces"] == carve["faces"]["val"]
  assert set(carve["val_by_folder"]) == {"afw", "helen/trainset", "lfpw/trainset"}
  fit, val = datasets.load_split(cfg, "train_fit"), datasets.load_split(cfg, "val")
  assert not {datasets.photo_id(f) for f in fit.file_ids} & {datasets.photo_id(f)
                                                            for f in val.file_ids}
  # Prepared once: a second prepare reuses the same directory.
  assert str(datasets.prepare(cfg).data_dir) == rep["prepared_at"]


def test_wflw_sample(shared_data, tfds_dir):
  cfg = config_lib.DataConfig(dataset="wflw", num_points=98, eval_split="test",
                              data_dir=str(shared_data / "wflw_sample"), tfds_dir=tfds_dir)
  rep = inspect_data.inspect(dataclasses.replace(cfg, balancing="none"))
  assert rep["splits"]["train"]["faces"] == 1 and rep["splits"]["test"]["faces"] == 3
  blur = rep["splits"]["test_blur"]
  assert blur["faces"] == 0 and blur["skipped"]["by_reason"] == {"missing image": 773}
  assert "error" in blur
  with pytest.raises(readers.DataError, match="empty split 'test_blur'"):
    datasets.load_split(cfg, "test_blur")
  test = datasets.load_split(cfg, "test")
  assert test.landmarks.shape == (3, 98, 2)
  # WFLW boxes come from the annotation, not from the landmarks.
  assert any(np.abs(b - np.r_[l.min(0), l.max(0)]).max() > 2
             for b, l in zip(test.boxes, test.landmarks))
  batch = next(input_pipeline.eval_iterator(cfg, "test"))
  assert batch["mask"].sum() == 3 and batch["landmarks"].shape[1:] == (98, 2)


def _folder(root, n=4, bad_points=None, corrupt=None):
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(n):
    Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(
        os.path.join(root, f"face{i}.jpg"))
    pts = rng.uniform(10, 70, (67 if i == bad_points else 68, 2))
    readers.write_pts(os.path.join(root, f"face{i}.pts"), pts)
  if corrupt is not None:
    with open(os.path.join(root, f"face{corrupt}.jpg"), "wb") as f:
      f.write(b"\xff\xd8 broken")


def test_pts_folder_reprepares_when_source_changes(tmp_path, tfds_dir):
  root = str(tmp_path / "mine")
  _folder(root, 3)
  cfg = config_lib.DataConfig(dataset="pts_folder", data_dir=root, tfds_dir=tfds_dir,
                              train_split="all", eval_split="all")
  assert input_pipeline.split_sizes(cfg) == {"all": 3}
  name = datasets.builder_config(cfg).name
  _folder(root, 4)
  assert datasets.builder_config(cfg).name != name
  assert input_pipeline.split_sizes(cfg) == {"all": 4}


def _run_inspect(*args):
  return subprocess.run([sys.executable, "-m", "experiments.inspect_data", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=120)


def test_inspect_data_fails_on_bad_items_or_counts_them(tmp_path):
  root = str(tmp_path / "bad")
  _folder(root, 4, bad_points=1, corrupt=2)
  out_json = str(tmp_path / "r.json")
  common = ["--dataset=pts_folder", f"--data_dir={root}", f"--tfds_dir={tmp_path / 't'}",
            "--balancing=none", f"--output_json={out_json}"]
  res = _run_inspect(*common)
  assert res.returncode != 0
  assert "face1.pts" in res.stderr or "face2.jpg" in res.stderr, res.stderr[-2000:]
  # Counting and skipping is the library's (in-process); the failure above is the CLI's.
  rep = inspect_data.inspect(config_lib.DataConfig(
      dataset="pts_folder", data_dir=root, tfds_dir=str(tmp_path / "t"), balancing="none",
      skip_bad=True, train_split="all", eval_split="all", val_source="all"))
  assert rep["splits"]["all"]["faces"] == 2
  assert rep["splits"]["all"]["skipped"]["by_reason"] == {"wrong point count": 1,
                                                          "corrupt image": 1}



_SPLIT_SIZES = """
import sys
from data_pipelines import config as config_lib
from data_pipelines import input_pipeline
cfg = config_lib.DataConfig(dataset="pts_folder", data_dir=sys.argv[1], tfds_dir=sys.argv[2],
                            train_split="all", eval_split="all")
print("SIZES", input_pipeline.split_sizes(cfg), flush=True)
"""


def test_a_run_waits_while_another_process_prepares_the_same_data(tmp_path):
  # Two runs started together used to race on the prepared folder's rename ("Directory not
  # empty"); now one prepares while the others wait on a lock, then reuse its data. Here
  # the test holds the lock and prepares the data as the preparing process would.
  import fcntl  # noqa: PLC0415

  import tensorflow_datasets as tfds  # noqa: PLC0415

  from data_pipelines import tfds_builders  # noqa: PLC0415
  root, tfds_dir = str(tmp_path / "mine"), str(tmp_path / "tfds")
  _folder(root, 3)
  cfg = config_lib.DataConfig(dataset="pts_folder", data_dir=root, tfds_dir=tfds_dir,
                              train_split="all", eval_split="all")
  lock = os.path.join(tfds_dir, "musica_locks",
                      f"pts_folder_{datasets.builder_config(cfg).name}.lock")
  os.makedirs(os.path.dirname(lock))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  with open(lock, "a") as held:
    fcntl.flock(held, fcntl.LOCK_EX)
    proc = subprocess.Popen([sys.executable, "-c", _SPLIT_SIZES, root, tfds_dir], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
      first = proc.stdout.readline()
      assert "waiting for another process preparing the data" in first, first
      assert proc.poll() is None       # blocked while the lock is held
      assert not os.path.isdir(os.path.join(tfds_dir, "pts_folder"))
      # The lock's holder prepares the data meanwhile, as a first run would: the waiting
      # run must then read the prepared splits (a builder it made before waiting had none).
      tfds_builders.BUILDERS["pts_folder"](
          config=datasets.builder_config(cfg), data_dir=tfds_dir).download_and_prepare(
              download_config=tfds.download.DownloadConfig(manual_dir=root))
    finally:
      fcntl.flock(held, fcntl.LOCK_UN)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0 and "SIZES {'all': 3}" in out, out


def test_a_read_only_data_folder_prepares_without_a_lock(tmp_path, monkeypatch):
  # A cluster job reading prepared data from a read-only folder cannot create the lock
  # file: the preparation (a reuse there) goes on without it.
  from data_pipelines import tfds_builders  # noqa: PLC0415

  def refuse(*args, **kwargs):
    raise PermissionError(13, "Read-only file system")
  monkeypatch.setattr(tfds_builders.os, "makedirs", refuse)
  ran = []
  with tfds_builders._preparation_lock(str(tmp_path / "ro" / "musica_locks" / "x")):
    ran.append(True)
  assert ran == [True] and not (tmp_path / "ro").exists()


def test_a_300w_folder_without_a_splits_folders_fails_in_one_line(tmp_path, tfds_dir, capsys):
  # A data folder holding afw only: the training split names the folders it lacks, and an
  # entry point reports it as one line naming them (it used to dump a traceback).
  from experiments import common  # noqa: PLC0415
  root = tmp_path / "300w"
  _folder(str(root / "afw"), 2)
  cfg = config_lib.DataConfig(dataset="ibug300w", data_dir=str(root), tfds_dir=tfds_dir,
                              train_split="train", eval_split="train", val_source="train")
  with pytest.raises(readers.SplitError, match=r"lfpw/trainset.*helen/trainset"):
    datasets.split_spec(cfg, "train")
  assert datasets.split_spec(cfg, "afw") == ("afw", None)
  with pytest.raises(SystemExit) as e:
    common._guarded(lambda argv: datasets.split_spec(cfg, "train"))([])
  assert e.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "lfpw/trainset" in err[0] and "--data_dir" in err[0], err
