import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musica_jax import cascade
from musica_jax import config as config_lib
from musica_jax import losses
from musica_jax import pyramid
from musica_jax import stage_net

SMALL = config_lib.ModelConfig(num_landmarks=10, patch_indices=(0, 2, 4, 6, 8, 9),
                               hidden_size=64, image_size=64)


def run_cascade_unrolled(params, images, init_shape, config, ts=-np.inf, t_fail=np.inf):
  """Reference: a plain Python loop of `cascade.stage_step` over the stacked parameters."""
  b = images.shape[0]
  layout, xs = cascade.stage_inputs(config)
  atlas = pyramid.build_atlas(jnp.asarray(images, jnp.float32), layout)
  shape = cascade.broadcast_init(init_shape, b, config)
  hidden = jnp.zeros((b, config.hidden_size), jnp.float32)
  shapes, errors, atts, hiddens = [], [], [], []
  out_shape, out_hidden = shape, hidden
  out_err = np.full((b,), np.inf, np.float32)
  iters = np.zeros((b,), np.int32)
  done = np.zeros((b,), bool)
  for i in range(config.num_stages):
    p_i = jax.tree.map(lambda x: x[i], params)
    xs_i = jax.tree.map(lambda x: x[i], xs)
    shape, hidden, err, att = cascade.stage_step(config, p_i, atlas, shape, hidden, xs_i)
    for out, x in ((shapes, shape), (errors, err), (atts, att), (hiddens, hidden)):
      out.append(x)
    for f in range(b):
      if not done[f]:
        out_shape = out_shape.at[f].set(shape[f])
        out_hidden = out_hidden.at[f].set(hidden[f])
        out_err[f] = err[f]
        iters[f] += 1
        done[f] = err[f] < ts
  return cascade.CascadeOutput(
      shapes=jnp.stack(shapes), errors=jnp.stack(errors), attention=jnp.stack(atts),
      hiddens=jnp.stack(hiddens), scores=jnp.stack(errors), landmarks=out_shape,
      estimated_error=jnp.asarray(out_err), hidden=out_hidden, iterations=jnp.asarray(iters),
      valid=jnp.asarray(out_err < t_fail))


