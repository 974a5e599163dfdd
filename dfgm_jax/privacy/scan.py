"""Scan of what would be shared for private identifiers (issue 14).

A synthetic set, G2's export and card, summaries and figures leave the
center; none may carry a raw case id, a patient id, a local path or the
salt of the pseudonyms. This module lists those identifiers from the
preprocessed slices' manifest and searches every byte of the files that
would be shared for them, decoding what a plain byte search would miss:

  array_record shards  each record (the shards are compressed)
  zip (.npz)           each member's name and data
  gzip                 the decompressed stream
  PNG                  its text chunks (tEXt, zTXt, iTXt: the metadata)
  anything else        the raw bytes, read in blocks

What is private (what the scan looks for):
  case id      every case of the manifest (`cases`, `slices`): BraTS folder
               names such as BraTS20_Training_001, also of public-split
               cases (the healthy bank's slices are pseudonymised too);
  patient id   the other ids of name_mapping.csv beside the raw data when it
               is readable (BraTS 2017-2019 subject ids, TCGA/TCIA ids);
  path         the raw data folder, skipped files, the workdir and data
               folders given by the caller (and their real paths);
  salt         the center's salt: with it anybody could test a guessed case
               id against a pseudonym.
Center names (CBICA, TCIA) are public labels that name the splits
(`CBICA_synthetic`) and the examples' `center`: not private, not looked for.
Identifiers shorter than MIN_LENGTH bytes are dropped (chance matches in
binary data).
"""

from __future__ import annotations

import csv
import gzip
import os
import re
import struct
import zipfile
import zlib
from typing import Iterable, Iterator

MIN_LENGTH = 6
BLOCK = 8 << 20
_PREFIX = 6
_PNG = b"\x89PNG\r\n\x1a\n"
_ID_COLUMN = re.compile(r"(subject_?id|_id)$", re.I)


def _token(kind: str, value) -> dict | None:
  value = str(value or "").strip()
  if len(value.encode()) < MIN_LENGTH or value.upper() == "NA":
    return None
  return {"kind": kind, "value": value}


def _mapping_ids(brats_dir: str) -> Iterator[str]:
  """Patient ids of name_mapping.csv in or below brats_dir (one level)."""
  candidates = [os.path.join(brats_dir, "name_mapping.csv")]
  try:
    candidates += [os.path.join(brats_dir, d, "name_mapping.csv")
                   for d in sorted(os.listdir(brats_dir))]
  except OSError:
    return
  for path in candidates:
    if not os.path.isfile(path):
      continue
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
      for row in csv.DictReader(f):
        for column, value in row.items():
          if column and _ID_COLUMN.search(column.strip()):
            yield value


def private_tokens(manifest: dict, *, salt: str | None = None,
                   paths: Iterable[str] = ()) -> list[dict]:
  """The private identifiers to look for: [{"kind", "value"}], deduplicated.

  Args:
    manifest: the preprocessed slices' manifest.json.
    salt: the center's salt (None: not looked for).
    paths: further local paths (workdir, data folders).
  """
  found = []
  for case in manifest.get("cases", []):
    found.append(_token("case id", case.get("case_id")))
  for entries in manifest.get("slices", {}).values():
    found += [_token("case id", e[0]) for e in entries]
  brats_dir = manifest.get("brats_dir")
  all_paths = [brats_dir, *paths, *(s.get("path") for s in manifest.get("skipped", []))]
  for p in all_paths:
    if p:
      found.append(_token("path", p.rstrip("/")))
      found.append(_token("path", os.path.realpath(p).rstrip("/")))
  if brats_dir and os.path.isdir(brats_dir):
    found += [_token("patient id", v) for v in _mapping_ids(brats_dir)]
  found.append(_token("salt", salt))
  out, seen = [], set()
  for t in found:
    if t and t["value"] not in seen:
      seen.add(t["value"])
      out.append(t)
  return out


class _Matcher:
  """All occurrences of many byte strings, one pass per distinct prefix."""

  def __init__(self, tokens: list[dict]):
    self.groups = {}
    for t in tokens:
      b = t["value"].encode()
      self.groups.setdefault(b[:_PREFIX], []).append((b, t))
    self.longest = max((len(t["value"].encode()) for t in tokens), default=1)

  def find(self, data: bytes, limit: int | None = None) -> Iterator[tuple[int, dict]]:
    """(offset, token) of every match starting before `limit` (default: anywhere)."""
    limit = len(data) if limit is None else limit
    for prefix, group in self.groups.items():
      pos = data.find(prefix)
      while pos != -1 and pos < limit:
        for b, t in group:
          if data.startswith(b, pos):
            yield pos, t
        pos = data.find(prefix, pos + 1)


def scan_bytes(data: bytes, tokens: list[dict], where: str = "bytes") -> list[dict]:
  """Hits in one byte string: [{"where", "kind", "matched", "count", "offset"}]."""
  return _collect(((where, off, t) for off, t in _Matcher(tokens).find(data)))


def _collect(matches) -> list[dict]:
  hits = {}
  for where, off, t in matches:
    key = (where, t["value"])
    if key in hits:
      hits[key]["count"] += 1
    else:
      hits[key] = {"where": where, "kind": t["kind"], "matched": t["value"], "count": 1,
                   "offset": int(off)}
  return list(hits.values())


