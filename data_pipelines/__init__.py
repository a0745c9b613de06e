"""Input pipelines (TensorFlow / tensorflow-datasets live only here, never in musica_jax).

Importing this package hides every GPU from TensorFlow, so the host-side input pipeline
never grabs accelerator memory that JAX needs.
"""
try:
  import tensorflow as _tf
except ImportError:  # numpy-only modules (synthetic_faces, readers) still work.
  _tf = None
if _tf is not None:
  try:
    _tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    # Devices were already initialised (TF used before this import): nothing to hide now.
    pass
