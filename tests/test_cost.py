import jax
import jax.numpy as jnp
import pytest

from musica_jax import cascade
from musica_jax import config as config_lib
from musica_jax import cost
from musica_jax import stage_net


@pytest.mark.parametrize("patches,attention", [(19, True), (34, False)])
def test_analytic_macs_match_xla_cost_analysis(patches, attention):
  # XLA's cost analysis counts a scan (while loop) body once, whatever the trip count,
  # so the whole jitted forward is checked on a one-iteration cascade; the analytic
  # count of S iterations is S times the per-iteration count.
  cfg = config_lib.for_scheme("ibug68", patches, use_attention=attention, levels=(0,))
  params = jax.eval_shape(lambda: stage_net.init_stacked(jax.random.key(0), cfg))
  images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
  init = jax.ShapeDtypeStruct((cfg.num_landmarks, 2), jnp.float32)
  compiled = jax.jit(lambda p, i, s: cascade.run_cascade(p, i, s, cfg).landmarks).lower(
      params, images, init).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0]
  xla_macs = analysis["flops"] / 2
  assert xla_macs == pytest.approx(cost.cascade_macs(cfg), rel=0.10)


def test_macs_table_matches_the_paper():
  from experiments import macs  # noqa: PLC0415
  rows = macs.table()
  assert set(rows) >= {"68/68", "68/34", "68/19", "98/98", "98/49", "98/44"}
  assert rows["68/68"]["mmacs"] == pytest.approx(95, rel=0.05)
  assert rows["68/19"]["mmacs"] == pytest.approx(26, rel=0.10)
  assert rows["98/98"]["mmacs"] == pytest.approx(138, rel=0.05)
  assert rows["68/68"]["mparams"] == pytest.approx(
      sum(x.size for x in jax.tree.leaves(stage_net.init_stacked(
          jax.random.key(0), config_lib.for_scheme("ibug68")))) / 1e6, rel=1e-3)
