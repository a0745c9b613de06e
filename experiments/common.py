"""Shared pieces of the absl entry points: flagfile lookup, the shared flags, the model loader.

Flagfiles live in `experiments/configs/`. `--flagfile=NAME` is a path from the working
directory or, when there is none, a name in `experiments/configs/`, so
`python -m experiments.train --flagfile=wflw98.flags` works from any folder (and from an
installed wheel). A flagfile may include another (`--flagfile=300w_base.flags` as a line),
looked up the same way. Flags given after a flagfile override it.

Errors (`run`): every entry point starts with `common.run(main)`. A bad flag value, a
missing or damaged input (file, data dir, checkpoint) or any other problem of the user's
input ends the program with ONE line on stderr, `PROGRAM: error: MESSAGE` naming the flag
or file, and exit status 1 (2 for flag parsing): no traceback, no help dump. Such errors
are `app.UsageError`, `UserError` and `OSError` (missing file, permission, symlink loop,
disk full). `MUSICA_VERBOSE=1` in the environment shows the traceback instead. Anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

import math
import os
import pathlib
import sys
import tempfile
import traceback

from absl import app
from absl import flags
from absl import logging

from data_pipelines import readers  # numpy-only: no TensorFlow
from experiments import config_flags  # noqa: F401 (defines the model/training/loop/data flags)
from experiments.flag_defs import define_flag  # THE flag helper (programs: common.define_flag)
from musica_jax import atomic_io
from musica_jax import model_io
from musica_jax import restore
from musica_jax import schedules
from musica_jax import strict_json

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"

FLAGS = flags.FLAGS

# Every flag is defined through experiments/flag_defs.py (`define_flag`, re-exported here
# for the programs' `define_flags()`). The model, training, loop and data flags
# (experiments/config_flags.py, from their dataclasses) and the cluster flags below are
# defined on import, so every entry point accepts the same flagfiles.
define_flag("string", "workdir", None, "Checkpoints, logs and metrics of the run.")
define_flag("enum", "distributed", "auto",
            "Multi-process start (musica_jax.parallel.initialize_distributed): auto = "
            "the flags below when given, else the cluster JAX detects (SLURM, TPU pod, "
            "Open MPI, Kubernetes), else one process; manual = the flags below; none = "
            "one process.", enum_values=["auto", "manual", "none"])
define_flag("string", "coordinator_address", None,
            "Multi-host: host:port of process 0; with --num_processes and --process_id "
            "calls jax.distributed.initialize.")
define_flag("integer", "num_processes", None, "Multi-host: number of processes.")
define_flag("integer", "process_id", None, "Multi-host: this process's index.")


VERBOSE_ENV = "MUSICA_VERBOSE"


class UserError(Exception):
  """A problem with the user's input (a flag, a file, the data, a workdir): reported by
  `run` as one line naming it, no traceback."""


def verbose() -> bool:
  """True when MUSICA_VERBOSE is set to anything but '', '0' or 'false'."""
  return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def program_name() -> str:
  return pathlib.Path(sys.argv[0]).stem or "musica"


def one_line(error: BaseException) -> str:
  """The message of an error on one line (an OSError keeps its file name)."""
  text = str(error) or type(error).__name__
  if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
    text = f"{text}: {error.filename}"
  return " ".join(text.split())


def fail(message: str, exitcode: int = 1):
  """Prints `PROGRAM: error: message` on one line to stderr and exits with `exitcode`."""
  print(f"{program_name()}: error: {' '.join(str(message).split())}", file=sys.stderr,
        flush=True)
  sys.exit(exitcode)


USER_ERRORS = (app.UsageError, UserError, OSError, readers.SplitError)


def _guarded(main):
  def guarded_main(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      if verbose():
        traceback.print_exc()
      fail(one_line(e), getattr(e, "exitcode", None) or 1)
  return guarded_main


def _parse_flags(argv):
  """absl's flag parsing with one line per error instead of a usage hint."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    if verbose():
      traceback.print_exc()
    fail(one_line(e), 2)


