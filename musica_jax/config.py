"""Model, training and loop configuration: plain frozen dataclasses (hashable, so they can
be static jit args). No JAX import: the flag definitions (experiments/config_flags.py) read
them in every entry point."""
from __future__ import annotations

import dataclasses
import numbers

from musica_jax import face_frame
from musica_jax import schemes


COMPUTE_DTYPES = ("float32", "bfloat16")
EXTRACTORS = ("conv", "inverted_bottleneck")
GLOBAL_ATTENTIONS = ("none", "fc", "gcn")
EXECUTIONS = ("auto", "cpu", "accelerator")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape of a MuSiCa cascade.

  Attributes:
    num_landmarks: N, landmarks regressed by every iteration.
    patch_indices: landmarks that carry a patch (P of them, P <= N).
    levels: pyramid level read by each iteration (0 = full resolution). The paper's
      coarse-to-fine cascade is (2, 1, 0); its length is the number of iterations.
    patch_size: side of the square patches (14 in the paper).
    conv_features: channels of both convolutions (32).
    hidden_size: recurrent state size (512).
    use_attention: local patch attention on/off (ablation, paper Table 4).
    extractor: per-patch feature extractor (paper Table 4): "conv" (two 3x3 convolutions,
      the paper's model) or "inverted_bottleneck" (each conv replaced by a MobileNetV2
      block: 1x1 expand x`ib_expansion`, ReLU6, depthwise 3x3 VALID, ReLU6, linear 1x1
      project; the same 256-d descriptor).
    global_attention: a weighting of each patch descriptor computed from all patches of
      the face (paper Table 4): "none", "fc" (sigmoid(FC(all descriptors) -> P)) or "gcn"
      (two graph-convolution layers over the `gcn_neighbours` nearest patches on the
      current shape estimate -> sigmoid, one weight per patch).
    ib_expansion: expansion factor of the inverted bottlenecks (MobileNetV2: 6).
    gcn_neighbours: k of the patch graph (k nearest patch centres, plus self loops).
    gcn_hidden: width of the GCN's first layer (per patch).
    image_size: side of the square level-0 face crop.
    init_std: truncated-normal std of every weight (reference notes: 0.01).
    recurrent_rank: 0 (the paper's model): the recurrent FC is one dense kernel
      [P*D + H, H]. r >= 1: a factored kernel u [P*D + H, r] @ v [r, H] (params "u", "v",
      "bias"), computed as (x @ u) @ v: r (P*D + 2H) multiply-adds instead of
      (P*D + H) H. At most min(P*D + H, H). A factored model can be fine-tuned from a
      dense one (`musica_jax.factorise`, training's --init_from).
    stage_patches: () (every iteration reads all P patches, the paper's) or one count per
      iteration: iteration i reads k_i of the P patches, spread evenly over the patch list
      (`stage_patch_positions`); the others' descriptors enter its recurrent FC as zeros.
      Cheap early iterations (e.g. 9, 17, 34 of 34 patches) make the whole cascade cheaper
      where coarse steps need few patches. The parameters are those of all P patches, so
      a model can be fine-tuned to it from one without (training's --init_from).
    compute_dtype: "float32", or "bfloat16": the network's products take bf16 operands
      and accumulate in float32 (parameters, loss and optimizer stay float32). An
      execution choice, not part of the trained model: training sets it from
      TrainConfig.compute_dtype; saved models and run configs keep "float32".
    execution: where the per-patch network's layout is tuned for (an execution choice
      too, static: changing it compiles anew): "cpu" (chunked over groups of faces, so
      intermediates stay in cache), "accelerator" (one batched pass over every patch),
      "auto" (by the default backend at trace time; what saved models keep).
  """
  num_landmarks: int = 68
  patch_indices: tuple[int, ...] = tuple(range(68))
  levels: tuple[int, ...] = (2, 1, 0)
  patch_size: int = 14
  conv_features: int = 32
  hidden_size: int = 512
  use_attention: bool = True
  extractor: str = "conv"
  global_attention: str = "none"
  ib_expansion: int = 6
  gcn_neighbours: int = 4
  gcn_hidden: int = 64
  image_size: int = face_frame.CROP_SIZE
  init_std: float = 0.01
  compute_dtype: str = "float32"
  recurrent_rank: int = 0
  execution: str = "auto"
  stage_patches: tuple[int, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "patch_indices", tuple(int(i) for i in self.patch_indices))
    object.__setattr__(self, "levels", tuple(int(l) for l in self.levels))
    object.__setattr__(self, "stage_patches", tuple(int(k) for k in self.stage_patches))
    if (not self.patch_indices or max(self.patch_indices) >= self.num_landmarks
        or min(self.patch_indices) < 0):
      raise ValueError(f"patch_indices must be non-empty indices into {self.num_landmarks} "
                       f"landmarks")
    if not self.levels or min(self.levels) < 0:
      raise ValueError(f"levels must be non-negative pyramid levels, got {self.levels}")
    if self.image_size % (2 ** max(self.levels)):
      raise ValueError(f"image_size {self.image_size} must be divisible by 2^{max(self.levels)}")
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
    if self.execution not in EXECUTIONS:
      raise ValueError(f"execution must be one of {EXECUTIONS}, got {self.execution!r}")
    if self.extractor not in EXTRACTORS:
      raise ValueError(f"extractor must be one of {EXTRACTORS}, got {self.extractor!r}")
    if self.global_attention not in GLOBAL_ATTENTIONS:
      raise ValueError(f"global_attention must be one of {GLOBAL_ATTENTIONS}, "
                       f"got {self.global_attention!r}")
    if min(self.ib_expansion, self.gcn_neighbours, self.gcn_hidden) < 1:
      raise ValueError("ib_expansion, gcn_neighbours and gcn_hidden must be positive")
    if self.patch_size < 14:
      raise ValueError("patch_size must be at least 14 (two 3x3 convs and two 2x2 pools)")
    top = min(self.recurrent_input_size, self.hidden_size)
    rank = self.recurrent_rank
    if (isinstance(rank, bool) or not isinstance(rank, numbers.Integral)
        or not 0 <= rank <= top):
      raise ValueError(f"recurrent_rank must be 0 (dense) or 1..{top} (min of the recurrent "
                       f"layer's {self.recurrent_input_size} inputs and {self.hidden_size} "
                       f"outputs), got {rank!r}")
    object.__setattr__(self, "recurrent_rank", int(rank))
    ks = self.stage_patches
    if ks and (len(ks) != self.num_stages or min(ks) < 1 or max(ks) > self.num_patches):
      raise ValueError(f"stage_patches must be empty or {self.num_stages} counts (one per "
                       f"iteration) in 1..{self.num_patches} (the patches), got {ks}")
    if ks and self.global_attention != "none" and min(ks) < self.num_patches:
      raise ValueError("stage_patches needs global_attention='none' (a global attention "
                       "weighs every patch of the face)")
    if ks and min(ks) == self.num_patches:      # every iteration reads all: the plain model
      object.__setattr__(self, "stage_patches", ())

  @property
  def num_patches(self) -> int:
    return len(self.patch_indices)

  @property
  def num_stages(self) -> int:
    return len(self.levels)

  @property
  def patches_per_stage(self) -> tuple[int, ...]:
    """Patches each iteration reads (all P unless `stage_patches`)."""
    return self.stage_patches or (self.num_patches,) * self.num_stages

  def stage_patch_positions(self, stage: int) -> tuple[int, ...]:
    """Positions (into patch_indices) of the patches iteration `stage` reads: all, or
    k evenly spaced over the list (the nearest position to each of k equal steps from the
    first patch to the last), so every part of the face keeps some."""
    p, k = self.num_patches, self.patches_per_stage[stage]
    if k >= p:
      return tuple(range(p))
    if k == 1:
      return (0,)
    return tuple(int(i) for i in sorted({int(x + 0.5) for x in (
        j * (p - 1) / (k - 1) for j in range(k))}))

  @property
  def descriptor_size(self) -> int:
    """Per-patch descriptor: (centre 2x2 of conv2 ++ pool2) x channels, = 256 by default."""
    return 2 * 2 * 2 * self.conv_features

  @property
  def recurrent_input_size(self) -> int:
    """Inputs of the recurrent FC: all P descriptors and the hidden state, P*D + H."""
    return self.num_patches * self.descriptor_size + self.hidden_size


def for_scheme(scheme: str | schemes.LandmarkScheme, num_patches: int | None = None,
               **overrides) -> ModelConfig:
  """ModelConfig for a landmark scheme and one of its patch subsets (default: all)."""
  if not isinstance(scheme, schemes.LandmarkScheme):
    scheme = schemes.get_scheme(scheme)
  num_patches = num_patches or scheme.num_points
  return ModelConfig(num_landmarks=scheme.num_points,
                     patch_indices=scheme.patch_indices(num_patches), **overrides)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation settings (reference notes: Adam 1e-3, x0.1 every 15000 steps, EMA 0.9999)."""
  steps: int = 30000
  learning_rate: float = 1e-3
  decay_steps: int = 15000
  decay_factor: float = 0.1
  ema_decay: float = 0.9999
  seed: int = 0
  # "bfloat16": the forward and backward products in bf16 with float32 accumulation;
  # parameters, EMA, loss and Adam stay float32 (ModelConfig.compute_dtype).
  compute_dtype: str = "float32"
  # "staircase": the paper's (x decay_factor every decay_steps); "cosine": linear warm-up
  # from 0 over warmup_steps, then cosine decay to learning_rate x decay_factor at `steps`.
  lr_schedule: str = "staircase"
  warmup_steps: int = 0
  # A model to start a new run from (`model_io.load`: a model directory, "default" or a
  # workdir; "": a random initialisation). Read by experiments/train_lib.py when the
  # workdir has no checkpoint (`musica_jax.factorise.convert_params`: a dense recurrent
  # kernel becomes the truncated SVD of the run's recurrent_rank).
  init_from: str = ""
  # The landmark loss of iteration i weighted by iteration_weights[i] (scaled to sum to the
  # number of iterations; `losses.cascade_loss`); (): all 1, the paper's loss. Weights
  # that favour early iterations train the cascade's prefixes for the budget dial.
  iteration_weights: tuple[float, ...] = ()
  # With ModelConfig.stage_patches: every this many steps (step % k == 0) the cascade is
  # trained reading all patches at every iteration instead, so the one set of weights
  # serves both (the dial may then run the cheap schedule or the full one); 0: never.
  all_patches_every: int = 0
  # Only these iterations' (stages') parameters are updated; (): all. With
  # ModelConfig.stage_patches and the last stage frozen, a run trains a cheap schedule's own
  # early stages beside a model whose weights stay as they are (`schedules.attach_stages`).
  train_stages: tuple[int, ...] = ()

  def __post_init__(self):
    try:
      stages = tuple(int(k) for k in self.train_stages)
    except (TypeError, ValueError) as e:
      raise ValueError(f"train_stages must be stage indices, got {self.train_stages!r}") from e
    if any(k < 0 for k in stages) or len(set(stages)) != len(stages):
      raise ValueError(f"train_stages must be distinct non-negative stage indices, got {stages}")
    object.__setattr__(self, "train_stages", stages)
    if isinstance(self.all_patches_every, bool) or not (
        isinstance(self.all_patches_every, numbers.Integral) and self.all_patches_every >= 0):
      raise ValueError(f"all_patches_every must be a non-negative integer, got "
                       f"{self.all_patches_every!r}")
    try:
      weights = tuple(float(w) for w in self.iteration_weights)
    except (TypeError, ValueError) as e:
      raise ValueError(f"iteration_weights must be numbers, got {self.iteration_weights!r}") from e
    if weights and (min(weights) < 0 or not sum(weights) > 0
                    or not all(w < float("inf") for w in weights)):
      raise ValueError(f"iteration_weights must be finite, non-negative and not all zero, "
                       f"got {weights}")
    object.__setattr__(self, "iteration_weights", weights)


LR_SCHEDULES = ("staircase", "cosine")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """Cadence of the training loop (experiments/train_lib.py), recorded in run_config.json
  ("loop"); not part of the optimisation, so a resumed run may change it."""
  log_every: int = 50            # steps between progress lines (and divergence checks)
  eval_every: int = 1000         # steps between evaluations; 0: only at the end; -1: never
  checkpoint_every: int = 500
  keep_checkpoints: int = 3      # the latest kept, plus the best by eval NME
  divergence_factor: float = 10.0  # DivergenceGuard's factor; 0 = off
