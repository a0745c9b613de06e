"""The Table 4 ablation options: `extractor="inverted_bottleneck"` and
`global_attention="fc"|"gcn"` compute what they say, and work through the cascade's paths
(scanned, unrolled StageNet, fast early exit), training, export, the predictor and the
MAC / parameter counts."""
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from musica_jax import cascade
from musica_jax import config as config_lib
from musica_jax import cost
from musica_jax import fast_inference
from musica_jax import model_io
from musica_jax import predictor as predictor_lib
from musica_jax import pyramid
from musica_jax import schemes
from musica_jax import stage_net
from musica_jax import training

SMALL = config_lib.ModelConfig(num_landmarks=10, patch_indices=(0, 2, 4, 6, 8, 9),
                               hidden_size=64, image_size=64)
# Two configurations cover every new component; each test compiles a cascade, so the
# second one runs with the slow tests (python -m pytest -m slow).
OPTIONS = [("inverted_bottleneck", "gcn"), pytest.param("conv", "fc", marks=pytest.mark.slow)]


def _cfg(extractor, global_attention, base=SMALL, **kw):
  return config_lib.ModelConfig(**{**base.__dict__, "extractor": extractor,
                                   "global_attention": global_attention, **kw})


def _setup(cfg, batch, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  images = jax.random.normal(k1, (batch, cfg.image_size, cfg.image_size, 3))
  init = jax.random.uniform(k2, (cfg.num_landmarks, 2), minval=4, maxval=cfg.image_size - 4)
  params = stage_net.init_stacked(jax.random.key(seed + 1), cfg)
  # Error estimates that differ between faces, displacements of a few pixels.
  kernel = params["head"]["kernel"]
  params["head"]["kernel"] = kernel.at[:, :, -1].set(
      2.0 * jax.random.normal(k3, kernel.shape[:2]))
  bias = params["head"]["bias"]
  params["head"]["bias"] = bias.at[:, :-1].set(
      3.0 * jax.random.normal(jax.random.key(seed + 2), bias[:, :-1].shape))
  return params, images, init


def test_config_refuses_unknown_options():
  with pytest.raises(ValueError, match="extractor"):
    _cfg("resnet", "none")
  with pytest.raises(ValueError, match="global_attention"):
    _cfg("conv", "transformer")


# --- inverted bottleneck -------------------------------------------------------------------

def _reference_inverted_bottleneck_descriptor(params, patches):
  """NHWC with flax's own convolutions: [m, ps, ps, 3] -> [m, 256] (y, x, channel)."""
  def block(prefix, x):
    e, d, p = (params[f"{prefix}_{n}"] for n in ("expand", "depthwise", "project"))
    x = jax.nn.relu6(nn.Conv(e["kernel"].shape[1], (1, 1)).apply(
        {"params": {"kernel": e["kernel"][None, None], "bias": e["bias"]}}, x))
    c = x.shape[-1]
    x = jax.nn.relu6(nn.Conv(c, (3, 3), padding="VALID", feature_group_count=c).apply(
        {"params": {"kernel": d["kernel"][:, :, None, :], "bias": d["bias"]}}, x))
    return nn.Conv(p["kernel"].shape[1], (1, 1)).apply(
        {"params": {"kernel": p["kernel"][None, None], "bias": p["bias"]}}, x)
  x = nn.max_pool(block("ib1", patches), (2, 2), (2, 2))
  c2 = block("ib2", x)                                    # [m, 4, 4, 32]
  pooled = nn.max_pool(c2, (2, 2), (2, 2))                # [m, 2, 2, 32]
  desc = jnp.concatenate([c2[:, 1:3, 1:3], pooled], axis=-1)
  return desc.reshape(desc.shape[0], -1)


@pytest.mark.usefixtures("highest_precision")   # two compute paths: no TF32 (conftest.py)
def test_inverted_bottleneck_extractor_matches_flax_convolutions():
  cfg = config_lib.for_scheme("ibug68", 19, extractor="inverted_bottleneck",
                              use_attention=False)
  params = jax.tree.map(lambda x: x[0], stage_net.init_stacked(jax.random.key(3), cfg))
  # Biases non-zero so that every term is checked.
  params = jax.tree.map(lambda x: x + 0.05 if x.ndim == 1 else x, params)
  patches = jax.random.normal(jax.random.key(4), (7, 14, 14, 3))
  desc, _ = stage_net.patch_features(params, patches.transpose(3, 1, 2, 0), False)
  assert desc.shape == (7, cfg.descriptor_size) == (7, 256)
  ref = _reference_inverted_bottleneck_descriptor(params, patches)
  np.testing.assert_allclose(desc, ref, atol=1e-5, rtol=1e-4)
  assert float(jnp.abs(desc).mean()) > 1e-2   # the He init keeps the signal alive
  assert "conv1" not in params and "ib2_depthwise" in params


# --- global patch attention ----------------------------------------------------------------

def test_knn_adjacency_is_the_normalised_symmetric_k_nearest_graph():
  rng = np.random.default_rng(0)
  centres = rng.uniform(0, 100, (2, 9, 2)).astype(np.float32)
  k = 3
  adj = np.asarray(stage_net.knn_adjacency(jnp.asarray(centres), k))
  for b in range(2):
    d = np.linalg.norm(centres[b, :, None] - centres[b, None], axis=-1)
    np.fill_diagonal(d, np.inf)
    a = np.zeros((9, 9), bool)
    for i in range(9):
      a[i, np.argsort(d[i])[:k]] = True
    a = a | a.T | np.eye(9, dtype=bool)
    deg = a.sum(1)
    np.testing.assert_allclose(adj[b], a / np.sqrt(deg[:, None] * deg[None, :]), atol=1e-6)


def _attend(cfg, params, desc, centres):
  return stage_net.global_patch_attention(cfg, params, desc.reshape(desc.shape[0], -1),
                                          centres).reshape(desc.shape)


@pytest.mark.parametrize("kind", ["fc", "gcn"])
def test_global_attention_weights_each_patch_from_the_other_patches(kind):
  cfg = config_lib.ModelConfig(num_landmarks=8, patch_indices=tuple(range(8)),
                               hidden_size=16, global_attention=kind, gcn_neighbours=1)
  params = jax.tree.map(lambda x: x[0], stage_net.init_stacked(jax.random.key(0), cfg))
  params = jax.tree.map(lambda x: 3 * x, params)   # weights spread around sigmoid(0)
  desc = jax.random.normal(jax.random.key(1), (1, 8, cfg.descriptor_size))
  # A chain of patches on a line: with k=1 patch i's neighbours are i-1 and i+1.
  centres = jnp.stack([jnp.arange(8.0) ** 1.5, jnp.zeros(8)], -1)[None]
  out = _attend(cfg, params, desc, centres)
  ratio = out / desc                                 # the weight of each patch
  np.testing.assert_allclose(ratio, ratio[..., :1] * jnp.ones_like(ratio), rtol=1e-4)
  w = np.asarray(ratio[0, :, 0])
  assert np.all((w > 0) & (w < 1)) and w.std() > 1e-3
  # Changing patch 7's descriptor changes the weight of patch 0 (FC: every patch sees
  # every patch) or not (GCN, two layers: patch 0 sees patches up to two hops away, 1-2).
  moved = desc.at[0, 7].set(jax.random.normal(jax.random.key(2), (cfg.descriptor_size,)))
  w_moved = np.asarray((_attend(cfg, params, moved, centres) / moved)[0, :, 0])
  if kind == "fc":
    assert abs(w_moved[0] - w[0]) > 1e-4
  else:
    assert w_moved[0] == pytest.approx(w[0], abs=1e-6)
    assert abs(w_moved[5] - w[5]) > 1e-4            # two hops from 7
    moved2 = desc.at[0, 2].set(moved[0, 7])
    w2 = np.asarray((_attend(cfg, params, moved2, centres) / moved2)[0, :, 0])
    assert abs(w2[0] - w[0]) > 1e-4


def test_gcn_needs_the_patch_centres():
  cfg = _cfg("conv", "gcn")
  with pytest.raises(ValueError, match="centres"):
    stage_net.global_patch_attention(cfg, {"global_attention": {}}, jnp.zeros((1, 6 * 256)),
                                     None)


# --- through the cascade, training, export, predictor, cost --------------------------------

@pytest.mark.usefixtures("highest_precision")   # compares paths: no TF32 (conftest.py)
@pytest.mark.slow   # ~23 s on 2 cores; the default extractor's paths: test_fast_inference
@pytest.mark.parametrize("extractor,global_attention", OPTIONS)
def test_every_cascade_path_computes_the_same_function(extractor, global_attention,
                                                       monkeypatch):
  monkeypatch.setattr(cascade, "TARGET_CHUNK_PATCHES", 13)   # several chunks per batch
  cfg = _cfg(extractor, global_attention)
  params, images, init = _setup(cfg, batch=8)
  full = cascade.run_cascade_jit(params, images, init, cfg)
  # The unchunked StageNet module (flax apply) equals the chunked scanned stage.
  layout, _ = cascade.stage_inputs(cfg)
  atlas = pyramid.build_atlas(images, layout)
  shape = cascade.broadcast_init(init, 8, cfg)
  hidden = jnp.zeros((8, cfg.hidden_size))
  for i in range(cfg.num_stages):
    p_i, xs = cascade.stage_params(params, i), cascade.stage_xs(cfg, i)
    a = cascade.stage_step(cfg, p_i, atlas, shape, hidden, xs)
    b = cascade.stage_forward(cfg, p_i, atlas, shape, hidden, xs)
    for x, y in zip(a[:3], b[:3]):
      np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4)
    shape, hidden = b[0], b[1]
  np.testing.assert_allclose(shape, full.landmarks, atol=1e-4, rtol=1e-4)
  assert float(jnp.abs(full.shapes[-1] - init).max()) > 2      # the patches moved
  # The fast early-exit path equals the masked cascade for a threshold.
  e = np.sort(np.asarray(full.errors[:-1]).ravel())
  ts = float(e[len(e) // 2] + e[len(e) // 2 + 1]) / 2
  ref = cascade.run_cascade_jit(params, images, init, cfg, ts)
  assert len(set(np.asarray(ref.iterations).tolist())) > 1
  out = fast_inference.FastCascade(params, cfg).run(images, init, ts)
  np.testing.assert_array_equal(out.iterations, ref.iterations)
  np.testing.assert_allclose(out.landmarks, ref.landmarks, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("extractor,global_attention,rank",
                         [("inverted_bottleneck", "gcn", 0),
                          pytest.param("conv", "fc", 0, marks=pytest.mark.slow),
                          ("conv", "none", 16)])
def test_training_reduces_the_loss(extractor, global_attention, rank):
  """Each option trains (rank: a factored recurrent layer, `--recurrent_rank`)."""
  base = config_lib.for_scheme("ibug68", 19, image_size=64, hidden_size=64)
  cfg = _cfg(extractor, global_attention, base=base, recurrent_rank=rank)
  scheme = schemes.get_scheme(68)
  train_cfg = training.TrainConfig(learning_rate=3e-3)
  state = training.create_train_state(cfg, train_cfg)
  rng = np.random.default_rng(0)
  init = jnp.asarray(rng.uniform(16, 48, (68, 2)), jnp.float32)
  batch = {"image": jnp.asarray(rng.normal(size=(4, 64, 64, 3)), jnp.float32),
           "landmarks": init + jnp.asarray(rng.normal(0, 3, (4, 68, 2)), jnp.float32)}
  step = jax.jit(functools.partial(training.train_step, model_cfg=cfg, train_cfg=train_cfg,
                                   scheme=scheme))
  losses = []
  for _ in range(12):
    state, m = step(state, batch, init)
    losses.append(float(m["loss"]))
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.85 * losses[0], losses
  # The options' own parameters were trained.
  before = training.create_train_state(cfg, train_cfg).params
  names = (["global_attention"] if global_attention != "none" else []) + (
      ["ib1_expand", "ib2_depthwise"] if extractor == "inverted_bottleneck" else [])
  for name in names:
    assert float(optax.global_norm(state.params[name]["kernel"] - before[name]["kernel"])) > 0
  for k in ("u", "v") if rank else ():
    assert float(jnp.abs(state.params["recurrent"][k] - before["recurrent"][k]).max()) > 0


@pytest.mark.usefixtures("highest_precision")   # compares paths: no TF32 (conftest.py)
@pytest.mark.parametrize("extractor,global_attention", OPTIONS[:1])
def test_export_and_predictor_keep_the_options(extractor, global_attention, tmp_path):
  cfg = _cfg(extractor, global_attention,
             base=config_lib.for_scheme("ibug68", 19, hidden_size=32))
  params = jax.tree.map(np.asarray, stage_net.init_stacked(jax.random.key(5), cfg))
  mean = np.random.default_rng(2).uniform(60, 170, (68, 2)).astype(np.float32)
  model_io.save_model(tmp_path / "m", params, cfg, mean, {"name": "t"})
  assert json.loads((tmp_path / "m" / model_io.CONFIG_FILE).read_text())[
      "model_config"]["global_attention"] == global_attention
  loaded = model_io.load_model(tmp_path / "m")
  assert loaded.model_config == cfg
  pred = predictor_lib.Predictor.from_model_dir(tmp_path / "m", max_batch=2, min_batch=2)
  image = np.random.default_rng(3).integers(0, 255, (240, 240, 3), np.uint8)
  boxes = np.array([[40.0, 50.0, 200.0, 210.0]])
  got = pred.predict([image], [boxes])
  crops = pred.crops([image], [boxes])[0][:1]
  ref = cascade.run_cascade_jit(params, jnp.asarray(crops), mean, cfg)
  np.testing.assert_allclose(got.crop_landmarks, ref.landmarks, atol=1e-3, rtol=1e-4)
  assert float(np.abs(got.crop_landmarks - mean).max()) > 0.01     # the model moved them


@pytest.mark.parametrize("extractor,global_attention,rank",
                         [("inverted_bottleneck", "gcn", 0), ("conv", "fc", 0),
                          ("conv", "none", 8)])
def test_macs_and_parameters_count_the_options(extractor, global_attention, rank):
  """The MAC and parameter counts are what XLA and the parameter tree count (rank: a
  factored recurrent layer; its dense count would be ~30% more here)."""
  cfg = config_lib.for_scheme("ibug68", 19, extractor=extractor, recurrent_rank=rank,
                              global_attention=global_attention, levels=(0,))
  params = jax.eval_shape(lambda: stage_net.init_stacked(jax.random.key(0), cfg))
  assert cost.parameter_count(cfg) == sum(x.size for x in jax.tree.leaves(params))
  images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
  init = jax.ShapeDtypeStruct((cfg.num_landmarks, 2), jnp.float32)
  compiled = jax.jit(lambda p, i, s: cascade.run_cascade(p, i, s, cfg).landmarks).lower(
      params, images, init).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  assert analysis["flops"] / 2 == pytest.approx(cost.cascade_macs(cfg), rel=0.10)
  base = config_lib.for_scheme("ibug68", 19, levels=(0,))
  if rank:
    assert cost.cascade_macs(base) > 1.25 * cost.cascade_macs(cfg)
  else:
    assert cost.cascade_macs(cfg) > cost.cascade_macs(base)


def test_memory_column_is_the_weights_in_float32_and_as_shipped():
  """experiments.macs: MB = parameters x bytes; 'as shipped' is the default model's dtype,
  and the shipped model's params.npz is its row's size (plus archive headers)."""
  from experiments import macs  # noqa: PLC0415
  rows = macs.table()
  shipped = model_io.load_model(model_io.default_model_path())
  for name in ("68/68", "68/19", "68/19 global GCN", "68/23 phone (2 it., no local attention)"):
    r = rows[name]
    assert r["memory_mb_float32"] == pytest.approx(r["mparams"] * 4, rel=1e-3)
    assert r["shipped_dtype"] == shipped.dtype == "bfloat16"
    assert r["memory_mb_shipped"] == pytest.approx(r["mparams"] * 2, rel=1e-3)
  cfg = shipped.model_config
  name = f"{cfg.num_landmarks}/{cfg.num_patches}"
  if cfg.recurrent_rank:
    name += f" recurrent rank {cfg.recurrent_rank}"
  size = (model_io.default_model_path() / model_io.PARAMS_FILE).stat().st_size / 1e6
  assert size == pytest.approx(rows[name]["memory_mb_shipped"], rel=0.01)
  assert rows["68/23 phone (2 it., no local attention)"]["iterations"] == 2
