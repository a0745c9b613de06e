"""One way to declare flags (experiments/flag_defs.py) and the flagfile lookup of
experiments.common: nested --flagfile names, and lookup from an installed copy of the
package."""
import ast
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from experiments import common

REPO = pathlib.Path(__file__).resolve().parents[1]
HELPER = REPO / "experiments" / "flag_defs.py"
# TODO(export_model owner): experiments/export_model.py still defines its flags with its own
# `_define` helper and raw flags.DEFINE_enum; remove it from this list once it uses
# common.define_flag.
ALLOWED: set = set()
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")


def _defines(path: pathlib.Path) -> list[str]:
  """Where a file defines an absl flag itself: a `*.DEFINE_*` attribute (flags.DEFINE_string,
  ...) or a getattr(..., "DEFINE_...") (a string or an f-string)."""
  found = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Attribute) and node.attr.startswith("DEFINE"):
      found.append(f"{path.relative_to(REPO)}:{node.lineno}: .{node.attr}")
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
          and node.func.id == "getattr" and len(node.args) >= 2
          and "DEFINE" in ast.unparse(node.args[1])):
      found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
  return found


def test_no_flag_is_defined_outside_the_one_helper_module():
  files = sorted((REPO / "experiments").rglob("*.py")) + sorted(
      (REPO / "data_pipelines").rglob("*.py"))
  assert HELPER in files and len(files) > 20
  assert _defines(HELPER), "the helper itself must be what defines flags"
  outside = [hit for f in files if f != HELPER and f not in ALLOWED for hit in _defines(f)]
  assert not outside, ("define flags with experiments.flag_defs (common.define_flag in a "
                       "program's define_flags(), define_from_dataclass for a config "
                       f"dataclass), not directly: {outside}")


_PROGRAMS_CODE = r"""
import dataclasses, importlib, pathlib, sys
from absl import flags
from experiments import common, flag_defs
FLAGS = flags.FLAGS

def ours():   # flags of this project's modules (TensorFlow & co. define their own)
  return {f.name for module, defined in FLAGS.flags_by_module_dict().items()
          if module.startswith(("experiments", "data_pipelines")) for f in defined}

shared = ours()
assert {"workdir", "dataset", "data_dir", "steps", "num_patches"} <= shared
names = sys.argv[1].split(",")
modules = [importlib.import_module(f"experiments.{n}") for n in names]
# Importing a program defines none of its flags (tests import any number of them).
assert ours() == shared, sorted(ours() - shared)
# Every program's define_flags() in one process, twice: no duplicate-flag error.
for m in modules:
  if hasattr(m, "define_flags"):
    m.define_flags()
    m.define_flags()
for name in ("output_json", "model", "runs_dir", "num_batches", "fail_nme", "evals"):
  assert name in FLAGS, name
# The helpers: idempotent, registered under the module that asks (its --help lists them).
flag_defs.define_flag("integer", "test_flag_x", 3, "first")
flag_defs.define_flag("string", "test_flag_x", "other", "second")
assert FLAGS["test_flag_x"].default == 3 and FLAGS["test_flag_x"].help == "first"
assert "test_flag_x" in {f.name for f in FLAGS.get_key_flags_for_module(sys.argv[0])}

@dataclasses.dataclass
class Tiny:
  test_size: int = 2
  test_rate: float = 0.5
  test_on: bool = True
  test_kind: str = "a"
  test_list: tuple = (1, 2)
flag_defs.define_from_dataclass(Tiny, {"test_size": "Size."}, enums={"test_kind": ("a", "b")})
flag_defs.define_from_dataclass(Tiny, {})
for name, text in (("test_size", "4"), ("test_kind", "b"), ("test_list", "3,4"),
                   ("test_on", "false")):
  FLAGS[name].parse(text)
assert [FLAGS[n].value for n in ("test_size", "test_rate", "test_on", "test_kind",
                                 "test_list")] == [4, 0.5, False, "b", ["3", "4"]]
assert FLAGS["test_list"].default == ["1", "2"]
assert FLAGS["test_kind"].parser.enum_values == ["a", "b"]
assert FLAGS["test_size"].help == "Size." and "Tiny.test_rate" in FLAGS["test_rate"].help
print("ok")
"""


