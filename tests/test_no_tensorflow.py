import subprocess
import sys


def test_musica_jax_never_imports_tensorflow():
  code = ("import sys, pkgutil, importlib, musica_jax\n"
          "for m in pkgutil.walk_packages(musica_jax.__path__, 'musica_jax.'):\n"
          "  importlib.import_module(m.name)\n"
          "assert 'tensorflow' not in sys.modules, 'musica_jax imported tensorflow'\n"
          "print('ok')")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert "ok" in out.stdout


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
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert "ok" in out.stdout
