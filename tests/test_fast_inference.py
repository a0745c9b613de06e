"""The restructured cascade and the early-exit fast paths compute the reference function.

`_frozen_*` below is a frozen copy of the first implementation (scan over stacked
parameters, atlas pyramid, [B, P, H, W, C] im2col StageNet with nn.Dense): the chunked,
channel-major, unrolled `cascade.run_cascade` must match it to 1e-5.
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musica_jax import cascade
from musica_jax import config as config_lib
from musica_jax import fast_inference
from musica_jax import layers
from musica_jax import pyramid
from musica_jax import stage_net

SMALL = config_lib.ModelConfig(num_landmarks=10, patch_indices=(0, 2, 4, 6, 8, 9),
                               hidden_size=64, image_size=64)

# Every test here compares two compute paths: float32 products at full float32 on every
# backend (GPUs default to TF32; see `highest_precision` in conftest.py).
pytestmark = pytest.mark.usefixtures("highest_precision")

# How far a threshold (Ts, Tf) stays from every score it is compared with. The same
# score computed at batch 16 and at batch 1 differs by up to 3e-6 in float32 (measured:
# the test's quit head, CPU); TF32 would move it by up to 7e-3, hence `highest_precision`.
THRESHOLD_MARGIN = 1e-4


# --- frozen reference (first implementation) ---------------------------------------------

def _frozen_sample(atlas, centres, level, origin, level_size, patch_size):
  c = atlas.shape[-1]
  scale = jnp.exp2(-level.astype(jnp.float32))
  top_left = (centres + 0.5) * scale - 0.5 - (patch_size - 1) / 2.0
  start = jnp.floor(top_left)
  frac = top_left - start
  win = patch_size + 1
  start = jnp.clip(start, -pyramid.PAD, level_size + pyramid.PAD - win).astype(jnp.int32)
  rows, cols = start[..., 1] + origin[0], start[..., 0] + origin[1]
  windows = lambda img, r, q: jax.vmap(
      lambda r1, q1: jax.lax.dynamic_slice(img, (r1, q1, 0), (win, win, c)))(r, q)
  w = jax.vmap(windows)(atlas, rows, cols)
  fx, fy = frac[..., 0][..., None, None, None], frac[..., 1][..., None, None, None]
  top = w[..., :-1, :-1, :] * (1 - fx) + w[..., :-1, 1:, :] * fx
  bottom = w[..., 1:, :-1, :] * (1 - fx) + w[..., 1:, 1:, :] * fx
  return top * (1 - fy) + bottom * fy


def _frozen_stage(cfg, params, patches, hidden):
  dense = lambda x, p: x @ p["kernel"] + p["bias"]
  conv = lambda x, p: (layers.im2col3x3(x) @ p["kernel"].reshape(-1, p["kernel"].shape[-1])
                       + p["bias"])
  b, p = patches.shape[:2]
  x = layers.max_pool2x2(nn.relu(conv(patches, params["conv1"])))
  c2 = nn.relu(conv(x, params["conv2"]))
  pooled = layers.max_pool2x2(c2)
  cy, cx = (c2.shape[-3] - 2) // 2, (c2.shape[-2] - 2) // 2
  desc = jnp.concatenate([c2[..., cy:cy + 2, cx:cx + 2, :], pooled[..., :2, :2, :]], -1)
  desc = desc.reshape(b, p, -1)
  if cfg.use_attention:
    att = nn.sigmoid(dense(desc, params["attention"]))
    desc, att_mean = desc * att, att.mean(-1)
  else:
    att_mean = jnp.ones((b, p))
  hidden = jnp.tanh(dense(jnp.concatenate([desc.reshape(b, -1), hidden], -1),
                          params["recurrent"]))
  out = dense(hidden, params["head"])
  return hidden, out[:, :-1].reshape(b, cfg.num_landmarks, 2), out[:, -1], att_mean


@functools.partial(jax.jit, static_argnames=("cfg",))
def _frozen_cascade(params, images, init, cfg, ts, t_fail):
  b = images.shape[0]
  layout, xs = cascade.stage_inputs(cfg)
  atlas = pyramid.build_atlas(images, layout)
  shape0 = jnp.broadcast_to(init, (b, cfg.num_landmarks, 2))
  hidden0 = jnp.zeros((b, cfg.hidden_size))

  def body(carry, inputs):
    p_i, x_i = inputs
    shape, hidden, fr = carry
    centres = jax.lax.stop_gradient(shape[:, list(cfg.patch_indices), :])
    patches = _frozen_sample(atlas, centres, x_i["level"], x_i["origin"], x_i["level_size"],
                             cfg.patch_size)
    hidden, disp, err, att = _frozen_stage(cfg, p_i, patches, hidden)
    shape = shape + x_i["step_scale"] * disp
    act = ~fr["done"]
    keep = lambda n, o: jnp.where(act.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
    fr = dict(shape=keep(shape, fr["shape"]), hidden=keep(hidden, fr["hidden"]),
              error=keep(err, fr["error"]), iterations=fr["iterations"] + act,
              done=fr["done"] | (act & (err < ts)))
    return (shape, hidden, fr), (shape, err, att, hidden)

  fr0 = dict(shape=shape0, hidden=hidden0, error=jnp.full((b,), jnp.inf),
             iterations=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool))
  (_, _, fr), (shapes, errors, att, hiddens) = jax.lax.scan(body, (shape0, hidden0, fr0),
                                                            (params, xs))
  return cascade.CascadeOutput(shapes=shapes, errors=errors, attention=att,
                               hiddens=hiddens, scores=errors,
                               landmarks=fr["shape"], estimated_error=fr["error"],
                               hidden=fr["hidden"], iterations=fr["iterations"],
                               valid=fr["error"] < t_fail)


# --- helpers --------------------------------------------------------------------------------

def _setup(cfg, batch, seed=0, spread=2.0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  images = jax.random.normal(k1, (batch, cfg.image_size, cfg.image_size, 3))
  init = jax.random.uniform(k2, (cfg.num_landmarks, 2), minval=-8, maxval=cfg.image_size + 8)
  params = stage_net.init_stacked(jax.random.key(seed + 1), cfg)
  kernel = params["head"]["kernel"]
  params["head"]["kernel"] = kernel.at[:, :, -1].set(
      jax.random.normal(k3, kernel.shape[:2]) * spread)
  # Displacements of a few pixels, so later iterations read patches elsewhere.
  bias = params["head"]["bias"]
  params["head"]["bias"] = bias.at[:, :-1].set(
      3.0 * jax.random.normal(jax.random.key(seed + 2), bias[:, :-1].shape))
  return params, images, init


def _ts_between_estimates(errors, lo=0.25, hi=0.6):
  """A threshold in the widest gap between the sorted values whose rank is in [lo, hi]
  of them: a comparison with it has the same outcome in every compute path (a midpoint
  at a fixed rank can sit within rounding noise of a value: the scores of this test's
  faces at one iteration span only ~2e-3)."""
  e = np.sort(np.asarray(errors, np.float64).ravel())
  i = int(len(e) * lo) + int(np.argmax(np.diff(e[int(len(e) * lo):int(len(e) * hi) + 1])))
  return float(e[i] + e[i + 1]) / 2


def _margin(values, threshold):
  return float(np.abs(np.asarray(values, np.float64) - threshold).min())


def _assert_tree_close(a, b, atol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               atol=atol, rtol=1e-5)


def _fresh_jit(cfg):
  """A new jit of run_cascade: traced now, under the current module settings."""
  return jax.jit(functools.partial(cascade.run_cascade, config=cfg))


@pytest.fixture
def small_chunks(monkeypatch):
  """Forces several face groups per chunked map (the batched code path)."""
  monkeypatch.setattr(cascade, "TARGET_CHUNK_PATCHES", 13)   # 2 faces of 6 patches
  return 2


# --- tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_attention", [True, False])
def test_run_cascade_matches_frozen_first_implementation(use_attention, small_chunks):
  cfg = SMALL if use_attention else config_lib.ModelConfig(
      **{**SMALL.__dict__, "use_attention": False})
  params, images, init = _setup(cfg, batch=8)
  full = cascade.run_cascade_jit(params, images, init, cfg)
  ts = _ts_between_estimates(full.errors)
  for t in (-np.inf, ts):
    ref = _frozen_cascade(params, images, init, cfg, t, ts)
    new = _fresh_jit(cfg)(params, images, init, ts=t, t_fail=ts)
    _assert_tree_close(new, ref)
  # The chain moved the patches (the test would be weak otherwise).
  assert float(jnp.abs(full.shapes[-1] - init).max()) > 5


def test_group_sizes_per_execution_mode():
  sizes = [(b, p) for b in (1, 3, 7, 8, 64, 128) for p in (6, 19, 68)]
  # "cpu": the largest divisor of the batch with at most TARGET_CHUNK_PATCHES patches.
  assert not cascade.one_batched_pass("cpu")
  target = cascade.TARGET_CHUNK_PATCHES
  group = functools.partial(cascade.face_group_size, execution="cpu")
  for b, p in sizes:
    k = group(b, p)
    assert b % k == 0 and (k == 1 or k * p <= target), (b, p, k)
    assert not any(b % d == 0 and d * p <= target for d in range(k + 1, b + 1)), (b, p, k)
  assert [group(b, 68) for b in (1, 3, 8, 64)] == [1, 1, 2, 2]
  assert group(64, 6) == 16 and group(7, 19) == 7
  # "accelerator": one batched pass, the whole batch in one group.
  assert cascade.one_batched_pass("accelerator")
  assert all(cascade.face_group_size(b, p, execution="accelerator") == b for b, p in sizes)
  # "auto" (the default) is one of the two, by backend; anything else is refused.
  assert cascade.one_batched_pass() == (jax.default_backend() != "cpu")
  with pytest.raises(ValueError, match="execution must be one of"):
    cascade.face_group_size(8, 6, execution="gpu")
  with pytest.raises(ValueError, match="execution must be one of"):
    config_lib.ModelConfig(execution="gpu")


def test_the_execution_mode_is_static_and_compiles_anew():
  """ModelConfig.execution is part of the static config: the same jitted function traced
  with another mode compiles another program (a global read at trace time would not)."""
  cfg = config_lib.ModelConfig(num_landmarks=10, patch_indices=(0, 2, 4, 6, 8, 9),
                               hidden_size=16, image_size=32, levels=(1, 0))
  params = stage_net.init_stacked(jax.random.key(0), cfg)
  images = jnp.zeros((64, 32, 32, 3))       # cpu: 4 groups of 16 faces
  init = jnp.full((10, 2), 16.0)
  texts = {}
  for mode in ("cpu", "accelerator"):
    run_cfg = dataclasses.replace(cfg, execution=mode)
    texts[mode] = cascade.run_cascade_jit.lower(params, images, init, run_cfg).as_text()
  assert texts["cpu"] != texts["accelerator"]


def test_gradients_match_the_frozen_implementation(small_chunks, monkeypatch):
  from musica_jax import losses
  cfg = SMALL
  params, images, init = _setup(cfg, batch=4)
  target = jnp.broadcast_to(init + 2.0, (4, cfg.num_landmarks, 2))

  def loss(run, p):
    out = run(p, images, init, cfg, -np.inf, np.inf)
    return losses.cascade_loss(out.shapes, out.errors, target, (0, 9))[0]

  g_ref = jax.jit(jax.grad(functools.partial(loss, _frozen_cascade)))(params)
  for remat_above in (0, 10 ** 9):        # rematerialised and stored intermediates
    monkeypatch.setattr(cascade, "REMAT_ABOVE_PATCHES", remat_above)
    g_new = jax.jit(jax.grad(functools.partial(loss, cascade.run_cascade)))(params)
    _assert_tree_close(g_new, g_ref, atol=1e-4)


def _check_early_exit(out, ref, n=None):
  n = out.landmarks.shape[0] if n is None else n
  np.testing.assert_array_equal(np.asarray(out.iterations), np.asarray(ref.iterations)[:n])
  np.testing.assert_array_equal(np.asarray(out.valid), np.asarray(ref.valid)[:n])
  for field in ("landmarks", "estimated_error", "hidden"):
    np.testing.assert_allclose(np.asarray(getattr(out, field)),
                               np.asarray(getattr(ref, field))[:n], atol=1e-5, rtol=1e-5,
                               err_msg=field)


def _random_quit_head(cfg, seed=7, units=8):
  """An untrained quit head with scores spread over faces (the rule, not its quality)."""
  d = cfg.hidden_size + 3
  k1, k2 = jax.random.split(jax.random.key(seed))
  s = cfg.num_stages
  return dict(w1=jax.random.normal(k1, (s, d, units)), b1=jnp.zeros((s, units)),
              w2=jax.random.normal(k2, (s, units)), b2=jnp.zeros((s,)),
              mean=jnp.zeros((s, d)), std=jnp.ones((s, d)), exp_output=jnp.zeros((s,)))


@pytest.mark.parametrize("with_head", [False, True])
def test_threshold_path_matches_the_masked_cascade(small_chunks, with_head):
  cfg = SMALL
  params, images, init = _setup(cfg, batch=16, seed=3)
  head = _random_quit_head(cfg) if with_head else None
  full = cascade.run_cascade_jit(params, images, init, cfg, quit_params=head)
  if with_head:   # centre each stage's scores so that faces quit at every iteration
    head["b2"] = head["b2"] - jnp.median(full.scores, axis=1)
    full = cascade.run_cascade_jit(params, images, init, cfg, quit_params=head)
  # Ts and Tf away from every score / final error they are compared with (a face within
  # rounding noise of Ts quits after 1 iteration in one path and runs 3 in the other).
  ts = _ts_between_estimates(full.scores[:-1])
  assert _margin(full.scores[:-1], ts) > THRESHOLD_MARGIN
  ref = cascade.run_cascade_jit(params, images, init, cfg, ts, quit_params=head)
  t_fail = _ts_between_estimates(ref.estimated_error, 0.3, 0.7)
  assert _margin(ref.estimated_error, t_fail) > THRESHOLD_MARGIN
  ref = cascade.run_cascade_jit(params, images, init, cfg, ts, t_fail, quit_params=head)
  its = np.asarray(ref.iterations)
  assert len(set(its.tolist())) == 3, "test needs faces quitting at every iteration"
  assert 0 < int(np.asarray(ref.valid).sum()) < 16
  fast = fast_inference.FastCascade(params, cfg, quit_params=head)
  _check_early_exit(fast.run(images, init, ts, t_fail), ref)
  _check_early_exit(fast.run(images, init, ts, t_fail, min_bucket=4), ref)
  # Batch 1, face by face: buckets {0, 1}, the iteration runs or it does not.
  for f in range(16):
    out = fast.run(images[f:f + 1], init, ts, t_fail)
    _check_early_exit(out, jax.tree.map(lambda x: x[f:f + 1], ref))
  # The masked program (every iteration for every face, results frozen where a face
  # quits; accelerators' choice for small batches) gives the same result, padding too.
  args = (fast.stage_params, fast.quit_params, images, init, cfg, jnp.float32(ts),
          jnp.float32(t_fail))
  _check_early_exit(fast_inference.run_selective(*args, masked=True), ref)
  padded = fast_inference.run_selective(*args, mask=np.arange(16) < 12, masked=True)
  _check_early_exit(jax.tree.map(lambda x: x[:12], padded), ref, n=12)
  assert np.all(np.asarray(padded.iterations)[12:] == 1)
  # Ts = -inf: every iteration, the full cascade's last shape.
  out = fast.run(images, init)
  np.testing.assert_allclose(out.landmarks, full.shapes[-1], atol=1e-5)
  assert np.all(np.asarray(out.iterations) == cfg.num_stages)


def test_small_threshold_batches_run_masked_on_accelerators_only():
  assert not fast_inference._masked(1, None, "cpu")
  assert fast_inference._masked(1, None, "gpu") and fast_inference._masked(4, None, "tpu")
  assert not fast_inference._masked(64, None, "gpu")
  assert not fast_inference._masked(2, (1, 1), "gpu")      # a budget keeps its capacities


@pytest.mark.parametrize("with_head", [False, True])
def test_budget_path_matches_the_masked_cascade_for_its_assignment(small_chunks, with_head):
  cfg = SMALL
  params, images, init = _setup(cfg, batch=16, seed=3)
  head = _random_quit_head(cfg) if with_head else None
  fast = fast_inference.FastCascade(params, cfg, quit_params=head)
  full = cascade.run_cascade_jit(params, images, init, cfg, quit_params=head)
  for caps in ((16, 16), (11, 5), (7, 0), (0, 0)):
    out = fast.run(images, init, capacities=caps)
    its = np.asarray(out.iterations)
    # Exactly the capacities, nested.
    assert [int((its >= i + 2).sum()) for i in range(2)] == list(caps)
    # Those that go on are the ones of highest score after the previous iteration.
    if 0 < caps[0] < 16:
      top = set(np.argsort(-np.asarray(full.scores[0]))[:caps[0]].tolist())
      assert set(np.flatnonzero(its >= 2).tolist()) == top
    ref = cascade.run_cascade_jit(params, images, init, cfg, quit_params=head,
                                  max_iterations=its)
    np.testing.assert_array_equal(np.asarray(ref.iterations), its)
    _check_early_exit(out, ref)


def test_budget_path_is_one_jitted_program():
  cfg = SMALL
  params, images, init = _setup(cfg, batch=8, seed=1)
  fast = fast_inference.FastCascade(params, cfg)
  args = (fast.stage_params, None, images, init)
  thresholds = dict(ts=jnp.float32(-np.inf), t_fail=jnp.float32(np.inf))
  compiled = fast_inference.run_selective.lower(*args, config=cfg, capacities=(5, 2),
                                                **thresholds).compile()
  out = compiled(*args, **thresholds)
  _check_early_exit(out, fast.run(images, init, capacities=(5, 2)))
  text = compiled.as_text()
  assert "sort" in text or "top" in text.lower()     # the top-k selection is inside
  with pytest.raises(ValueError, match="capacities"):
    fast.run(images, init, capacities=(3, 5))        # not nested


def test_bucket_sizes():
  assert fast_inference.bucket_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
  assert fast_inference.bucket_sizes(1) == (1,)
  assert fast_inference.bucket_sizes(48, 4) == (4, 8, 16, 32, 48)


def test_everyone_quits_after_the_first_iteration():
  cfg = SMALL
  params, images, init = _setup(cfg, batch=4)
  fast = fast_inference.FastCascade(params, cfg)
  out = fast.run(images, init, ts=np.inf)
  assert np.all(np.asarray(out.iterations) == 1)
  ref = cascade.run_cascade_jit(params, images, init, cfg, np.inf)
  _check_early_exit(out, ref)


def test_bf16_weights_stay_close():
  cfg = SMALL
  params, images, init = _setup(cfg, batch=2)
  a = fast_inference.FastCascade(params, cfg).run(images, init)
  b = fast_inference.FastCascade(params, cfg, weight_dtype=jnp.bfloat16).run(images, init)
  assert b.landmarks.dtype == jnp.float32
  scale = float(jnp.abs(a.landmarks - init).max())
  assert float(jnp.abs(a.landmarks - b.landmarks).max()) < 0.05 * scale


@pytest.mark.parametrize("batch", [1, 6])
def test_whole_batch_program_equals_the_masked_cascade(batch):
  """selective=False (no face can quit: every iteration on the whole batch, the program
  accelerators run without a dial) computes the full cascade."""
  cfg = SMALL
  params, images, init = _setup(cfg, batch=batch)
  stage_params = fast_inference.unstack_params(params)
  out = fast_inference.run_selective(stage_params, None, images, init, cfg, selective=False)
  ref = cascade.run_cascade_jit(params, images, init, cfg)
  _check_early_exit(out, ref)
  assert np.all(np.asarray(out.iterations) == cfg.num_stages)


def test_selective_program_choice():
  """Without a dial (ts = -inf, no capacities) the whole-batch program runs; any dial
  needs the selective one."""
  assert not fast_inference._selective(-np.inf, None)
  assert fast_inference._selective(0.01, None) and fast_inference._selective(-np.inf, (2, 1))
