"""A persistent cache of compiled XLA programs for a run (JAX's own cache).

A pipeline compiles the same program many times: every segmentation run and
seed of the evaluation trains one network shape (only the data and the
initial values differ, and those are arguments, not part of the program),
and a rerun of a finished workdir recompiles what it reloads. JAX's
persistent compilation cache keys a compiled program on its HLO and the
backend, so such a program compiles once per workdir and later ones are
loaded from disk (any stage whose programs match gains the same way).
Results are unchanged: a hit returns the executable the same HLO compiled to.

The user's own setting wins: with JAX_COMPILATION_CACHE_DIR set (or the
jax_compilation_cache_dir option already set) nothing is changed. A bucket
workdir (gs://...) gets no cache: the cache is local to the machine.
"""

from __future__ import annotations

import contextlib
import os

from absl import logging
import jax
from jax.experimental.compilation_cache import compilation_cache

from dfgm_jax import paths


def _set(directory: str | None, min_compile_s: float) -> None:
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
  # JAX decides once per process whether the cache is used: start afresh.
  compilation_cache.reset_cache()


@contextlib.contextmanager
def enabled(directory: str, min_compile_s: float | None = None):
  """Caches the block's compiled programs in `directory`, then restores the
  previous settings. Yields the directory in use (the user's when one was
  already set; '' when none: a bucket path).

  min_compile_s: cache only programs that took at least this long to compile
  (JAX's default, 1 s, when None).
  """
  old = (jax.config.jax_compilation_cache_dir,
         jax.config.jax_persistent_cache_min_compile_time_secs)
  if old[0] or paths.is_url(directory):
    yield old[0] or ""
    return
  os.makedirs(directory, exist_ok=True)
  _set(directory, old[1] if min_compile_s is None else min_compile_s)
  logging.info("compiled programs cached in %s", directory)
  try:
    yield directory
  finally:
    _set(*old)