def _stream(path: str, matcher: _Matcher) -> Iterator[tuple[str, int, dict]]:
  """Raw bytes of a file in blocks, overlapping by the longest token."""
  overlap = matcher.longest - 1
  with open(path, "rb") as f:
    base, carry = 0, b""
    while True:
      block = f.read(BLOCK)
      data = carry + block
      last = not block
      # Matches starting in the overlap are found in the next block.
      limit = len(data) if last else max(len(data) - overlap, 0)
      for off, t in matcher.find(data, limit):
        yield "raw bytes", base + off, t
      if last:
        return
      carry = data[limit:]
      base += limit


def png_text(data: bytes) -> Iterator[tuple[str, bytes]]:
  """(chunk description, text bytes) of a PNG's tEXt, zTXt and iTXt chunks."""
  pos = len(_PNG)
  while pos + 8 <= len(data):
    (length,) = struct.unpack(">I", data[pos:pos + 4])
    kind = data[pos + 4:pos + 8]
    body = data[pos + 8:pos + 8 + length]
    pos += 12 + length
    if kind not in (b"tEXt", b"zTXt", b"iTXt"):
      continue
    key, _, rest = body.partition(b"\0")
    name = f"PNG {kind.decode()} chunk {key.decode('latin-1')!r}"
    try:
      if kind == b"zTXt":
        rest = zlib.decompress(rest[1:])
      elif kind == b"iTXt":
        flag, rest = rest[0], rest[2:]
        _, _, rest = rest.partition(b"\0")  # language tag
        _, _, rest = rest.partition(b"\0")  # translated keyword
        if flag:
          rest = zlib.decompress(rest)
    except (zlib.error, IndexError):
      pass  # undecodable: its raw bytes are searched.
    yield name, key + b"\0" + rest


def _array_records(path: str) -> Iterator[tuple[str, bytes]]:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  reader = array_record_module.ArrayRecordReader(path)
  try:
    for i, record in enumerate(reader.read_all()):
      yield f"record {i}", record
  finally:
    reader.close()


def _zip_members(path: str) -> Iterator[tuple[str, bytes]]:
  with zipfile.ZipFile(path) as z:
    for info in z.infolist():
      yield f"zip member name {info.filename!r}", info.filename.encode()
      with z.open(info) as f:
        yield f"zip member {info.filename!r}", f.read()


def scan_file(path: str, matcher: _Matcher, metadata_only: bool = False) -> list[dict]:
  """Hits in one file, decoded by its kind (see the module docstring)."""
  with open(path, "rb") as f:
    head = f.read(8)
  if head.startswith(_PNG):
    with open(path, "rb") as f:
      parts = list(png_text(f.read()))
  elif metadata_only:
    return []
  elif ".array_record" in os.path.basename(path):
    try:
      parts = list(_array_records(path))
    except Exception:  # pylint: disable=broad-except
      parts = []  # not readable as array_record (altered, truncated).
    # The raw bytes too: what was appended to a shard is in no record.
    return _collect([*((w, off, t) for w, data in parts for off, t in matcher.find(data)),
                     *_stream(path, matcher)])
  elif head.startswith(b"PK\x03\x04"):
    parts = _zip_members(path)
  elif head.startswith(b"\x1f\x8b"):
    with gzip.open(path) as f:
      parts = [("gzip content", f.read())]
  else:
    return _collect(_stream(path, matcher))
  return _collect((where, off, t) for where, data in parts
                  for off, t in matcher.find(data))


def _files(root: str) -> Iterator[str]:
  if os.path.isfile(root):
    yield root
    return
  for d, dirs, names in os.walk(root):
    dirs.sort()
    for n in sorted(names):
      p = os.path.join(d, n)
      if os.path.isfile(p) and not os.path.islink(p):
        yield p


def scan(targets: dict, tokens: list[dict], figures: Iterable[str] = ()) -> dict:
  """Scans every file of `targets` (name -> file or folder; missing ones are
  listed, not scanned) and the PNG metadata of `figures` (folders).

  Returns:
    {"targets": name -> "scanned" | "missing", "files_scanned", "bytes_scanned",
     "tokens": kind -> how many values, "n_tokens", "hits": [{"file" (relative
     to the target's parent folder), "target", "where", "kind", "matched",
     "count", "offset"}]}.
  """
  matcher = _Matcher(tokens)
  out = {"targets": {}, "files_scanned": 0, "bytes_scanned": 0, "hits": [],
         "n_tokens": len(tokens), "tokens": {}}
  for t in tokens:
    out["tokens"][t["kind"]] = out["tokens"].get(t["kind"], 0) + 1
  seen = set()
  jobs = [(name, root, False) for name, root in targets.items()]
  jobs += [(f"figures {os.path.basename(os.path.normpath(d))}", d, True) for d in figures]
  for name, root, metadata_only in jobs:
    if not root or not os.path.exists(root):
      out["targets"][name] = "missing"
      continue
    out["targets"][name] = "scanned"
    base = os.path.dirname(os.path.normpath(root))
    for path in _files(root):
      real = os.path.realpath(path)
      if real in seen or (metadata_only and not path.endswith(".png")):
        continue
      seen.add(real)
      out["files_scanned"] += 1
      out["bytes_scanned"] += os.path.getsize(path)
      for hit in scan_file(path, matcher, metadata_only):
        out["hits"].append({"file": os.path.relpath(path, base), "target": name, **hit})
  return out
