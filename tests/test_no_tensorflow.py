import subprocess
import sys


def _run_fresh(code: str) -> None:
  """Runs `code` in a new interpreter (nothing imported yet); it prints ok at the end."""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert "ok" in out.stdout


def test_musica_jax_never_imports_tensorflow():
  code = ("import sys, pkgutil, importlib, musica_jax\n"
          "for m in pkgutil.walk_packages(musica_jax.__path__, 'musica_jax.'):\n"
          "  importlib.import_module(m.name)\n"
          "assert 'tensorflow' not in sys.modules, 'musica_jax imported tensorflow'\n"
          "print('ok')")
  _run_fresh(code)


def test_the_loading_path_imports_no_tensorflow_and_orbax_only_for_a_workdir():
  # model_io / run_config load a model on a host without TensorFlow; an exported model
  # needs no orbax either (it is imported when a training workdir is restored).
  code = ("import sys\n"
          "from musica_jax import model_io, run_config\n"
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
          "assert 'orbax.checkpoint' not in sys.modules, 'orbax imported'\n"
          "m = model_io.load('default') if model_io.is_model_dir(model_io.DEFAULT_MODEL_DIR) "
          "else None\n"
          "assert 'orbax.checkpoint' not in sys.modules, 'orbax imported by load_model'\n"
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
          "print('ok')")
  _run_fresh(code)


def test_numpy_side_of_data_pipelines_and_model_entry_points_do_not_import_tensorflow():
  # GPU hosts have no TensorFlow: the one .pts reader (data_pipelines.readers) and the
  # model-side entry points that use it must import without it.
  code = ("import sys\n"
          "import data_pipelines.readers, data_pipelines.sources, data_pipelines.config\n"
          "import data_pipelines.synthetic_faces, experiments.compare_dlib, experiments.predict\n"
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
          "import data_pipelines.augment\n"
          "assert 'tensorflow' in sys.modules\n"
          "print('ok')")
  _run_fresh(code)


def test_predict_box_from_pts_uses_the_one_reader(tmp_path):
  from absl import app  # noqa: PLC0415
  import pytest  # noqa: PLC0415
  from data_pipelines import readers  # noqa: PLC0415
  from experiments import predict_lib  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  pts = np.array([[10.0, 20.0], [30.0, 25.0], [20.0, 50.0]])
  readers.write_pts(str(tmp_path / "a.pts"), pts)
  (box,) = predict_lib.boxes_for([str(tmp_path / "a.jpg")], [], from_pts=True)
  np.testing.assert_allclose(box, [[10.0, 20.0, 30.0, 50.0]], atol=1e-5)
  (tmp_path / "b.pts").write_text("version: 1\nn_points: 3\n{\n1 2\n}\n")
  with pytest.raises(app.UsageError, match="b.pts"):
    predict_lib.boxes_for([str(tmp_path / "b.jpg")], [], from_pts=True)