def test_programs_define_their_flags_only_when_run_and_once_per_process():
  programs = sorted(p.stem for p in (REPO / "experiments").glob("*.py")
                    if "common.run(main)" in p.read_text())
  assert {"evaluate", "choose_t_fail", "ablation", "results_table", "compare_dlib",
          "pipeline_benchmark", "show_batch"} <= set(programs)
  proc = subprocess.run([sys.executable, "-c", _PROGRAMS_CODE, ",".join(programs)],
                        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_flagfile_names_nest_and_a_path_from_the_working_directory_wins(tmp_path,
                                                                         monkeypatch):
  monkeypatch.chdir(tmp_path)
  base = [l for l in (common.CONFIG_DIR / "300w_base.flags").read_text().splitlines()
          if l.startswith("--")]
  # A user's flagfile (here, in the working directory) includes a shipped one by name,
  # with or without ".flags"; comments and blank lines are skipped; later flags win.
  (tmp_path / "mine.flags").write_text("# mine\n\n// too\n--flagfile=300w_base\n--steps=9\n")
  got = common.resolve_flagfiles(["p", "--flagfile=mine.flags", "--steps=3"])
  assert got == ["p", *base, "--steps=9", "--steps=3"]
  # A file of that exact name in the working directory wins over the shipped one, nested
  # too (".flags" is added only in experiments/configs/).
  (tmp_path / "300w_base.flags").write_text("--dataset=wflw\n")
  (tmp_path / "mine2.flags").write_text("--flagfile=300w_base.flags\n--steps=9\n")
  assert common.resolve_flagfiles(["p", "--flagfile=mine2.flags"]) == [
      "p", "--dataset=wflw", "--steps=9"]
  assert common.find_flagfile("300w_base.flags") == pathlib.Path("300w_base.flags")
  assert common.find_flagfile("300w_base") == common.CONFIG_DIR / "300w_base.flags"
  # A path into another folder works as well; nothing after "--" is expanded.
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "x.flags").write_text("--flagfile=300w34.flags\n")
  got = common.resolve_flagfiles(["p", "--flagfile=sub/x.flags", "--", "--flagfile=x"])
  assert "--num_patches=34" in got and got[-2:] == ["--", "--flagfile=x"]
  with pytest.raises(SystemExit, match=r"--flagfile=nope: no such file .*known: .*300w34"):
    common.find_flagfile("nope")


_INSTALLED_CODE = r"""
import sys
from experiments import common
print(common.CONFIG_DIR)
print("\n".join(common.resolve_flagfiles(["p", "--flagfile=only_installed", "--steps=2"])))
"""


def test_flagfiles_are_found_in_the_installed_package_from_any_folder(tmp_path):
  """An installed copy of `experiments` (as a wheel lays it out, no repository around):
  --flagfile names, nested ones included, resolve in its own configs/ folder from any
  working directory. (tests/test_cluster.py builds and installs the real wheel.)"""
  site = tmp_path / "site"
  shutil.copytree(REPO / "experiments", site / "experiments",
                  ignore=shutil.ignore_patterns("__pycache__"))
  (site / "experiments" / "configs" / "only_installed.flags").write_text(
      "--flagfile=300w34.flags\n--num_patches=19\n")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = dict(ENV, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))
  proc = subprocess.run([sys.executable, "-c", _INSTALLED_CODE], cwd=elsewhere, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  where, *argv = proc.stdout.split()
  assert pathlib.Path(where) == site / "experiments" / "configs"
  shipped = [l for f in ("300w_base.flags", "300w34.flags")
             for l in (REPO / "experiments" / "configs" / f).read_text().splitlines()
             if l.startswith("--") and not l.startswith("--flagfile")]
  assert argv == ["p", *shipped, "--num_patches=19", "--steps=2"]