def _inputs(cfg, batch=5, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  images = jax.random.normal(k1, (batch, cfg.image_size, cfg.image_size, 3))
  init = jax.random.uniform(k2, (cfg.num_landmarks, 2), minval=10, maxval=cfg.image_size - 10)
  target = init + 3 * jax.random.normal(k3, (batch, cfg.num_landmarks, 2))
  return images, init, target


def _params(cfg, seed=1, error_spread=0.0):
  params = stage_net.init_stacked(jax.random.key(seed), cfg)
  if error_spread:
    # Make the error estimates differ between faces and stages.
    kernel = params["head"]["kernel"]
    k = jax.random.normal(jax.random.key(seed + 7), kernel.shape[:2]) * error_spread
    params["head"]["kernel"] = kernel.at[:, :, -1].set(k)
  return params


def test_linear_ramp_pyramid_and_patches_follow_the_coordinate_convention():
  size = 256
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  ramp = lambda x, y: 0.3 * x - 0.2 * y + 5.0
  image = jnp.asarray(np.stack([ramp(xx, yy)] * 3, -1))[None]
  layout = pyramid.AtlasLayout(size, 3)
  atlas = pyramid.build_atlas(image, layout)
  centre = jnp.asarray([[[130.3, 117.6]]])
  for level in range(3):
    patch = pyramid.sample_patches(atlas, centre, jnp.int32(level),
                                   jnp.asarray(layout.origins[level]),
                                   jnp.int32(layout.level_sizes[level]), 14)[0, 0, ..., 0]
    # Sample k of the grid sits at level-l pixel c_l + k - 6.5; map back to level 0.
    c_l = (np.asarray(centre[0, 0]) + 0.5) / 2 ** level - 0.5
    k = np.arange(14) - 6.5
    x0 = (c_l[0] + k + 0.5) * 2 ** level - 0.5
    y0 = (c_l[1] + k + 0.5) * 2 ** level - 0.5
    expected = ramp(x0[None, :], y0[:, None])
    np.testing.assert_allclose(patch, expected, atol=1e-3, err_msg=f"level {level}")


def test_patches_outside_the_image_read_zeros_and_clamp():
  layout = pyramid.AtlasLayout(32, 2)
  atlas = pyramid.build_atlas(jnp.ones((1, 32, 32, 3)), layout)
  far = pyramid.sample_patches(atlas, jnp.asarray([[[-500.0, 10.0]]]), jnp.int32(1),
                               jnp.asarray(layout.origins[1]), jnp.int32(16), 14)
  assert float(jnp.abs(far).max()) == 0.0
  inside = pyramid.sample_patches(atlas, jnp.asarray([[[15.5, 15.5]]]), jnp.int32(0),
                                  jnp.asarray(layout.origins[0]), jnp.int32(32), 14)
  np.testing.assert_allclose(inside, 1.0, atol=1e-6)


@pytest.mark.usefixtures("highest_precision")   # two compute paths: no TF32 (conftest.py)
@pytest.mark.parametrize("use_attention", [True, False])
def test_scan_equals_python_loop(use_attention):
  cfg = SMALL if use_attention else config_lib.ModelConfig(
      **{**SMALL.__dict__, "use_attention": False})
  images, init, _ = _inputs(cfg)
  params = _params(cfg, error_spread=0.5)
  full = cascade.run_cascade_jit(params, images, init, cfg)
  e = np.sort(np.asarray(full.errors).ravel())
  ts = float(e[len(e) // 2] + e[len(e) // 2 + 1]) / 2  # between two estimates: no ties
  for t in (-np.inf, ts):
    a = cascade.run_cascade_jit(params, images, init, cfg, t, 0.0)
    b = run_cascade_unrolled(params, images, init, cfg, t, 0.0)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                 atol=1e-5, rtol=1e-5)
  # The displacement of iteration i is scaled by 2^level (Eq. 1): the chain moves.
  assert float(jnp.abs(full.shapes[0] - init).max()) > 0


def test_update_follows_equation_one():
  """S1 = S0 + 4 d0, S2 = S1 + 2 d1, S3 = S2 + d2 for levels (2, 1, 0)."""
  cfg = SMALL
  images, init, _ = _inputs(cfg, batch=2)
  params = _params(cfg)
  # Constant displacement d per stage through the head bias, zero kernel.
  params["head"]["kernel"] = jnp.zeros_like(params["head"]["kernel"])
  bias = np.zeros(params["head"]["bias"].shape, np.float32)
  bias[:, :-1] = 1.0
  params["head"]["bias"] = jnp.asarray(bias)
  out = cascade.run_cascade_jit(params, images, init, cfg)
  for i, moved in enumerate((4, 6, 7)):
    np.testing.assert_allclose(out.shapes[i], jnp.broadcast_to(init + moved, out.shapes[i].shape),
                               atol=1e-5)


def test_masking_freezes_each_face_where_error_drops_below_ts():
  cfg = SMALL
  images, init, _ = _inputs(cfg, batch=16)
  params = _params(cfg, error_spread=2.0)
  full = cascade.run_cascade_jit(params, images, init, cfg)
  errors = np.asarray(full.errors)
  e = np.sort(errors.ravel())
  ts = float(e[len(e) * 2 // 5] + e[len(e) * 2 // 5 + 1]) / 2  # no ties with an estimate
  out = cascade.run_cascade_jit(params, images, init, cfg, ts, float(np.median(errors)))
  below = errors < ts
  quit_at = np.where(below.any(0), below.argmax(0), cfg.num_stages - 1)
  assert len(set(quit_at.tolist())) > 1, "test needs faces quitting at different iterations"
  np.testing.assert_array_equal(np.asarray(out.iterations), quit_at + 1)
  for f in range(16):
    np.testing.assert_allclose(out.landmarks[f], full.shapes[quit_at[f], f], atol=1e-6)
    assert float(out.estimated_error[f]) == pytest.approx(errors[quit_at[f], f], abs=1e-6)
  np.testing.assert_array_equal(out.valid, np.asarray(out.estimated_error) < np.median(errors))
  # Ts = -inf: everyone runs every iteration.
  everyone = cascade.run_cascade_jit(params, images, init, cfg)
  assert np.all(np.asarray(everyone.iterations) == cfg.num_stages)
  np.testing.assert_allclose(everyone.landmarks, full.shapes[-1])


def test_jitted_cascade_traces_once_for_a_fixed_shape():
  cfg = SMALL
  traces = []

  @functools.partial(jax.jit, static_argnames=("config",))
  def f(params, images, init, config, ts):
    traces.append(1)
    return cascade.run_cascade(params, images, init, config, ts).landmarks

  params = _params(cfg)
  for seed, ts in [(0, -np.inf), (1, 0.1), (2, 0.5)]:
    images, init, _ = _inputs(cfg, seed=seed)
    jax.block_until_ready(f(params, images, init, cfg, ts))
  assert len(traces) == 1


def test_gradients_are_finite_and_nonzero_for_every_parameter():
  cfg = SMALL
  images, init, target = _inputs(cfg, batch=4)
  params = _params(cfg)

  def loss_fn(p):
    out = cascade.run_cascade(p, images, init, cfg)
    return losses.cascade_loss(out.shapes, out.errors, target, (0, 9))[0]

  grads = jax.grad(loss_fn)(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g = np.asarray(g)
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(g)), name
    # Every stage's slice of every parameter gets gradient.
    for s in range(cfg.num_stages):
      assert np.abs(g[s]).max() > 0, f"{name} stage {s}"


def test_bad_inputs_raise_clear_errors():
  cfg = SMALL
  params = _params(cfg)
  with pytest.raises(ValueError, match="images must be"):
    cascade.run_cascade(params, jnp.zeros((1, 32, 32, 3)), jnp.zeros((10, 2)), cfg)
  with pytest.raises(ValueError, match="init_shape"):
    cascade.run_cascade(params, jnp.zeros((1, 64, 64, 3)), jnp.zeros((9, 2)), cfg)
  with pytest.raises(ValueError, match="patch_indices"):
    config_lib.ModelConfig(num_landmarks=5, patch_indices=(7,))
