"""Input pipelines (TensorFlow / tensorflow-datasets live only here, never in musica_jax).

TensorFlow is imported by the modules that build tf.data pipelines, through `tf_setup`
(which hides every GPU from it); importing the package or its numpy-only modules
(readers, sources, config, synthetic_faces) does not import TensorFlow.
"""
