"""Model files record portable provenance: no absolute path of the machine that wrote them
(`musica_jax.provenance`), in the shipped model and in every model written."""
import json

import jax
import numpy as np

from musica_jax import config as config_lib
from musica_jax import model_io
from musica_jax import provenance
from musica_jax import quit_head


def test_known_paths_become_placeholders_everywhere_and_others_keep_their_name():
  meta = {"source": {"workdir": "/home/ann/runs/r1", "data": {"data_dir": "/data/300w"},
                     "steps": 1500, "split": "train_fit"},
          "evaluation": {"command": "python -m experiments.evaluate --workdir=/home/ann/runs/r1 "
                                    "--data_dir=/data/300w --output_json=/tmp/x/e.json",
                         "flagfile": "300w34.flags", "rel": "../shared/data/300w"}}
  out = provenance.portable(meta)
  assert out["source"]["workdir"] == "$WORKDIR" and out["source"]["steps"] == 1500
  assert out["source"]["data"]["data_dir"] == "$DATA_DIR"
  assert out["evaluation"]["command"] == ("python -m experiments.evaluate --workdir=$WORKDIR "
                                          "--data_dir=$DATA_DIR --output_json=<...>/e.json")
  assert out["evaluation"]["rel"] == "../shared/data/300w"       # relative: kept
  assert provenance.absolute_paths(out) == [] and provenance.absolute_paths(meta)
  # A path that merely starts like a known one is not taken for it.
  assert provenance.portable({"workdir": "/a/r1", "x": "/a/r10/f"})["x"] == "<...>/f"


def test_saved_models_and_the_shipped_model_hold_no_absolute_path(tmp_path):
  for name in ("model.json", "quit_head.json"):
    doc = json.loads((model_io.DEFAULT_MODEL_DIR / name).read_text())
    assert provenance.absolute_paths(doc) == [], name
  cfg = config_lib.ModelConfig(num_landmarks=10, patch_indices=(0, 2, 4), hidden_size=16,
                               image_size=32, levels=(1, 0))
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), model_io.param_template(cfg))
  meta = {"source": {"workdir": str(tmp_path / "run")}, "note": f"built in {tmp_path}/b"}
  model_io.save_model(tmp_path / "m", params, cfg, np.full((10, 2), 16.0), meta)
  model_io.set_default_t_fail(tmp_path / "m", 0.1,
                              {"command": f"choose_t_fail --model={tmp_path / 'm'}"})
  doc = json.loads((tmp_path / "m" / "model.json").read_text())
  assert provenance.absolute_paths(doc) == [] and str(tmp_path) not in json.dumps(doc)
  assert doc["metadata"]["source"]["workdir"] == "$WORKDIR"
  assert model_io.load_model(tmp_path / "m").default_t_fail == 0.1     # checksum still holds
  quit_head.save(tmp_path / "m", None, {"profile": [[1, 0]], "thresholds": [[0, 1]],
                                        "kind": "estimated_error",
                                        "command": f"fit --model={tmp_path / 'm'}"})
  qdoc = json.loads((tmp_path / "m" / "quit_head.json").read_text())
  assert provenance.absolute_paths(qdoc) == [] and qdoc["command"] == "fit --model=<...>/m"
