"""dfgm_jax/compile_cache.py: one compile per program for a run's stages."""

import os

import jax
import jax.numpy as jnp
import pytest

from dfgm_jax import compile_cache


def _fresh_program(scale: float):
  # A new function object each time, as every segmentation run builds its own
  # step: JAX's in-memory cache (keyed on the function) cannot reuse it.
  def f(x):
    return jnp.tanh(x @ x.T) * scale
  return jax.jit(f)


@pytest.fixture
def hits():
  events = []
  listener = lambda name, **kw: events.append(name)  # noqa: E731
  jax.monitoring.register_event_listener(listener)
  yield events
  jax.monitoring.unregister_event_listener(listener)


def test_a_rebuilt_program_is_loaded_from_the_cache(tmp_path, hits):
  before = jax.config.jax_compilation_cache_dir
  x = jnp.ones((33, 17))
  with compile_cache.enabled(str(tmp_path / "c"), min_compile_s=0) as used:
    assert used == str(tmp_path / "c")
    _fresh_program(2.0).lower(x).compile()
    assert os.listdir(used), "nothing was written to the cache"
    hits.clear()
    _fresh_program(2.0).lower(x).compile()
    assert "/jax/compilation_cache/cache_hits" in hits
  # Restored for whatever runs next in the process.
  assert jax.config.jax_compilation_cache_dir == before


def test_the_users_cache_wins(tmp_path):
  mine = str(tmp_path / "mine")
  jax.config.update("jax_compilation_cache_dir", mine)
  try:
    with compile_cache.enabled(str(tmp_path / "run")) as used:
      assert used == mine
      assert jax.config.jax_compilation_cache_dir == mine
    assert not (tmp_path / "run").exists()
  finally:
    jax.config.update("jax_compilation_cache_dir", None)


def test_a_bucket_workdir_gets_no_cache():
  with compile_cache.enabled("gs://bucket/run/private/xla_cache") as used:
    assert used == ""
    assert not jax.config.jax_compilation_cache_dir
