"""Reliability: nothing lost, nothing wrong passed off as right, one line per bad input.

The SIGKILL resume tests live in tests/test_train.py. Here: NaN-aware metrics and strict
JSON, one-line errors for bad flags and data, the divergence guard, the workdir lock,
damaged checkpoints, predictor input validation and a full disk.
"""
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from experiments import common
from experiments import eval_lib
from musica_jax import atomic_io
from musica_jax import checkpoints
from musica_jax import config as config_lib
from musica_jax import images as images_lib
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


# ---------------------------------------------------------------------------------------
# 6. One line for every usage or data error; a failed start leaves no workdir behind.


def _pts_folder(root: pathlib.Path, faces: int = 6, bad: bool = True) -> pathlib.Path:
  """Synthetic faces as .png + .pts; with bad: a truncated .pts and a symlink loop."""
  from data_pipelines import readers  # noqa: PLC0415
  from data_pipelines import synthetic_faces  # noqa: PLC0415
  root.mkdir(parents=True)
  for i in range(faces):
    f = synthetic_faces.make_face(5, i, 68)
    (root / f"face{i}.png").write_bytes(synthetic_faces.encode_png(f.image))
    readers.write_pts(str(root / f"face{i}.pts"), f.landmarks)
  if bad:
    text = (root / "face0.pts").read_text()
    (root / "face0.pts").write_text(text[:len(text) // 2])        # truncated
    os.symlink(root / "loop_b.png", root / "loop_a.png")          # ELOOP on any stat
    os.symlink(root / "loop_a.png", root / "loop_b.png")
  return root


TINY = ["--flagfile=demo.flags", "--synthetic_train_size=16", "--synthetic_test_size=8",
        "--batch_size=8", "--eval_batch_size=8", "--hidden_size=16", "--log_every=1",
        "--eval_every=-1", "--checkpoint_every=1"]


@pytest.mark.slow     # ten programs start (~2.5 min on 2 loaded cores)
def test_one_line_errors_for_bad_flags_and_data(tmp_path):
  bad = _pts_folder(tmp_path / "bad")
  (tmp_path / "empty").mkdir()
  done = tmp_path / "done"                       # a workdir whose newest checkpoint is 6
  (done / "checkpoints" / "6").mkdir(parents=True)
  (done / "keep.txt").write_text("mine")
  tfds = f"--tfds_dir={tmp_path / 'tfds'}"
  pts = ["--dataset=pts_folder", "--num_points=68", "--hidden_size=16", "--steps=2", tfds]
  w = lambda name: f"--workdir={tmp_path / name}"
  cases = {
      "ts_nan": ("evaluate", ["--flagfile=demo.flags", "--model=default", "--ts=nan",
                              f"--output_json={tmp_path / 'e.json'}"]),
      "checkpoint_every": ("train", [*TINY, w("w1"), "--checkpoint_every=0"]),
      "log_every": ("train", [*TINY, w("w2"), "--log_every=0"]),
      "learning_rate": ("train", [*TINY, w("w3"), "--learning_rate=-1"]),
      "steps_text": ("train", [*TINY, w("w4"), "--steps=abc"]),
      "empty_data_dir": ("train", [*pts, w("w5"), f"--data_dir={tmp_path / 'empty'}"]),
      "bad_pts": ("train", [*pts, w("w6"), f"--data_dir={bad}"]),
      "steps_below_checkpoint": ("train", [*TINY, f"--workdir={done}", "--steps=2"]),
      "max_batch": ("predict", ["--max_batch=3", f"--image={bad / 'face1.png'}",
                                "--box=10,10,100,100"]),
      "skip_bad_with_a_symlink_loop": ("inspect_data", [
          "--dataset=pts_folder", "--num_points=68", f"--data_dir={bad}", "--skip_bad",
          tfds, f"--output_json={tmp_path / 'inspect.json'}"]),
  }
  r = _run_all(cases)
  assert_one_line_error(r["ts_nan"], "evaluate", "--ts=nan")
  assert_one_line_error(r["checkpoint_every"], "train", "--checkpoint_every=0")
  assert_one_line_error(r["log_every"], "train", "--log_every=0")
  assert_one_line_error(r["learning_rate"], "train", "--learning_rate=-1")
  assert_one_line_error(r["steps_text"], "train", "--steps")
  assert_one_line_error(r["empty_data_dir"], "train", str(tmp_path / "empty"), "empty")
  assert_one_line_error(r["bad_pts"], "train", str(bad / "face0.pts"), "--skip_bad")
  assert_one_line_error(r["steps_below_checkpoint"], "train", "--steps=2", "step 6")
  assert_one_line_error(r["max_batch"], "predict", "--max_batch=3")
  rc, _, se = r["skip_bad_with_a_symlink_loop"]
  assert rc == 0, se[-2000:]
  skipped = _strict_load((tmp_path / "inspect.json").read_text())["splits"]["all"]["skipped"]
  assert skipped["count"] == 3, skipped          # the truncated .pts and both loop links
  for name in ("w1", "w2", "w3", "w4", "w5", "w6"):  # a failed start leaves no workdir
    assert not (tmp_path / name).exists(), name
  assert (done / "keep.txt").read_text() == "mine" and (done / "checkpoints" / "6").is_dir()


def test_verbose_switch_shows_the_traceback(tmp_path):
  proc = _start("train", [*TINY, f"--workdir={tmp_path / 'w'}", "--learning_rate=nan"],
                env={common.VERBOSE_ENV: "1"})
  _, se = proc.communicate(timeout=300)
  assert proc.returncode == 1
  assert "Traceback" in se and "train: error: --learning_rate=nan" in se


# ---------------------------------------------------------------------------------------
# 5. Divergence guard (+ the skip count of --skip_bad in train).


def test_divergence_guard_rule():
  rng = np.random.default_rng(0)
  healthy = training.DivergenceGuard(10.0)
  loss = 1.2 * np.exp(-np.arange(3000) / 500) + 0.05
  loss = loss * rng.lognormal(0, 0.5, loss.shape)          # noisy batches, 10x decay
  assert not any(healthy.update(s, float(l)) for s, l in enumerate(loss, 1))
  blown = training.DivergenceGuard(10.0)
  fired = [s for s, l in enumerate([1.1, 1.0, 0.9, 2e6, 3e6, 2e6], 1) if blown.update(s, l)]
  assert fired[0] == 4 and blown.diverged_at == 4 and "diverged at step 4" in blown.message()
  off = training.DivergenceGuard(0.0)
  assert not any(off.update(s, l) for s, l in enumerate([1.0, 1e9, 1e12], 1))
  with pytest.raises(ValueError):
    training.DivergenceGuard(0.5)


@pytest.mark.slow     # data preparation and a few training steps (~1 min)
def test_a_diverging_run_stops_without_saving_and_reports_its_skips(tmp_path):
  data = _pts_folder(tmp_path / "faces", faces=8)
  workdir = tmp_path / "w"
  proc = _start("train", ["--dataset=pts_folder", "--num_points=68", f"--data_dir={data}",
                          "--skip_bad", f"--tfds_dir={tmp_path / 'tfds'}", "--hidden_size=16",
                          "--batch_size=4", "--steps=40", "--log_every=20", "--eval_every=-1",
                          "--checkpoint_every=1", "--learning_rate=1e6",
                          f"--workdir={workdir}"])
  so, se = proc.communicate(timeout=400)
  line = assert_one_line_error((proc.returncode, so, se), "train", "diverged",
                               "--divergence_factor")
  fired = int(line.split("diverged at step ")[1].split(":")[0])
  assert fired < 10, line
  saved = checkpoints.Checkpoints(str(workdir), async_save=False).all_steps()
  assert saved and max(saved) < fired, (saved, fired)
  assert "data: skipped 3 bad item(s)" in so, so[-2000:]


# ---------------------------------------------------------------------------------------
# 1. One run per workdir.

_HOLDER = textwrap.dedent("""
    import sys, time
    from musica_jax import checkpoints
    lock = checkpoints.WorkdirLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_second_run_on_a_workdir_is_refused_and_a_stale_lock_taken_over(tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)], cwd=REPO, env=ENV,
                            text=True, stdout=subprocess.PIPE)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(checkpoints.WorkdirInUseError, match=f"pid {holder.pid} "):
      checkpoints.WorkdirLock(str(workdir)).acquire()
    proc = _start("train", [*TINY, f"--workdir={workdir}", "--steps=2"])
    so, se = proc.communicate(timeout=300)
    assert_one_line_error((proc.returncode, so, se), "train", "in use", f"pid {holder.pid} ")
    assert sorted(p.name for p in workdir.iterdir()) == [checkpoints.LOCK_FILE]  # untouched
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  lock = checkpoints.WorkdirLock(str(workdir))
  note = lock.acquire()                                  # the holder died holding it
  assert note and f"pid {holder.pid} " in note and "stale" in note
  lock.release()
  again = checkpoints.WorkdirLock(str(workdir))
  assert again.acquire() is None                         # a clean release leaves no note
  again.release()


# ---------------------------------------------------------------------------------------
# 2. Damaged checkpoints: restore walks back, evaluate names the damaged step.


def _flip_bytes(path: pathlib.Path):
  data = bytearray(path.read_bytes())
  mid = len(data) // 2
  data[mid:mid + 16] = bytes(255 - b for b in data[mid:mid + 16])
  path.write_bytes(bytes(data))


def _largest_file(folder: pathlib.Path) -> pathlib.Path:
  return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


DAMAGES = {
    "flipped_bytes": lambda d: _flip_bytes(_largest_file(d)),
    "truncated_data": lambda d: os.truncate(_largest_file(d), _largest_file(d).stat().st_size // 3),
    "missing_metadata": lambda d: (d / "default" / "_METADATA").unlink(),
    "emptied_step": lambda d: [p.unlink() for p in sorted(d.rglob("*"), reverse=True)
                               if p.is_file()],
    # Issue #27: an emptied step folder, or one without its item folder, made orbax's one
    # manager refuse every older, intact step too ("Must provide `args` of type Composite").
    "emptied_folder": lambda d: (shutil.rmtree(d), d.mkdir()),
    "no_item_folder": lambda d: shutil.rmtree(d / "default"),
}


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, make_workdir):
  workdir = tmp_path_factory.mktemp("ckpt") / "w"
  cfg, tcfg = make_workdir(workdir)
  return workdir, cfg, tcfg


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_restore_walks_back_over_a_damaged_checkpoint(checkpointed, tmp_path, damage):
  import shutil  # noqa: PLC0415
  source, cfg, tcfg = checkpointed
  workdir = tmp_path / "w"
  shutil.copytree(source, workdir)
  DAMAGES[damage](workdir / "checkpoints" / "6")
  template = training.create_train_state(cfg, tcfg)
  ck = checkpoints.Checkpoints(str(workdir), async_save=False)
  skipped = []
  state = ck.restore(template, on_skip=lambda s, why: skipped.append((s, why)))
  assert int(state.step) == 4 and [s for s, _ in skipped] == [6], skipped
  with pytest.raises(checkpoints.DamagedCheckpointError, match="step 6"):
    ck.restore(template, 6)
  assert int(ck.restore(template, 2).step) == 2
  ck.close()


def test_flipped_bytes_are_caught_by_the_checksum_alone(checkpointed, tmp_path):
  """Orbax reads a checkpoint with flipped data bytes without complaint; the content
  checksum written at save time is what refuses it."""
  import shutil  # noqa: PLC0415
  source, cfg, tcfg = checkpointed
  workdir = tmp_path / "w"
  shutil.copytree(source, workdir)
  _flip_bytes(_largest_file(workdir / "checkpoints" / "6"))
  template = training.create_train_state(cfg, tcfg)
  ck = checkpoints.Checkpoints(str(workdir), async_save=False)
  try:
    unchecked = ck._restore_step(template, 6)        # what restore read before checksums
  except Exception:  # noqa: BLE001  (this orbax caught it itself: the walk-back test covers it)
    unchecked = None
  if unchecked is not None:
    assert checkpoints.state_digest(unchecked) != ck.expected_digest(6)
  with pytest.raises(checkpoints.DamagedCheckpointError):
    ck.restore(template, 6)
  ck.close()


def test_evaluate_names_the_damaged_step_and_walks_back_for_latest(checkpointed, tmp_path):
  import shutil  # noqa: PLC0415
  source, _, _ = checkpointed
  workdir = tmp_path / "w"
  shutil.copytree(source, workdir)
  DAMAGES["truncated_data"](workdir / "checkpoints" / "6")
  common_args = ["--flagfile=demo.flags", f"--workdir={workdir}", "--synthetic_train_size=8",
                 "--synthetic_test_size=8", "--eval_batch_size=8",
                 f"--tfds_dir={tmp_path / 'tfds'}"]
  r = _run_all({
      "step6": ("evaluate", [*common_args, "--checkpoint=6",
                             f"--output_json={tmp_path / 'a.json'}"]),
      "latest": ("evaluate", [*common_args, f"--output_json={tmp_path / 'b.json'}"])})
  assert_one_line_error(r["step6"], "evaluate", "step 6", "damaged")
  rc, so, se = r["latest"]
  assert rc == 0, se[-3000:]
  assert "Traceback" not in se and "checkpoint step 6" in se and "damaged" in se
  assert _strict_load((tmp_path / "b.json").read_text())["checkpoint_step"] == 4


@pytest.mark.slow     # a short training run (~1 min)
@pytest.mark.parametrize("damage", ["missing_metadata", "emptied_folder"])
def test_training_resumes_from_the_newest_intact_checkpoint(checkpointed, tmp_path,
                                                            parse_flags, capsys, damage):
  import shutil  # noqa: PLC0415
  from experiments import train  # noqa: PLC0415
  from experiments import train_lib  # noqa: PLC0415
  source, cfg, tcfg = checkpointed
  workdir = tmp_path / "w"
  shutil.copytree(source, workdir)
  DAMAGES[damage](workdir / "checkpoints" / "6")
  parse_flags(*TINY, f"--workdir={workdir}", "--steps=7", f"--tfds_dir={tmp_path / 'tfds'}")
  train_lib.train_and_evaluate(train.config_from_flags(), str(workdir))
  so = capsys.readouterr().out
  assert "warning: checkpoint step 6 is damaged" in so and "resumed from checkpoint at step 4" in so
  assert [p.name.split("-")[0] for p in (workdir / "damaged_checkpoints").iterdir()] == ["6"]
  ck = checkpoints.Checkpoints(str(workdir), async_save=False)
  assert {6, 7} <= set(ck.all_steps())       # step 6 saved again, verified on restore
  assert int(ck.restore(training.create_train_state(cfg, tcfg)).step) == 7
  ck.close()


# ---------------------------------------------------------------------------------------
# 4. Predictor input validation, a default Tf; 7. the model checksum covers model.json.


def test_sixteen_bit_greyscale_is_decoded_not_clipped(tmp_path):
  from PIL import Image  # noqa: PLC0415
  grey = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
  Image.fromarray(grey).save(tmp_path / "g16.png")
  assert Image.open(tmp_path / "g16.png").mode.startswith("I")
  rgb = images_lib.read_image(tmp_path / "g16.png")
  assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
  np.testing.assert_array_equal(rgb[..., 0], np.round(grey / 257.0).astype(np.uint8))
  assert 120 < rgb.mean() < 135          # was ~254: PIL's convert("RGB") clips to white
  Image.fromarray(np.zeros((8, 8), np.float32), mode="F").save(tmp_path / "f.tiff")
  with pytest.raises(ValueError, match="unknown value range"):
    images_lib.read_image(tmp_path / "f.tiff")


@pytest.mark.parametrize("image_shape, box, message", [
    ((1, 1, 3), (0, 0, 1, 1), "pixels"),                       # a 1x1 image
    ((480, 640, 3), (-1e9, -1e9, 1e9, 1e9), "outside"),        # centre inside, box huge
    ((480, 640, 3), (300, 200, 310, 212), "pixels"),           # an 11-pixel face
    ((480, 640, 3), (600, 440, 900, 740), "outside"),          # mostly off the photo
])
def test_predictor_refuses_boxes_it_cannot_answer(image_shape, box, message):
  with pytest.raises(ValueError, match=message):
    images_lib.check_box_in_image(np.asarray(box, np.float64), image_shape)


def test_plausible_boxes_pass():
  for box in [(100, 80, 300, 300), (-30, -20, 150, 170), (560, 400, 680, 520)]:
    images_lib.check_box_in_image(np.asarray(box, np.float64), (480, 640, 3))


def _tiny_model(path):
  cfg = config_lib.for_scheme(schemes.get_scheme(68), 19, hidden_size=16)
  params = stage_net.init_stacked(jax.random.key(0), cfg)
  bias = np.array(params["head"]["bias"])
  bias[..., -1] += 0.5                                  # an estimated error of ~0.5
  params["head"]["bias"] = bias
  from data_pipelines import synthetic_faces  # noqa: PLC0415
  face = synthetic_faces.make_face(3, 0, 68)
  model_io.save_model(path, params, cfg, np.full((68, 2), 114.0) + np.random.default_rng(0)
                      .normal(0, 20, (68, 2)))
  return face


def test_default_t_fail_flags_faces_and_the_model_checksum_covers_model_json(tmp_path):
  from musica_jax import predictor  # noqa: PLC0415
  face = _tiny_model(tmp_path / "m")
  box = [float(face.landmarks[:, 0].min()), float(face.landmarks[:, 1].min()),
         float(face.landmarks[:, 0].max()), float(face.landmarks[:, 1].max())]
  assert predictor.Predictor.from_model_dir(tmp_path / "m").default_t_fail == np.inf
  model_io.set_default_t_fail(tmp_path / "m", 0.1, {"rule": "test"})
  p = predictor.Predictor.from_model_dir(tmp_path / "m", max_batch=1)
  assert p.default_t_fail == 0.1
  out = p.predict(face.image, box)
  assert out.estimated_error[0] > 0.1 and not out.valid.any()   # the default Tf applies
  assert p.predict(face.image, box, t_fail=1.0).valid.all()         # an explicit one wins
  doc = json.loads((tmp_path / "m" / model_io.CONFIG_FILE).read_text())
  shutil.copytree(tmp_path / "m", tmp_path / "old")   # a model exported before the rename
  old = {k: v for k, v in doc.items() if k != "model_sha256"}
  old["default_tf"] = old.pop("default_t_fail")
  model_io._write_model_json(tmp_path / "old", old)
  assert model_io.load_model(tmp_path / "old").default_t_fail == 0.1
  doc["model_config"]["levels"] = [0, 0, 0]                  # edited outside the params
  (tmp_path / "m" / model_io.CONFIG_FILE).write_text(json.dumps(doc))
  with pytest.raises(ValueError, match="model_sha256"):
    model_io.load_model(tmp_path / "m")


def test_the_shipped_model_has_a_default_t_fail_chosen_on_validation():
  m = model_io.load_model(model_io.default_model_path())
  doc = json.loads((pathlib.Path(m.path) / model_io.CONFIG_FILE).read_text())
  assert m.default_t_fail is not None and 0 < m.default_t_fail < 1
  assert doc["default_t_fail_chosen"]["split"] == "val" and "model_sha256" in doc


# ---------------------------------------------------------------------------------------
# 7. A full disk (a small tmpfs; skipped where mounting is not allowed).


@pytest.fixture
def small_disk(tmp_path):
  mount = tmp_path / "small"
  mount.mkdir()
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                     capture_output=True, text=True)
  if r.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
  try:
    yield mount
  finally:
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_leaves_no_partial_result_files(small_disk):
  (small_disk / "filler").write_bytes(b"\0" * (2 * 1024 * 1024 - 8192))
  with pytest.raises(OSError) as e:
    atomic_io.write_text(small_disk / "run_config.json", "x" * 200_000)
  assert e.value.errno == 28
  assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]   # no .run_config.json.*


@pytest.mark.slow     # a short training run (~1 min)
def test_training_onto_a_full_disk_ends_with_one_error_line(small_disk, tmp_path):
  proc = _start("train", [*TINY, "--steps=3", f"--tfds_dir={tmp_path / 'tfds'}",
                          f"--workdir={small_disk / 'w'}"])
  so, se = proc.communicate(timeout=400)
  assert proc.returncode == 1, se[-3000:]
  errors = [l for l in se.splitlines() if l.startswith("train: error:")]
  assert len(errors) == 1 and "no space left on device" in errors[0], se[-3000:]
  assert se.rstrip().splitlines()[-1] == errors[0]        # the last word is ours
  assert not [p for p in (small_disk / "w").iterdir() if p.name.startswith(".run_config")]


# ---------------------------------------------------------------------------------------
# 8. Issue #27: real users' files and crashes.

SMALL = config_lib.ModelConfig(num_landmarks=10, patch_indices=(0, 2, 4, 6, 8, 9),
                               hidden_size=16, image_size=64, init_std=0.5)


def _small_predictor(face_finder=None):
  from musica_jax import predictor  # noqa: PLC0415
  params = stage_net.init_stacked(jax.random.PRNGKey(0), SMALL)
  mean = np.random.default_rng(1).uniform(16, 48, (10, 2)).astype(np.float32)
  return predictor.Predictor(params, SMALL, mean, max_batch=2, face_finder=face_finder)


class _FixedFinder:
  """A face finder (no dlib) that finds the same boxes in every photo."""

  def __init__(self, boxes):
    self.boxes = np.asarray(boxes, np.float64).reshape(-1, 4)

  def __call__(self, image):
    return self.boxes


def test_predict_evaluate_and_export_walk_back_over_an_emptied_checkpoint(checkpointed,
                                                                         tmp_path, capsys):
  """An emptied newest step folder: the model loader of predict / evaluate / export
  (common.load_model) says so on stderr and uses the newest intact step; nothing in the
  workdir is moved (only training sets damaged steps aside)."""
  from experiments import export_model  # noqa: PLC0415
  from experiments import predict_lib  # noqa: PLC0415
  source, _, _ = checkpointed
  workdir = tmp_path / "w"
  shutil.copytree(source, workdir)
  DAMAGES["emptied_folder"](workdir / "checkpoints" / "6")
  loaded = common.load_model(str(workdir), None)                     # evaluate's loader
  assert loaded.metadata["checkpoint_step"] == 4
  assert [d["step"] for d in loaded.metadata["skipped_damaged_checkpoints"]] == [6]
  assert "checkpoint step 6" in capsys.readouterr().err
  summary = export_model.export(str(workdir), str(tmp_path / "m"))
  assert summary["checkpoint_step"] == 4
  pred = predict_lib.load_predictor(str(workdir), None)
  assert pred.metadata["checkpoint_step"] == 4
  assert (workdir / "checkpoints" / "6").is_dir()            # left where it was
  with pytest.raises(common.UserError, match="step 6"):       # asked for by number
    common.load_model(str(workdir), None, "6")


def test_a_corrupt_video_frame_is_skipped_and_the_run_writes_everything(tmp_path, capsys):
  """Frames 0-4, frame 2 not an image: it gets a record saying why (naming --video), the
  count is printed, frames 3-4 are tracked, every overlay and the JSON are written."""
  from PIL import Image  # noqa: PLC0415
  from experiments import predict_lib  # noqa: PLC0415
  frames = tmp_path / "frames"
  frames.mkdir()
  rng = np.random.default_rng(3)
  for i in range(5):
    if i == 2:
      (frames / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated by a phone")
    else:
      Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(
          frames / f"{i:03d}.png")
  # Zero weights: the landmarks are the mean shape, whose tight box is the crop's 142-px
  # box, so the tracked box stays where the finder put it.
  from musica_jax import predictor  # noqa: PLC0415
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), model_io.param_template(SMALL))
  mean = rng.uniform(113.5 - 71, 113.5 + 71, (10, 2))
  mean[:2] = [[113.5 - 71, 113.5 - 71], [113.5 + 71, 113.5 + 71]]
  p = predictor.Predictor(params, SMALL, mean.astype(np.float32), max_batch=2,
                          face_finder=_FixedFinder([(20, 20, 60, 60)]))
  res = predict_lib.run_video(str(frames), p, t_fail=np.inf, output=str(tmp_path / "o"),
                              output_json=str(tmp_path / "v.json"))
  doc = _strict_load((tmp_path / "v.json").read_text())
  assert [f["frame"] for f in doc["frames"]] == ["000", "001", "002", "003", "004"]
  bad = doc["frames"][2]
  assert bad["skipped"] and bad["faces"] == [] and f"--video={frames}" in bad["error"]
  assert "002.png" in bad["error"] and "--image" not in bad["error"]
  assert [len(f["faces"]) for f in doc["frames"]] == [1, 1, 0, 1, 1]
  assert doc["skipped_frames"] == 1 == res["skipped_frames"]
  assert sorted(q.name for q in (tmp_path / "o").iterdir()) == [
      f"{i:03d}.overlay.png" for i in (0, 1, 3, 4)]
  assert "skipped 1 of 5 frame(s)" in capsys.readouterr().out


def test_exif_transpose_points_match_pil_for_every_orientation(tmp_path):
  """read_image turns a photo upright by its EXIF orientation (PIL's exif_transpose), and
  exif_transpose_points maps stored-pixel points (a .pts) onto that upright photo."""
  from PIL import Image  # noqa: PLC0415
  rng = np.random.default_rng(5)
  stored = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)      # H 30, W 50
  pts = np.stack([rng.integers(0, 50, 20), rng.integers(0, 30, 20)], -1)
  for o in range(1, 9):
    exif = Image.Exif()
    exif[images_lib.EXIF_ORIENTATION] = o
    path = tmp_path / f"o{o}.png"
    Image.fromarray(stored).save(path, exif=exif)
    upright, got = images_lib.read_image_and_orientation(path)
    assert got == o
    assert upright.shape == ((30, 50, 3) if o <= 4 else (50, 30, 3)), o
    np.testing.assert_array_equal(images_lib.read_image(path, exif_transpose=False), stored)
    mapped = images_lib.exif_transpose_points(pts, o, (50, 30)).astype(int)
    np.testing.assert_array_equal(upright[mapped[:, 1], mapped[:, 0]],
                                  stored[pts[:, 1], pts[:, 0]], err_msg=str(o))


def test_exif_orientation_is_applied_and_reported(shared_data, tmp_path):
  """A real 300W photo saved as a phone does (pixels stored sideways, EXIF Orientation=6)
  is aligned like the upright original (the shipped model, the .pts box mapped onto the
  upright photo) and the JSON says which orientation was undone."""
  if not model_io.is_model_dir(model_io.DEFAULT_MODEL_DIR):
    pytest.skip("no default model ships with this checkout")
  from PIL import Image  # noqa: PLC0415
  from data_pipelines import readers  # noqa: PLC0415
  from experiments import predict_lib  # noqa: PLC0415
  from musica_jax import face_frame, metrics, predictor, schemes  # noqa: PLC0415
  src = sorted((shared_data / "300w" / "helen" / "testset").glob("*.jpg"))[0]
  upright = images_lib.read_image(src)
  gt = readers.read_pts(str(src.with_suffix(".pts")), 68)
  Image.fromarray(upright).save(tmp_path / "upright.png")
  shutil.copy(src.with_suffix(".pts"), tmp_path / "upright.pts")
  # Stored sideways: the upright photo turned 90 degrees counter-clockwise; Orientation=6
  # says "turn it 90 degrees clockwise to show it". Its .pts is in the stored pixels.
  exif = Image.Exif()
  exif[images_lib.EXIF_ORIENTATION] = 6
  Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.png",
                                                                    exif=exif)
  w_up = upright.shape[1]
  readers.write_pts(str(tmp_path / "phone.pts"), np.stack([gt[:, 1], w_up - 1 - gt[:, 0]], -1))
  sideways = images_lib.read_image(tmp_path / "phone.png", exif_transpose=False)
  assert sideways.shape[:2] == upright.shape[1::-1]          # what was aligned before
  paths = [str(tmp_path / "upright.png"), str(tmp_path / "phone.png")]
  boxes = predict_lib.boxes_for(paths, [], True)
  np.testing.assert_allclose(boxes[1], boxes[0], atol=1e-6)
  np.testing.assert_allclose(boxes[0][0], face_frame.box_from_landmarks(gt), atol=1e-3)
  res = predict_lib.run(paths, boxes, predictor.Predictor.default(max_batch=2),
                        output_json=str(tmp_path / "p.json"))
  doc = _strict_load((tmp_path / "p.json").read_text())
  assert [im["exif_orientation"] for im in doc["images"]] == [1, 6]
  lm = [np.asarray(im["faces"][0]["landmarks"]) for im in res["images"]]
  np.testing.assert_allclose(lm[1], lm[0], atol=1e-3)
  nme = metrics.per_face_nme(lm[1][None], gt[None], schemes.IBUG68, "interocular")[0]
  assert nme < 0.08, nme


def test_a_float_photo_in_0_to_1_is_refused_by_predictor_and_detector(shared_data):
  """A float photo in 0..1: refused with one line (multiply by 255) by the predictor with
  or without a box and by the detector, which used to cast it to a black uint8 photo and
  find no face; a float photo in 0..255 is read as its uint8 twin."""
  import importlib.util  # noqa: PLC0415
  photo = images_lib.read_image(
      sorted((shared_data / "300w" / "helen" / "testset").glob("*.jpg"))[0])
  step = max(1, max(photo.shape[:2]) // 400)                 # a quicker detector run
  photo = np.ascontiguousarray(photo[::step, ::step])
  unit = photo.astype(np.float32) / 255.0
  p = _small_predictor(_FixedFinder([(20, 20, 120, 120)]))
  with pytest.raises(ValueError, match="0..1 .*multiply it by 255"):
    p.find_faces(unit)
  with pytest.raises(ValueError, match="multiply it by 255"):
    p.predict(unit)
  with pytest.raises(ValueError, match="multiply it by 255"):
    p.predict(unit, (20, 20, 120, 120))
  assert images_lib.check_image(unit * 255.0).dtype == np.float32       # 0..255 float: fine
  if importlib.util.find_spec("dlib") is None:
    return
  from musica_jax import detector  # noqa: PLC0415
  hog = detector.DlibHogDetector(upsample=(0,))
  found = hog(photo)
  assert len(found) >= 1
  with pytest.raises(ValueError, match="multiply it by 255"):
    hog(unit)
  np.testing.assert_array_equal(hog(photo.astype(np.float32)), found)


def test_an_extreme_photo_gets_its_overlay_and_a_failed_overlay_loses_no_prediction(
    tmp_path, monkeypatch):
  """A 1-pixel-wide photo: its overlay is capped (4 x 4096, not the 512 x 512,000 that
  raised PIL's DecompressionBombError) and the JSON is written. An overlay that still
  fails is recorded in the JSON, which is written, and the run ends with one line naming
  --output."""
  from PIL import Image  # noqa: PLC0415
  from experiments import predict_lib  # noqa: PLC0415
  Image.fromarray(np.zeros((1000, 1, 3), np.uint8)).save(tmp_path / "thin.png")
  Image.fromarray(np.full((90, 90, 3), 128, np.uint8)).save(tmp_path / "grey.png")
  p = _small_predictor(_FixedFinder(np.zeros((0, 4))))
  paths = [str(tmp_path / "thin.png")]
  res = predict_lib.run(paths, [None], p, output=str(tmp_path / "thin.overlay.png"),
                        output_json=str(tmp_path / "thin.json"))
  assert res["images"][0]["faces"] == [] and (tmp_path / "thin.json").is_file()
  assert Image.open(tmp_path / "thin.overlay.png").size == (4, 4096)

  def bomb(*args, **kwargs):
    raise Image.DecompressionBombError("Image size (1859514624 pixels) exceeds limit")
  monkeypatch.setattr(predict_lib, "draw_overlay", bomb)
  paths = [str(tmp_path / "thin.png"), str(tmp_path / "grey.png")]
  out = tmp_path / "overlays"
  with pytest.raises(common.USER_ERRORS, match=f"--output={out}: 2 of 2 overlay"):
    predict_lib.run(paths, [None, [(20, 20, 70, 70)]], p, output=str(out),
                    output_json=str(tmp_path / "both.json"))
  doc = _strict_load((tmp_path / "both.json").read_text())
  assert len(doc["images"][1]["faces"]) == 1 and doc["overlay_failures"] == 2
  assert all("DecompressionBomb" in im["overlay_error"] for im in doc["images"])


def _cut_run_config(workdir, edit):
  path = workdir / "run_config.json"
  doc = json.loads(path.read_text())
  path.write_text(edit(doc) if callable(edit) else edit)


@pytest.mark.parametrize("edit, message", [
    ('{"model": {"num_landmarks": 68, "patch', "not valid JSON"),
    ("[1, 2]", "a JSON object expected"),
    (lambda d: json.dumps({**d, "mean_shape": d["mean_shape"][:30]}), r"\[68, 2\] expected"),
    (lambda d: json.dumps({**d, "model": {**d["model"], "num_landmarks": "68"}}),
     "does not make a model config"),
    (lambda d: json.dumps({**d, "train": [1]}), "must be a JSON object"),
], ids=["cut_file", "not_an_object", "cut_mean_shape", "model_field_type", "train_not_object"])
def test_a_corrupt_run_config_is_one_error_naming_the_file(checkpointed, tmp_path, edit,
                                                           message):
  """A damaged run_config.json: the model loader of predict / evaluate / export and
  training give one error naming --workdir and the file (was: 47 lines of traceback; a
  cut-down mean_shape failed deep inside JAX)."""
  from musica_jax import run_config  # noqa: PLC0415
  source, _, _ = checkpointed
  workdir = tmp_path / "w"
  shutil.copytree(source, workdir)
  _cut_run_config(workdir, edit)
  with pytest.raises(ValueError, match=message):
    run_config.load(workdir)
  with pytest.raises(common.USER_ERRORS,
                     match=f"--workdir={workdir}: {workdir / 'run_config.json'}: .*{message}"):
    common.load_model(str(workdir), None)


def test_training_on_a_corrupt_run_config_is_one_error(checkpointed, tmp_path, parse_flags):
  from experiments import train  # noqa: PLC0415
  from experiments import train_lib  # noqa: PLC0415
  source, _, _ = checkpointed
  workdir = tmp_path / "w"
  shutil.copytree(source, workdir)
  _cut_run_config(workdir, lambda d: json.dumps({**d, "mean_shape": d["mean_shape"][:30]}))
  parse_flags(*TINY, f"--workdir={workdir}", "--steps=8", f"--tfds_dir={tmp_path / 'tfds'}")
  with pytest.raises(common.UserError, match=f"--workdir={workdir}: .*run_config.json: "
                                              "mean_shape has shape"):
    train_lib.train_and_evaluate(train.config_from_flags(), str(workdir))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4", "6"]


@pytest.fixture
def read_only_dir(tmp_path):
  """A folder where no file can be created (chmod 555; as root, which ignores that,
  /sys); skips where there is none."""
  d = tmp_path / "ro"
  d.mkdir()
  d.chmod(0o555)
  try:
    for candidate in (d, pathlib.Path("/sys")):
      try:
        atomic_io.write_text(candidate / "probe.json", "{}")
        (candidate / "probe.json").unlink()
      except OSError:
        yield candidate
        return
    pytest.skip("no read-only folder here (root and a writable /sys)")
  finally:
    d.chmod(0o755)


def test_outputs_are_checked_writable_before_the_work(read_only_dir, tmp_path):
  """--output_json on a read-only folder: one error naming the flag before any work (the
  predictor is never called); atomic_io names the file asked for, not its hidden
  temporary file; export refuses --output onto a file (and a file where its saved_model/
  goes) before loading anything."""
  from experiments import export_model  # noqa: PLC0415
  from experiments import predict_lib  # noqa: PLC0415
  target = read_only_dir / "pred.json"
  with pytest.raises(common.USER_ERRORS, match=f"--output_json={target}: cannot write"):
    common.check_output(str(target), "output_json")

  class NoWork:
    model_config = SMALL

    def __getattr__(self, name):
      raise AssertionError(f"work started ({name}) before the output check")
  with pytest.raises(common.USER_ERRORS, match="--output_json="):
    predict_lib.run([str(tmp_path / "none.png")], [None], NoWork(), output_json=str(target))
  with pytest.raises(common.USER_ERRORS, match="--output="):
    predict_lib.run_video(str(tmp_path), NoWork(), output=str(read_only_dir / "frames"))
  with pytest.raises(OSError) as e:
    atomic_io.write_text(target, "{}")
  assert str(target) in common.one_line(e.value) and "/." not in common.one_line(e.value)
  (tmp_path / "a_file").write_text("mine")
  with pytest.raises(common.USER_ERRORS, match="--output=.*a_file: exists and is not a dir"):
    export_model.check_output_dir(str(tmp_path / "a_file"))
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "saved_model").write_text("mine")
  with pytest.raises(common.USER_ERRORS, match="saved_model exists and is not a directory"):
    export_model.check_output_dir(str(tmp_path / "out"), "output", "saved_model")
  common.check_output(str(tmp_path / "new" / "deeper" / "x.json"), "output_json")
  assert not (tmp_path / "new").exists()                     # the check makes nothing


def test_flat_boxes_and_empty_image_lists_get_clear_messages():
  p = _small_predictor(_FixedFinder([(10, 10, 50, 50)]))
  images = [np.zeros((60, 60, 3), np.uint8)] * 4
  with pytest.raises(ValueError, match=r"one box \[10.0, 10.0, 50.0, 50.0\] for a list of 4 "
                                       r"images: give one entry per image.*\[box\] \* 4"):
    p.predict(images, [10, 10, 50, 50])
  with pytest.raises(ValueError, match="one box .* for a list of 4 images"):
    p.predict(images, np.array([10, 10, 50, 50]))
  for empty in ([], ()):
    with pytest.raises(ValueError, match="images: an empty list"):
      p.predict(empty, [])
    with pytest.raises(ValueError, match="images: an empty list"):
      p.predict(empty)
  # One box per image as an [n, 4] array is what it looks like.
  photos, boxes = images_lib.normalise_inputs(images, np.tile([10.0, 10, 50, 50], (4, 1)))
  assert len(photos) == 4 and [b.shape for b in boxes] == [(1, 4)] * 4


def test_metrics_log_has_no_repeated_step_after_a_resume(tmp_path, capsys):
  """A run killed after logging steps 16-20 (and mid-line) resumes from its checkpoint of
  step 15: the writer drops the records after 15 (saying so), and a record written again
  for a step and kind already there replaces it: no step repeats."""
  from experiments import train_lib  # noqa: PLC0415
  log = tmp_path / "metrics.jsonl"
  lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in range(5, 21, 5)]
  lines.append(json.dumps({"step": 15, "eval/nme_interocular": 0.05}))
  log.write_text("\n".join(lines) + '\n{"step": 21, "train/lo')          # cut by the kill
  w = train_lib.MetricWriter(str(tmp_path), resume_step=15)
  assert "dropped 1 record(s) of steps after 15" in capsys.readouterr().out
  w.write(20, {"train/loss": 0.5})
  w.write(15, {"eval/nme_interocular": 0.04})       # evaluated again (resumed at the end)
  recs = [json.loads(l) for l in log.read_text().splitlines()]
  keys = [(r["step"], train_lib.MetricWriter._kind(r)) for r in recs]
  assert len(keys) == len(set(keys)), keys
  assert sorted(keys) == [(5, "train"), (10, "train"), (15, "eval"), (15, "train"),
                          (20, "train")]
  assert [r for r in recs if r["step"] == 20][0]["train/loss"] == 0.5
  assert [r for r in recs if "eval/nme_interocular" in r][0]["eval/nme_interocular"] == 0.04


@pytest.mark.usefixtures("highest_precision")   # compares two batch sizes: no TF32
def test_stablehlo_returns_nan_for_non_finite_crops():
  """NaN in, NaN out: the exported program gives NaN landmarks and a NaN estimated error
  (invalid at any Tf) for a crop with a NaN or inf, where it used to return finite
  landmarks and an error of 0; finite crops of the same batch are untouched."""
  from musica_jax import portable  # noqa: PLC0415
  p = _small_predictor()
  crops = np.random.default_rng(4).normal(size=(3, 64, 64, 3)).astype(np.float32)
  crops[0] = np.nan
  crops[1, 5, 7, 1] = np.inf
  exp = jax.export.deserialize(portable.export_stablehlo(p.params, SMALL, p.mean_shape))
  lm, err = (np.asarray(x) for x in exp.call(crops))
  assert np.all(np.isnan(lm[:2])) and np.all(np.isnan(err[:2]))
  assert not np.any(err[:2] < 0.08)                            # invalid under any Tf
  # The finite crop is untouched by its neighbours (test_deploy.py checks finite crops
  # against the predictor).
  lm1, err1 = (np.asarray(x) for x in exp.call(crops[2:]))
  np.testing.assert_allclose(lm[2:], lm1, atol=1e-4)       # batch 3 vs 1: float rounding
  np.testing.assert_allclose(err[2:], err1, atol=1e-6)
  assert np.all(np.isfinite(lm1)) and np.isfinite(err1).all()
  info = portable.describe(SMALL, p.mean_shape, ["cpu"], "float32")
  assert "NaN" in info["input"]["non_finite"]


@pytest.mark.slow     # six programs start (~30 s on 2 loaded cores)
def test_issue27_entry_points_end_with_one_line_or_carry_on(checkpointed, tmp_path,
                                                            read_only_dir):
  """The command lines of issue #27: one `PROGRAM: error:` line naming the flag or file
  and a non-zero exit where the input is wrong, no traceback anywhere; a video with a
  corrupt frame and a 1-pixel-wide photo with --output run to the end."""
  import importlib.util  # noqa: PLC0415
  from PIL import Image  # noqa: PLC0415
  source, _, _ = checkpointed
  cut = tmp_path / "cut"
  shutil.copytree(source, cut)
  _cut_run_config(cut, lambda d: json.dumps({**d, "mean_shape": d["mean_shape"][:30]}))
  _tiny_model(tmp_path / "m")
  photo = tmp_path / "face.png"
  Image.fromarray(np.full((120, 120, 3), 90, np.uint8)).save(photo)
  Image.fromarray(np.zeros((1000, 1, 3), np.uint8)).save(tmp_path / "thin.png")
  frames = tmp_path / "frames"
  frames.mkdir()
  for i in range(5):
    Image.fromarray(np.full((120, 120, 3), 40 * i, np.uint8)).save(frames / f"{i:03d}.png")
  (frames / "002.png").write_bytes(b"not a png")
  (tmp_path / "a_file").write_text("mine")
  model, nocache = f"--model={tmp_path / 'm'}", "--compilation_cache="
  cases = {
      "train_cut_run_config": ("train", [*TINY, f"--workdir={cut}", "--steps=8",
                                         f"--tfds_dir={tmp_path / 'tfds'}"]),
      "predict_cut_run_config": ("predict", [f"--workdir={cut}", f"--image={photo}",
                                             "--box=20,20,100,100", nocache]),
      "savedmodel_onto_a_file": ("export_model", ["--format=savedmodel", "--model=default",
                                                  f"--output={tmp_path / 'a_file'}"]),
      "read_only_output_json": ("predict", [model, f"--image={photo}", "--box=20,20,100,100",
                                            f"--output_json={read_only_dir / 'p.json'}",
                                            nocache]),
      "video_with_a_corrupt_frame": ("predict", [
          model, f"--video={frames}", f"--output={tmp_path / 'vo'}",
          f"--output_json={tmp_path / 'v.json'}", nocache]),
  }
  if importlib.util.find_spec("dlib") is not None:     # no --box: the detector runs
    cases["one_pixel_wide_photo"] = ("predict", [
        model, f"--image={tmp_path / 'thin.png'}", f"--output={tmp_path / 'thin_o.png'}",
        f"--output_json={tmp_path / 'thin.json'}", nocache])
  r = _run_all(cases, parallel=3)
  assert_one_line_error(r["train_cut_run_config"], "train", f"--workdir={cut}",
                        "run_config.json", "mean_shape")
  assert_one_line_error(r["predict_cut_run_config"], "predict", f"--workdir={cut}",
                        "run_config.json", "mean_shape")
  assert_one_line_error(r["savedmodel_onto_a_file"], "export_model",
                        f"--output={tmp_path / 'a_file'}", "not a directory")
  assert_one_line_error(r["read_only_output_json"], "predict",
                        f"--output_json={read_only_dir / 'p.json'}", "cannot write")
  rc, so, se = r["video_with_a_corrupt_frame"]
  assert rc == 0 and "Traceback" not in se, se[-3000:]
  assert "skipped 1 of 5 frame(s)" in so and "--image" not in so + se, so[-2000:]
  doc = _strict_load((tmp_path / "v.json").read_text())
  assert doc["skipped_frames"] == 1 and len(doc["frames"]) == 5
  assert len(list((tmp_path / "vo").glob("*.png"))) == 4
  if "one_pixel_wide_photo" in r:
    rc, so, se = r["one_pixel_wide_photo"]
    assert rc == 0 and "Traceback" not in se, se[-3000:]
    assert (tmp_path / "thin_o.png").is_file() and (tmp_path / "thin.json").is_file()