def run(main, argv=None) -> None:
  """`app.run` for the entry points: --flagfile lookup, then `main` under the one-line
  error rule above."""
  argv = sys.argv if argv is None else argv
  if not verbose():
    # Orbax/TensorStore coroutines abandoned after a failed restore or save print their
    # trace when collected ("Exception ignored in ..."); the error that matters is ours.
    sys.unraisablehook = lambda unraisable: None
  try:
    argv = resolve_flagfiles(argv)
  except SystemExit as e:
    fail(str(e.code), 2)
  app.run(_guarded(main), argv=argv, flags_parser=_parse_flags)


def finite_flag(name: str, value, *, positive: bool = False, allow_inf: bool = False):
  """`value` of float flag --name, refused (UsageError) when NaN, infinite (unless
  allow_inf) or, with positive, not > 0. None passes through."""
  if value is None:
    return None
  if math.isnan(value) or (math.isinf(value) and not allow_inf):
    raise app.UsageError(f"--{name}={value}: a finite number is needed")
  if positive and not value > 0:
    raise app.UsageError(f"--{name}={value}: must be > 0")
  return value


def float_list_flag(name: str, values) -> tuple[float, ...]:
  """The numbers of list flag --name (UsageError naming it when one is not a number)."""
  try:
    return tuple(float(v) for v in values)
  except ValueError as e:
    raise app.UsageError(f"--{name}: numbers expected, got {values}") from e


def name_path_flag(name: str, items) -> list[tuple[str, str]]:
  """A list flag of name:path items -> [(name, path)]; UsageError naming the flag."""
  out = []
  for item in items or ():
    label, sep, path = item.partition(":")
    if not sep or not label or not path:
      raise app.UsageError(f"--{name}: {item!r}: name:path expected")
    out.append((label, path))
  return out


def int_flag_at_least(name: str, value: int, minimum: int) -> int:
  if value < minimum:
    raise app.UsageError(f"--{name}={value}: must be >= {minimum}")
  return value


