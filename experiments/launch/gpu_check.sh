#!/bin/bash
# One accelerator check of the model, for a GPU machine with JAX (CUDA), Flax, Optax,
# Orbax and pytest but no TensorFlow. From anywhere (it moves to the repository root):
#
#   OUT=/tmp/gpu_out experiments/launch/gpu_check.sh
#
# Writes everything under ${OUT:-/tmp/gpu_out}:
#   env.txt                    nvidia-smi -L, python / jax / jaxlib / flax / optax / orbax
#                              versions, jax.devices(), the cascade's execution mode
#   gpu_tests.txt, .xml        pytest of the TensorFlow-free test files (junit XML)
#   gpu_benchmark.json, .txt   python -m experiments.benchmark with its GPU defaults
#   timing.txt                 one line per section: name, exit code, seconds
#   gpu_photos_batch{1024,64}.json, gpu_latency.json, gpu_photos.txt
#                              experiments.deploy_benchmark on the 300W common photos:
#                              photos to landmarks in batches, the dial through predict,
#                              batch 1 (masked scan vs fast path)
# Sections run one after the other (env, photos, tests, benchmark); a failing or timed-out
# section is recorded (its exit code in timing.txt; 124 or 137: stopped by its timeout)
# and the next one runs. Each section has a hard `timeout`, so the whole run stays under
# TOTAL_S seconds (default 420 = 7 minutes; expect ~6 on an H200, plus the machine's start).
# Section caps: ENV_S (60), PHOTOS_S (150), TESTS_S (150), BENCH_S (180). PYTHON picks
# the interpreter. (experiments.dial_benchmark imports TensorFlow: not run here; the dial
# through predict is in the photos section.)
set -u

cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
OUT=${OUT:-/tmp/gpu_out}
PY=${PYTHON:-python}
TOTAL_S=${TOTAL_S:-420}
PHOTOS_RESERVE_S=${PHOTOS_RESERVE_S:-0}
ENV_S=${ENV_S:-60}
TESTS_S=${TESTS_S:-150}
BENCH_S=${BENCH_S:-180}
mkdir -p "$OUT"
: > "$OUT/timing.txt"
START=$SECONDS

# limit CAP RESERVE: CAP, or less when the run's remaining time minus RESERVE is shorter.
limit() {
  local left=$((TOTAL_S - (SECONDS - START) - $2))
  ((left < 10)) && left=10
  echo $(($1 < left ? $1 : left))
}

# tmo COMMAND...: COMMAND under the current section's time limit $CAP. SIGINT first (pytest
# then still writes its reports), SIGKILL 20 s later; exit code 124 (or 137) on timeout.
tmo() {
  timeout --signal=INT --kill-after=20 "$CAP" "$@"
}

# section NAME CAP RESERVE FUNCTION: runs FUNCTION (whose commands run under `tmo`) with
# CAP = min(CAP, time left - RESERVE), and records its exit code and time in timing.txt.
section() {
  local name=$1 t0=$SECONDS rc
  CAP=$(limit "$2" "$3")
  echo "== $name (at most ${CAP} s)"
  "$4"
  rc=$?
  printf '%-10s rc=%-4s %4d s  (limit %d s)\n' "$name" "$rc" $((SECONDS - t0)) "$CAP" \
      >> "$OUT/timing.txt"
  echo "   $name: exit $rc after $((SECONDS - t0)) s"
}

# --- (1) environment --------------------------------------------------------------------
env_report() {
  {
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "--- nvidia-smi -L"
    timeout 20 nvidia-smi -L 2>&1 || echo "nvidia-smi failed"
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    echo "--- python"
    tmo "$PY" - <<'EOF' 2>&1
import importlib.metadata as md, importlib.util, platform, sys
print("python", sys.version.replace("\n", " "), platform.machine())
for pkg in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax",
            "orbax-checkpoint", "numpy", "ml_dtypes", "pillow", "matplotlib", "absl-py",
            "pytest"):
  try:
    print(f"{pkg} {md.version(pkg)}")
  except md.PackageNotFoundError:
    print(f"{pkg} (not installed)")
print("tensorflow importable:", importlib.util.find_spec("tensorflow") is not None)
import jax
print("jax.devices():", jax.devices())
print("default backend:", jax.default_backend())
from musica_jax import cascade
print("ModelConfig.execution auto -> one_batched_pass:", cascade.one_batched_pass())
EOF
  } > "$OUT/env.txt" 2>&1
}
section env "$ENV_S" "$PHOTOS_RESERVE_S" env_report
cat "$OUT/env.txt"
# --- (4) photos to landmarks --------------------------------------------------------------
# The 300W common photos (decoded beforehand) through Predictor.predict in batches (the
# host part of the crop, then crop + cascade in one program) against the cascade alone on
# the same crops, with the dial through predict; then batch 1 per face (masked scan vs the
# fast path, StableHLO, bf16). Data: DATA_DIR (default gpu_data/300w: copy
# lfpw/testset and helen/testset of ../shared/data/300w there; git-ignored, 17 MB; name it
# in the device tool's `carry`).
DATA_DIR=${DATA_DIR:-gpu_data/300w}
PHOTOS_S=${PHOTOS_S:-150}
run_photos() {
  [[ -d $DATA_DIR ]] || { echo "no $DATA_DIR" > "$OUT/gpu_photos.txt"; return 2; }
  local b rc=0
  for b in 1024 64; do
    tmo "$PY" -m experiments.deploy_benchmark --data_dir="$DATA_DIR" --sections=batch \
        --predict_batch=$b --batch_budgets=2.5,2.0,1.5 --batch_rounds=5 \
        --output_json="$OUT/gpu_photos_batch$b.json" >> "$OUT/gpu_photos.txt" 2>&1 || rc=$?
  done
  tmo "$PY" -m experiments.deploy_benchmark --data_dir="$DATA_DIR" --sections=latency \
      --latency_faces=40 --latency_budgets=2.0 --output_json="$OUT/gpu_latency.json" \
      >> "$OUT/gpu_photos.txt" 2>&1 || rc=$?
  return $rc
}

