"""TensorFlow for the input pipeline, imported here first so that it never takes an
accelerator: every GPU is hidden from TensorFlow (JAX needs their memory).

Only the tf.data / tensorflow-datasets modules import this; the numpy-only modules
(readers, sources, config, synthetic_faces) stay importable without TensorFlow, so the
model-side entry points (predict, compare_dlib) can use the one `.pts` reader on GPU
hosts that have no TensorFlow.
"""
import tensorflow as tf

try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:
  # Devices were already initialised (TF used before this import): nothing to hide now.
  pass

__all__ = ["tf"]
