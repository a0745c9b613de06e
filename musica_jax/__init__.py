"""musica-jax: MuSiCa face alignment (selective cascaded regression with patch attention)
in JAX.

    from musica_jax import Predictor, read_image
    predictor = Predictor.default()                  # the shipped 300W model
    pred = predictor.predict(read_image("face.jpg"), [x0, y0, x1, y1])
    pred.landmarks[0], pred.estimated_error[0], pred.valid[0]

The public names load on first use, so `import musica_jax.config` stays free of JAX.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_PUBLIC = {"Predictor": "predictor", "Prediction": "predictor",
           "PredictorStream": "predictor", "read_image": "images"}
__all__ = ["Prediction", "Predictor", "PredictorStream", "__version__", "read_image"]

if TYPE_CHECKING:
  from musica_jax.images import read_image
  from musica_jax.predictor import Prediction, Predictor, PredictorStream


def __getattr__(name: str):
  if name in _PUBLIC:
    value = getattr(importlib.import_module(f"musica_jax.{_PUBLIC[name]}"), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'musica_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
