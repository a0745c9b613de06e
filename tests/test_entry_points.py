"""Every absl entry point starts: its flags parse (no flag defined twice by the modules it
imports) and a usage error is one line (no help dump, no traceback); --helpshort prints the
usage. All programs in one subprocess, each run as its `python -m` would be."""
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PROGRAMS = sorted(p.stem for p in (REPO / "experiments").glob("*.py")
                  if p.stem != "common" and ("common.run(main)" in p.read_text()
                                             or "app.run(" in p.read_text()))


def test_help_prints_the_usage():
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "experiments.train", "--helpshort"], cwd=REPO,
                        env=env, text=True, capture_output=True, timeout=300)
  assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "--helpfull" in proc.stdout and "--flagfile" in proc.stdout


# Runs every program as `python -m experiments.NAME --no_such_flag_xyz=1` would, one after
# the other in one interpreter (runpy, as __main__), and reports what each printed.
_RUN_ALL = """
import contextlib, io, json, runpy, sys
report = {}
for name in sys.argv[1:]:
  err, out = io.StringIO(), io.StringIO()
  sys.argv = [name, "--no_such_flag_xyz=1"]
  code = None
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
    try:
      runpy.run_module("experiments." + name, run_name="__main__", alter_sys=True)
    except SystemExit as e:
      code = e.code
    except BaseException as e:  # noqa: BLE001
      code = "raised " + type(e).__name__ + ": " + str(e)
  report[name] = [code, out.getvalue(), err.getvalue()]
print("REPORT" + json.dumps(report))
"""


def test_every_entry_point_parses_its_flags_and_refuses_an_unknown_one_in_one_line():
  # Reaching the unknown-flag error means every flag of the program and of the modules it
  # imports was defined (none twice) and parsing ran.
  assert {"train", "evaluate", "predict", "dial_benchmark", "fit_quit_head"} <= set(PROGRAMS)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _RUN_ALL, *PROGRAMS], cwd=REPO, env=env,
                        text=True, capture_output=True, timeout=600)
  assert proc.returncode == 0 and "REPORT" in proc.stdout, proc.stderr[-2000:]
  report = json.loads(proc.stdout.split("REPORT", 1)[1])
  failed = []
  for name in PROGRAMS:
    code, out, err = report[name]
    ours = [line for line in err.splitlines() if line.startswith(f"{name}: error:")]
    if (code != 2 or len(ours) != 1 or "no_such_flag_xyz" not in ours[0]
        or "Traceback" in err or "--helpfull" in out + err):
      failed.append(f"{name}: exit {code}: {(err or out).strip()[-300:]}")
  assert not failed, failed
