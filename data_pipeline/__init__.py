"""BraTS data pipeline: NIfTI cases in, sharded 2D slices out, readers back.

Nothing here imports jax, and TensorFlow / tensorflow-datasets / grain are
imported lazily inside the functions that need them.
"""
