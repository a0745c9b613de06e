"""The surface a new user meets: `from musica_jax import ...`, the version, type
information, inference without training machinery, and the `musica-predict` console
script (the same program as `python -m experiments.predict`)."""
import importlib.metadata
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import musica_jax

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_the_public_names_and_the_version():
  from musica_jax import Prediction, Predictor, PredictorStream, __version__, read_image  # noqa: PLC0415
  from musica_jax import images, predictor  # noqa: PLC0415
  assert Predictor is predictor.Predictor and Prediction is predictor.Prediction
  assert PredictorStream is predictor.PredictorStream and read_image is images.read_image
  assert set(musica_jax.__all__) <= set(dir(musica_jax))
  assert __version__ == importlib.metadata.version("musica-jax")      # one source: setup.cfg
  assert (pathlib.Path(musica_jax.__file__).parent / "py.typed").is_file()
  with pytest.raises(AttributeError, match="no attribute 'Nope'"):
    musica_jax.Nope  # noqa: B018


def test_the_dials_are_keyword_only_and_annotated():
  import inspect  # noqa: PLC0415
  from musica_jax import Predictor, PredictorStream  # noqa: PLC0415
  for fn, names in ((Predictor.predict, ("ts", "t_fail", "budget", "budget_mmacs")),
                    (Predictor.run_fast, ("ts", "t_fail", "budget")),
                    (Predictor.stream, ("budget", "budget_mmacs")),
                    (PredictorStream.predict, ("ts", "t_fail"))):
    params = inspect.signature(fn).parameters
    for name in names:
      assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (fn.__qualname__, name)
    assert all(p.annotation is not inspect.Parameter.empty
               for n, p in params.items() if n not in ("self", "cls")), fn.__qualname__


def _fresh(code: str) -> str:
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 0, out.stderr
  return out.stdout


def test_inference_loads_no_training_machinery():
  """Predictor, the model directory and a prediction with the shipped model import no
  optax, orbax or TensorFlow (a GPU or phone host needs none of them)."""
  out = _fresh(
      "import sys\n"
      "import numpy as np\n"
      "from musica_jax import Predictor\n"
      "p = Predictor.default()\n"
      "img = np.full((200, 200, 3), 128, np.uint8)\n"
      "pred = p.predict(img, (50, 50, 150, 150), budget=2.0)\n"
      "assert pred.landmarks.shape == (1, 68, 2)\n"
      "bad = sorted({m.split('.')[0] for m in sys.modules} & {'optax', 'orbax', 'tensorflow'})\n"
      "print('loaded:', bad)\n")
  assert "loaded: []" in out


def _console_script() -> str:
  exe = shutil.which("musica-predict")
  if exe is None:
    pytest.skip("musica-predict is not on PATH (install the package: pip install -e .)")
  return exe


def test_the_console_script_help_is_the_modules():
  out = subprocess.run([_console_script(), "--help"], capture_output=True, text=True)
  ref = subprocess.run([sys.executable, "-m", "experiments.predict", "--help"],
                       capture_output=True, text=True, cwd=REPO)
  assert out.returncode == ref.returncode, out.stderr      # absl's --help exits 1
  assert "musica-predict" in out.stdout and "Traceback" not in out.stderr
  for flag in ("--image", "--box", "--budget", "--output_json", "--video"):
    assert flag in out.stdout


def test_the_console_script_predicts_a_photo_like_the_module(shared_data, tmp_path):
  photo = sorted((shared_data / "300w" / "helen" / "testset").glob("*.jpg"))[0]
  args = [f"--image={photo}", "--box_from_pts", "--compilation_cache="]
  out = subprocess.run([_console_script(), *args, f"--output_json={tmp_path / 'a.json'}"],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  ref = subprocess.run([sys.executable, "-m", "experiments.predict", *args,
                        f"--output_json={tmp_path / 'b.json'}"], capture_output=True,
                       text=True, timeout=300, cwd=REPO)
  assert ref.returncode == 0, ref.stderr
  a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
  face_a, face_b = a["images"][0]["faces"][0], b["images"][0]["faces"][0]
  assert np.asarray(face_a["landmarks"]).shape == (68, 2)
  np.testing.assert_allclose(face_a["landmarks"], face_b["landmarks"], atol=1e-3)
  # A bad flag: one line naming it, exit 2 (absl's parser).
  bad = subprocess.run([_console_script(), "--nope=1"], capture_output=True, text=True)
  assert bad.returncode != 0 and "nope" in bad.stderr and "Traceback" not in bad.stderr
