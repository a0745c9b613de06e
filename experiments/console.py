"""Console scripts (setup.cfg [options.entry_points]): each runs its entry point exactly
as `python -m experiments.<name>` does (same flags, help and exit codes)."""
from __future__ import annotations

import runpy


def predict() -> None:
  """`musica-predict`: `python -m experiments.predict`."""
  runpy.run_module("experiments.predict", run_name="__main__", alter_sys=True)
