"""Every absl entry point starts: its flags parse (no flag defined twice by the modules it
imports) and a usage error is one line (no help dump, no traceback); --helpshort prints the
usage. One subprocess per program, a few at a time."""
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


def test_every_entry_point_parses_its_flags_and_refuses_an_unknown_one_in_one_line():
  # Reaching the unknown-flag error means every flag of the program and of the modules it
  # imports was defined (none twice) and parsing ran.
  assert {"train", "evaluate", "predict", "dial_benchmark", "fit_quit_head"} <= set(PROGRAMS)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  failed = []
  for start in range(0, len(PROGRAMS), 4):
    procs = {name: subprocess.Popen([sys.executable, "-m", f"experiments.{name}",
                                     "--no_such_flag_xyz=1"], cwd=REPO, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name in PROGRAMS[start:start + 4]}
    for name, proc in procs.items():
      out, err = proc.communicate(timeout=300)
      ours = [l for l in err.splitlines() if l.startswith(f"{name}: error:")]
      if (proc.returncode != 2 or len(ours) != 1 or "no_such_flag_xyz" not in ours[0]
          or "Traceback" in err or "--helpfull" in out + err):
        failed.append(f"{name}: rc {proc.returncode}: {(err or out).strip()[-300:]}")
  assert not failed, failed
