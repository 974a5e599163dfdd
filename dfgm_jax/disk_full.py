"""A full disk, told apart from other errors whatever library met it (JAX-free).

Each writer reports ENOSPC its own way: Python an OSError with errno 28 (and
no file name when a `write` fails), orbax a `ValueError("RESOURCE_EXHAUSTED:
... local file \"<path>\" ... No space left on device")` from tensorstore,
tfds a `RuntimeError("Failed to finalize writing of split ...: <path>; No
space left on device")`. A binary turns each into one line,
`error: <path>: No space left on device`, where the path is the folder the
user chose, not the temporary file inside it that was being written.
"""

from __future__ import annotations

import errno
import os
import re

from dfgm_jax import errors

NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"
_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# What libraries write before renaming into place; a path is cut before it.
_TEMPORARY = re.compile(r"^(\.build|incomplete\..*|.*orbax-checkpoint-tmp.*|"
                        r".*\.tmp\d*|.*\.old\d+)$")
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')
_BARE_PATH = re.compile(r"(?:^|\s)(/[^\s;:\"']+)")


class DiskFull(errors.UserError):
  """The disk (or quota) holding `path` is full; nothing half-written is kept."""

  def __init__(self, path: str, why: str = NO_SPACE):
    self.path = path
    super().__init__(f"{path}: {why}")

  def __reduce__(self):
    return (DiskFull, (self.path,))


def _chain(exc: BaseException):
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    yield exc
    exc = exc.__cause__ or exc.__context__


def user_folder(path: str) -> str:
  """`path` cut before its first temporary component (orbax's, tfds's, ours)."""
  parts = path.rstrip("/").split("/")
  for i, part in enumerate(parts):
    if _TEMPORARY.match(part):
      return "/".join(parts[:i]) or "/"
  return path.rstrip("/") or "/"


def path_of(exc: BaseException) -> str | None:
  """The path a disk-full error names (None: not a full disk, or no path).

  Returns "" for a full disk whose error names no path.
  """
  for e in _chain(exc):
    if isinstance(e, DiskFull):
      return e.path
    if isinstance(e, OSError) and e.errno in _ERRNOS:
      return user_folder(os.fspath(e.filename)) if e.filename else ""
    text = str(e)
    if NO_SPACE in text or "[os_error_code='28']" in text:
      found = _QUOTED_PATH.search(text) or _BARE_PATH.search(text)
      return user_folder(found.group(1)) if found else ""
  return None


def as_disk_full(exc: BaseException, where: str) -> DiskFull | None:
  """A DiskFull naming `where` (the folder being written) when `exc` is one."""
  if path_of(exc) is None:
    return None
  return DiskFull(where)