def start(argv) -> None:
  """First lines of every entry point's main: no stray arguments, quiet libraries, and
  every output file flag it defines (`OUTPUT_FILE_FLAGS`) checked writable before any
  work (`check_output`)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_libraries()
  for name in OUTPUT_FILE_FLAGS:
    if name in FLAGS and FLAGS[name].value:
      check_output(FLAGS[name].value, name)


# Flags that name one output file, in whichever entry point defines them (`start` checks
# each before the work; `--output` means a file or a folder by program and is checked by
# the programs themselves).
OUTPUT_FILE_FLAGS = ("output_json", "output_md", "output_png", "plot", "calibration_png",
                     "figure1", "figure5", "figure7_plot", "figure7_json")


def check_output(path, flag: str, kind: str = "file") -> pathlib.Path:
  """Before the work: `--flag=path` can be written (kind "file": a file, written through
  atomic_io, i.e. a temporary file in its folder renamed over it; "dir": a folder that
  gets files). The folder the files go in, or its nearest existing ancestor when it is
  still to be made, must be a folder where a file can be created: a probe file is made
  there and removed, which also catches read-only mounts and root-proof paths that
  permission bits do not show. UsageError naming the flag otherwise. Makes nothing."""
  p = pathlib.Path(os.path.expanduser(str(path)))
  if kind == "file" and p.is_dir():
    raise app.UsageError(f"--{flag}={path}: is a directory; give a file path")
  if kind == "dir" and p.exists() and not p.is_dir():
    raise app.UsageError(f"--{flag}={path}: exists and is not a directory")
  folder = p if kind == "dir" else p.parent
  folder = folder.absolute()
  while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
    folder = folder.parent
  if not folder.is_dir():
    raise app.UsageError(f"--{flag}={path}: {folder} is not a directory")
  try:
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".musica_write_probe.")
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise app.UsageError(f"--{flag}={path}: cannot write in {folder} "
                         f"({e.strerror or type(e).__name__})") from None
  return p


def write_json(path, data, indent: int = 2) -> None:
  """Writes `data` as JSON atomically and says so."""
  atomic_io.write_text(path, strict_json.dumps(data, indent=indent))
  print(f"wrote {path}")


def quiet_libraries() -> None:
  """Orbax and TF log every checkpoint step at INFO; keep the console for progress lines
  unless the user asked for more with --verbosity."""
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if not verbose():
    logging.get_absl_handler().addFilter(_no_library_traces)


def _no_library_traces(record) -> bool:
  """Orbax logs the trace of a failed background write (e.g. a full disk) before the
  error reaches us; keep its one-line message, drop the trace (MUSICA_VERBOSE keeps it)."""
  if record.exc_info and (f"{os.sep}orbax{os.sep}" in (record.pathname or "")
                          or record.name == "asyncio"):
    record.exc_info, record.exc_text = None, None
  return True


def find_flagfile(name: str, where: str = "") -> pathlib.Path:
  """The flagfile --flagfile=NAME names: NAME from the working directory, else NAME (or
  NAME.flags) in experiments/configs/. SystemExit with one line when neither exists."""
  if os.path.exists(name):
    return pathlib.Path(name)
  candidate = CONFIG_DIR / name
  if not candidate.exists() and not name.endswith(".flags"):
    candidate = CONFIG_DIR / f"{name}.flags"
  if not candidate.exists():
    known = sorted(p.name for p in CONFIG_DIR.glob("*.flags"))
    raise SystemExit(f"--flagfile={name}{where}: no such file here or in {CONFIG_DIR} "
                     f"(known: {', '.join(known)})")
  return candidate


_FLAGFILE = ("--flagfile=", "-flagfile=")


def _flagfile_lines(path: pathlib.Path, stack: tuple = ()) -> list[str]:
  """The flags of a flagfile, absl's format (blank lines and lines starting with # or //
  skipped, each line one flag), with nested --flagfile lines expanded in place."""
  if path.resolve() in stack:
    raise SystemExit(f"--flagfile={path}: includes itself (through "
                     f"{' -> '.join(p.name for p in stack)})")
  try:
    lines = path.read_text().splitlines()
  except OSError as e:
    raise SystemExit(f"--flagfile={path}: {one_line(e)}") from None
  out = []
  for line in lines:
    if not line.strip() or line.startswith(("#", "//")):
      continue
    if line.startswith(_FLAGFILE):
      name = os.path.expanduser(line.split("=", 1)[1].strip())
      out += _flagfile_lines(find_flagfile(name, f" (in {path})"), (*stack, path.resolve()))
    else:
      out.append(line.strip())
  return out


def resolve_flagfiles(argv: list[str]) -> list[str]:
  """argv with each --flagfile=NAME replaced by the flags it holds, in place (later flags
  override earlier ones, as in absl's own expansion). NAME, on the command line or nested
  in a flagfile, is looked up by `find_flagfile`, so nested names work from any working
  directory (absl itself would read a nested name from the working directory)."""
  out = []
  for i, arg in enumerate(argv):
    if arg == "--":
      return out + argv[i:]
    if i > 0 and arg.startswith(_FLAGFILE):
      name = os.path.expanduser(arg.split("=", 1)[1].strip())
      out += _flagfile_lines(find_flagfile(name))
    else:
      out.append(arg)
  return out


MODEL_SOURCES = ("give exactly one of --workdir (a training run) and --model (an exported "
                 "model directory, or a shipped model: 'default' or 'musica68')")


def load_model(workdir: str | None, model: str | None, checkpoint: str = "latest", *,
               default_if_none: bool = False) -> model_io.LoadedModel:
  """THE model loader of the entry points (over `model_io.load` / `restore.restore`):
  --workdir's checkpoint (--checkpoint: a step, 'latest' or 'best') or --model (an
  exported directory, or 'default'; "DIR@9_17_34": its weights reading that schedule,
  `musica_jax.schedules`), exactly one; default_if_none: neither = the shipped
  model. Problems become one line naming the flag (app.UsageError, or UserError for a
  damaged checkpoint). A damaged checkpoint that 'latest' walks back over is a warning on
  stderr."""
  if workdir and model:
    raise app.UsageError("give --workdir or --model, not both" if default_if_none
                         else MODEL_SOURCES)
  if not workdir and not model and not default_if_none:
    raise app.UsageError(MODEL_SOURCES)
  if not workdir:
    path, schedule = schedules.split_model_name(model or "default")
    try:
      loaded = model_io.load(path)
    except model_io.NoDefaultModelError as e:
      raise app.UsageError(f"no --model or --workdir given, and {e}" if not model
                           else f"--model={model}: {e}") from e
    except (FileNotFoundError, ValueError) as e:
      shipped = " or ".join(repr(n) for n in model_io.BUNDLED_MODELS)
      raise app.UsageError(f"--model={model}: {e}; or name a shipped model: {shipped}") from e
    if schedule is None:
      return loaded
    try:            # "DIR@9_17_34": the weights reading that schedule, with its policy
      return schedules.with_schedule(loaded, schedule)
    except ValueError as e:
      raise app.UsageError(f"--model={model}: {e}") from e

  def skipped(step, why):
    print(f"warning: checkpoint step {step} in {os.path.join(workdir, 'checkpoints')} is "
          f"damaged ({why}); trying the one before", file=sys.stderr, flush=True)

  from musica_jax import checkpoints  # noqa: PLC0415  (orbax: only for workdirs)
  try:
    return restore.restore(workdir, checkpoint, on_skip=skipped)
  except model_io.StepError as e:
    raise app.UsageError(f"--checkpoint={checkpoint}: {e}") from None
  except checkpoints.DamagedCheckpointError as e:
    raise UserError(f"--workdir={workdir}: {e}") from None
  except FileNotFoundError as e:
    raise app.UsageError(f"--workdir={workdir} --checkpoint={checkpoint}: {e}") from None
  except ValueError as e:
    raise app.UsageError(f"--workdir={workdir}: {e}") from None


def model_provenance(m: model_io.LoadedModel) -> dict:
  """Where a loaded model came from, as the results JSONs record it (evaluate,
  sweep_thresholds, choose_t_fail, attention_map)."""
  if m.from_workdir:
    info = {"workdir": m.metadata["workdir"], "checkpoint_step": m.metadata["checkpoint_step"]}
    if "skipped_damaged_checkpoints" in m.metadata:
      info["skipped_damaged_checkpoints"] = m.metadata["skipped_damaged_checkpoints"]
    chosen_on = m.metadata.get("chosen_on")
  else:
    source = m.metadata.get("source", {})
    info = {"model_path": os.path.abspath(m.path), "model_name": m.metadata.get("name"),
            "param_dtype": m.dtype, "checkpoint_step": source.get("checkpoint_step"),
            "trained_in": source.get("workdir")}
    chosen_on = source.get("chosen_on")
  if chosen_on:       # --checkpoint=best: the split training evaluated on
    info["checkpoint_chosen_on"] = chosen_on
  if m.metadata.get("averaged_from"):   # experiments.average_models
    info["averaged_from"] = [
        {"model_name": a["metadata"].get("name"), "weight": a["weight"],
         "checkpoint_step": a["metadata"].get("source", {}).get("checkpoint_step"),
         "trained_in": a["metadata"].get("source", {}).get("workdir"),
         "checkpoint_chosen_on": a["metadata"].get("source", {}).get("chosen_on")}
        for a in m.metadata["averaged_from"]]
  info["quit_policy"] = (m.quit_info or {}).get("design")
  return info
