"""Writing stage outputs safely, and knowing whether a stage is done (JAX-free).

Two rules every stage follows (DESIGN.md, "Errors" and "Data flow"):
- Nothing half-written where a reader would take it as complete: files are
  written to a temporary name and renamed (`write_json`, `write_bytes`,
  `replace_dir`).
- A workdir belongs to one run: a stage records the identity of what it
  made (the config sections and inputs that define it) in a small JSON file
  written last. `check_done` reuses a finished output of the same identity,
  and refuses one of another identity with the fields that differ, unless the
  user asked to overwrite.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from dfgm_jax import errors


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file and a rename."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
  except OSError as e:
    # A failed write (a full disk) leaves no partial file, and names the
    # file: a failing f.write raises an OSError without one.
    if os.path.exists(tmp):
      os.remove(tmp)
    if e.filename is None and e.errno is not None:
      raise OSError(e.errno, e.strerror, path) from e
    raise
  os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
  """Writes `text` atomically; an identical file is left untouched (a rerun
  that reuses a stage rewrites nothing)."""
  data = text.encode()
  try:
    with open(path, "rb") as f:
      if f.read() == data:
        return
  except OSError:
    pass
  write_bytes(path, data)


def write_json(path: str, obj: Any) -> None:
  """JSON with a one-space indent, written atomically."""
  write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def read_json(path: str) -> Any | None:
  """The JSON at `path`, or None when there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def replace_dir(tmp: str, final: str) -> None:
  """Moves a fully written folder `tmp` to `final`, replacing what was there."""
  if os.path.exists(final):
    old = f"{final}.old{os.getpid()}"
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, final)


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
  """'a.b: 1 -> 2' for each leaf where two JSON-like values differ."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new), key=str):
      name = f"{prefix}.{key}" if prefix else str(key)
      if key not in old:
        out.append(f"{name}: (absent) -> {new[key]!r}")
      elif key not in new:
        out.append(f"{name}: {old[key]!r} -> (absent)")
      else:
        out.extend(differences(old[key], new[key], name))
    return out
  if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
    old, new = list(old), list(new)
  return [] if old == new else [f"{prefix or 'value'}: {old!r} -> {new!r}"]


def normalise(obj: Any) -> Any:
  """A JSON round trip, so tuples and lists (and int keys) compare equal."""
  return json.loads(json.dumps(obj, sort_keys=True, default=str))


def mismatch_message(what: str, path: str, diffs: list[str], remedy: str) -> str:
  shown = "; ".join(diffs[:8]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 8 else "")
  return f"{path} holds {what} of another run ({shown}). {remedy}"


def check_done(record_path: str, identity: dict, *, what: str,
               overwrite: bool = False,
               remedy: str = "Pass --overwrite to replace it, or use another --workdir.",
               ) -> dict | None:
  """Whether a stage's output, marked by `record_path`, is done for `identity`.

  Returns:
    The stored record when it exists with the same identity (reuse it);
    None when there is none, or when `overwrite` is set (do the work).

  Raises:
    errors.RunMismatch: the record exists with another identity, naming the
      fields that differ.
  """
  record = read_json(record_path)
  if record is None or overwrite:
    return None
  diffs = differences(record.get("identity"), normalise(identity))
  if diffs:
    raise errors.RunMismatch(mismatch_message(what, os.path.dirname(record_path) or ".",
                                              diffs, remedy))
  return record


def mark_done(record_path: str, identity: dict, **extra: Any) -> dict:
  """Writes the stage record last: from now on the output counts as complete."""
  record = {"identity": normalise(identity), **normalise(extra)}
  write_json(record_path, record)
  return record
