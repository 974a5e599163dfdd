"""Local paths and bucket URLs (gs://...) behind the few file calls training needs.

Pods keep data and workdirs in buckets. `os` calls on 'gs://b/run' silently
make a local folder 'gs:/b/run' (and checkpoints vanish with the VM), so the
code that may see a URL goes through `etils.epath` (an orbax dependency): plain
pathlib for local paths, tf.io.gfile or fsspec for URLs. Binaries that write
with local file calls only refuse URLs up front (`require_local`).
"""

from __future__ import annotations

import os


def is_url(path: str) -> bool:
  """True for 'scheme://...' paths (gs://, s3://, ...)."""
  return "://" in str(path)


def absolute(path: str) -> str:
  """An absolute local path; URLs unchanged (os.path.abspath would mangle them)."""
  return str(path) if is_url(path) else os.path.abspath(path)


def require_local(path: str | None, flag: str) -> None:
  """Refuses a URL where a binary writes or reads with local file calls."""
  if path and is_url(path):
    raise ValueError(
        f"--{flag}={path}: this binary needs a local or mounted path (e.g. a "
        "gcsfuse mount, or copy it first with `gsutil -m cp -r`); bucket URLs "
        "work for training's --data_dir and --workdir and for the models and "
        "data that synthesis and export read")