section photos "$PHOTOS_S" 0 run_photos
tail -n 12 "$OUT/gpu_photos.txt"


# --- (2) tests that import no TensorFlow ------------------------------------------------
# Not run here (they need TensorFlow / tf.data): at import, test_data_{augment,builders,
# pipeline}, test_analysis_commands, test_estimate_flip_shift, test_reliability,
# test_train, test_factored_recurrent; through a program they start, test_entry_points,
# test_evaluate, test_benchmark (its dial test; the benchmark itself is section 3).
# In order of importance (a timeout keeps what ran: pytest writes its reports on SIGINT).
TESTS=(
  tests/test_fast_inference.py tests/test_cascade.py tests/test_quit_head.py
  tests/test_losses_metrics.py tests/test_model_io.py tests/test_predictor.py
  tests/test_cluster.py tests/test_deploy.py tests/test_crop.py
  tests/test_ablation_options.py tests/test_cost.py tests/test_no_tensorflow.py
  tests/test_early_exit_policies.py
  tests/test_schemes.py tests/test_shape_stats.py tests/test_data_readers.py
  tests/test_compare_dlib.py tests/test_learning_curve.py tests/test_results_table.py
)
# Tests of those files that need TensorFlow (a name that no longer exists is ignored).
DESELECT=(
  # data_pipelines.augment must import TensorFlow
  --deselect tests/test_no_tensorflow.py::test_numpy_side_of_data_pipelines_and_model_entry_points_do_not_import_tensorflow
  # the tf.data evaluation pipeline (also skipped without ../shared/data)
  --deselect tests/test_predictor.py::test_crop_equals_eval_pipeline_on_real_300w
  --deselect tests/test_predictor.py::test_pil_decoding_matches_pipeline_decoding
  # training runs (tf.data): from a wheel, as a 2-task SLURM job
  --deselect tests/test_cluster.py::test_wheel_install_runs_the_users_command_outside_the_repository
  --deselect tests/test_cluster.py::test_slurm_recipe_forms_a_two_process_job
)
run_tests() {
  local present=() f
  for f in "${TESTS[@]}"; do [[ -f $f ]] && present+=("$f"); done
  # No preallocation: a few tests start a JAX subprocess while this process holds the GPU.
  XLA_PYTHON_CLIENT_PREALLOCATE=false tmo "$PY" -m pytest "${present[@]}" "${DESELECT[@]}" \
      --continue-on-collection-errors --junitxml="$OUT/gpu_tests.xml" \
      -p no:cacheprovider -o addopts="" -m "not slow" -q > "$OUT/gpu_tests.txt" 2>&1
}
section tests "$TESTS_S" "$PHOTOS_RESERVE_S" run_tests
tail -n 5 "$OUT/gpu_tests.txt"

# --- (3) model benchmark, GPU defaults --------------------------------------------------
# 68/68 and 68/19; inference at batch 1, 64, 4096; training at 128 and 1024; float32 and
# bfloat16; batch-1 latency; early exit. The JSON is written at the end; the progress
# lines (one per variant) are in gpu_benchmark.txt even when the timeout stops it.
run_benchmark() {
  tmo "$PY" -m experiments.benchmark --output_json="$OUT/gpu_benchmark.json" \
      > "$OUT/gpu_benchmark.txt" 2>&1
}
section benchmark "$BENCH_S" "$PHOTOS_RESERVE_S" run_benchmark
tail -n 5 "$OUT/gpu_benchmark.txt"

printf '%-10s %9d s\n' total $((SECONDS - START)) >> "$OUT/timing.txt"
cat "$OUT/timing.txt"
