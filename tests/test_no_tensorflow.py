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
