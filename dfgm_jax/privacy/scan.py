r"""Scan of what would be shared for private identifiers (issue 14).

A synthetic set, G2's export and card, summaries and figures leave the
center; none may carry a raw case id, a patient id, a local path or the
salt of the pseudonyms. This module lists those identifiers from the
preprocessed slices' manifest and searches every file that would be shared
for them, in every form a careless copy would keep them in.

What is searched, per file (and per name: every file and folder name under a
shared folder is searched like a file's content):
  raw bytes            the file in blocks
  array_record shards  each record (the shards are compressed)
  zip (.npz, .zip)     each member's name and data, nested zips too
  gzip, bz2, xz        the decompressed stream, nested containers too
  PNG                  every chunk but the pixels (IDAT), any chunk type,
                       zlib-compressed chunk text decompressed
  escaped text         `\uXXXX`, `\xXX` and `%XX` escapes (JSON, URLs)
                       undone
and each identifier is looked for in any letter case, as UTF-8, UTF-16 and
UTF-32 (both byte orders: a numpy unicode array in an .npz is UTF-32), as
hex digits and as base64 (standard and URL-safe alphabets, at each of the
three alignments a base64 stream can give it).

Links and special files: a symbolic link inside a shared folder is a finding
(`tar -h` or a copy would ship its target) and is never followed; so is a
fifo, socket or device. A target that is itself a link is read through.

Bounds: containers are opened MAX_DEPTH deep, at most MAX_DECODED bytes of
decompressed data per file; a file past either bound is a finding ("not
scanned"), never reported clean.

What it cannot see: identifiers drawn into the pixels of an image (burned-in
text), encrypted or password-protected archives, other compressions (7z,
zstd, rar, raw deflate outside zip and PNG), base64 or hex of compressed
data, other text encodings (UTF-7, EBCDIC, ROT13), an identifier split
across fields, and re-identification by content (a pasted tumor matched to
its public source scan: see the README's provenance paragraph).

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

import base64
import bz2
import csv
import io
import lzma
import os
import re
import stat
import struct
import zipfile
import zlib
from typing import Iterable, Iterator

MIN_LENGTH = 6
BLOCK = 8 << 20
# Containers opened inside containers (a zip in a zip in a gzip ...).
MAX_DEPTH = 4
# Decompressed bytes read per scanned file, all its containers together.
MAX_DECODED = 1 << 30
_PREFIX = 6
_PNG = b"\x89PNG\r\n\x1a\n"
_ID_COLUMN = re.compile(r"(subject_?id|_id)$", re.I)
# Text encodings an identifier is looked for in (lower-cased data).
_TEXT_ENCODINGS = ("utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be")
_ESCAPE = re.compile(rb"\\u([0-9a-fA-F]{4})|\\x([0-9a-fA-F]{2})|%([0-9a-fA-F]{2})")
_XZ = b"\xfd7zXZ\x00"

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


# --- Matching ------------------------------------------------------------------

_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _base64_cores(b: bytes) -> set[bytes]:
  """The base64 text that encodes `b` wherever it starts in a stream.

  A base64 stream encodes 3 bytes as 4 characters, so `b` starts at one of
  three bit offsets; for each, the characters that depend on `b` alone (not
  on its neighbours) are always the same string.
  """
  out = set()
  for k in range(3):
    enc = base64.b64encode(b"\0" * k + b)
    core = enc[-(-8 * k // 6):(8 * (k + len(b))) // 6]
    if len(core) >= MIN_LENGTH:
      out |= {core, core.translate(_URLSAFE)}
  return out


def forms(value: str) -> list[tuple[bytes, bool, str]]:
  """Every byte string `value` is looked for as: (pattern, searched in the
  lower-cased data, encoding name). Text and hex forms are searched in
  lower-cased data (any letter case matches); base64 is case-sensitive, so
  its forms are made from the value as given, lower-cased and upper-cased."""
  found = {}
  for enc in _TEXT_ENCODINGS:
    found.setdefault((value.encode(enc).lower(), True), enc)
  variants = dict.fromkeys((value, value.lower(), value.upper()))
  for v in variants:
    found.setdefault((v.encode().hex().encode(), True), "hex")
  for v in variants:
    for core in sorted(_base64_cores(v.encode())):
      found.setdefault((core, False), "base64")
  return [(p, lower, enc) for (p, lower), enc in found.items()]


class _Matcher:
  """All occurrences of many byte strings, one pass per distinct prefix."""

  def __init__(self, tokens: list[dict]):
    self.groups = {}
    for t in tokens:
      for pattern, lower, enc in forms(t["value"]):
        self.groups.setdefault((lower, pattern[:_PREFIX]), []).append((pattern, t, enc))
    self.longest = max((len(p) for g in self.groups.values() for p, _, _ in g), default=1)

  def find(self, data: bytes, limit: int | None = None
           ) -> Iterator[tuple[int, dict, str]]:
    """(offset, token, encoding) of every match starting before `limit`."""
    limit = len(data) if limit is None else limit
    lowered = None
    for (lower, prefix), group in self.groups.items():
      if lower and lowered is None:
        lowered = data.lower()
      text = lowered if lower else data
      pos = text.find(prefix, 0, limit + len(prefix) - 1)
      while pos != -1 and pos < limit:
        for pattern, t, enc in group:
          if text.startswith(pattern, pos):
            yield pos, t, enc
        pos = text.find(prefix, pos + 1)


def scan_bytes(data: bytes, tokens: list[dict], where: str = "bytes") -> list[dict]:
  """Hits in one byte string and what is decoded from it:
  [{"where", "kind", "matched", "encoding", "count", "offset"}]."""
  matcher, budget = _Matcher(tokens), _Budget()
  return _collect(_match_views(where, data, matcher, budget, 0)) + budget.findings()


def _collect(matches) -> list[dict]:
  hits = {}
  for where, off, t, enc in matches:
    key = (where, t["value"], enc)
    if key in hits:
      hits[key]["count"] += 1
    else:
      hits[key] = {"where": where, "kind": t["kind"], "matched": t["value"],
                   "encoding": enc, "count": 1, "offset": int(off)}
  return list(hits.values())


# --- Decoding ------------------------------------------------------------------


class _Budget:
  """Decompressed bytes left for one file, and what could not be scanned."""

  def __init__(self):
    self.left = MAX_DECODED
    self.unscanned = []

  def findings(self) -> list[dict]:
    return [{"where": where, "kind": "not scanned", "matched": why, "encoding": None,
             "count": 1, "offset": 0} for where, why in self.unscanned]


def _container(data: bytes) -> str | None:
  """The kind of container `data` is, by its magic bytes."""
  if data.startswith(_PNG):
    return "png"
  if data.startswith((b"PK\x03\x04", b"PK\x05\x06")):
    return "zip"
  if data.startswith(b"\x1f\x8b"):
    return "gzip"
  if data.startswith(b"BZh") and data[3:4].isdigit():
    return "bz2"
  if data.startswith(_XZ):
    return "xz"
  return None


_DECOMPRESSORS = {"gzip": lambda: zlib.decompressobj(wbits=47), "bz2": bz2.BZ2Decompressor,
                  "xz": lzma.LZMADecompressor}
_DECODE_ERRORS = (zlib.error, OSError, EOFError, ValueError, lzma.LZMAError)


def _decompress(kind: str, data: bytes, where: str, budget: _Budget) -> bytes | None:
  """Every stream of a (possibly multi-stream) gzip, bz2 or xz file, within
  the budget; None when the budget is spent (recorded as not scanned)."""
  parts, rest = [], data
  while rest:
    d = _DECOMPRESSORS[kind]()
    try:
      out = d.decompress(rest, budget.left + 1)
    except _DECODE_ERRORS:
      break  # trailing garbage, or not this kind after all: the raw bytes are searched.
    if len(out) > budget.left:
      budget.unscanned.append((where, f"decompresses to more than {MAX_DECODED} bytes"))
      return None
    budget.left -= len(out)
    parts.append(out)
    if not d.eof:
      break  # truncated: what was decoded is searched.
    rest = d.unused_data
  return b"".join(parts)


def _zip_views(where: str, data: bytes, budget: _Budget) -> Iterator[tuple[str, bytes]]:
  try:
    z = zipfile.ZipFile(io.BytesIO(data))
    infos = z.infolist()
  except (zipfile.BadZipFile, *_DECODE_ERRORS):
    return  # not a readable zip: its raw bytes are searched.
  for info in infos:
    yield f"{where}: zip member name {info.filename!r}", info.filename.encode()
    inner = f"{where}: zip member {info.filename!r}"
    try:
      with z.open(info) as f:
        out = f.read(budget.left + 1)
    except (RuntimeError, NotImplementedError, zipfile.BadZipFile, *_DECODE_ERRORS) as e:
      budget.unscanned.append((inner, f"unreadable ({type(e).__name__}: {e})"))
      continue
    if len(out) > budget.left:
      budget.unscanned.append((inner, f"decompresses to more than {MAX_DECODED} bytes"))
      return
    budget.left -= len(out)
    yield inner, out


def png_text(data: bytes) -> Iterator[tuple[str, bytes]]:
  """(chunk description, bytes) of every PNG chunk but the pixels (IDAT):
  tEXt, zTXt and iTXt as their keyword and (decompressed) text, any other
  chunk as its body and, when it is zlib data, its decompressed body."""
  pos = len(_PNG)
  while pos + 8 <= len(data):
    (length,) = struct.unpack(">I", data[pos:pos + 4])
    kind = data[pos + 4:pos + 8]
    body = data[pos + 8:pos + 8 + length]
    pos += 12 + length
    if kind == b"IDAT":
      continue
    name = f"PNG {kind.decode('latin-1')} chunk"
    if kind not in (b"tEXt", b"zTXt", b"iTXt"):
      yield name, body
      try:
        yield f"{name} (zlib)", zlib.decompressobj().decompress(body, MAX_DECODED)
      except zlib.error:
        pass
      continue
    key, _, rest = body.partition(b"\0")
    name = f"{name} {key.decode('latin-1')!r}"
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


def _unescape(data: bytes) -> bytes | None:
  """`data` with \\uXXXX, \\xXX and %XX escapes replaced by the UTF-8 of what
  they encode; None when it holds none."""
  if not _ESCAPE.search(data):
    return None

  def one(m):
    code = int(m.group(1) or m.group(2) or m.group(3), 16)
    return chr(code).encode("utf-8", "surrogatepass")

  return _ESCAPE.sub(one, data)


def _views(where: str, data: bytes, budget: _Budget, depth: int
           ) -> Iterator[tuple[str, bytes]]:
  """(where, bytes) of `data` itself and of everything decoded from it."""
  yield where, data
  unescaped = _unescape(data)
  if unescaped is not None:
    yield f"{where}, escapes undone", unescaped
  kind = _container(data)
  if kind is None:
    return
  if depth >= MAX_DEPTH:
    budget.unscanned.append((where, f"{kind} nested more than {MAX_DEPTH} deep"))
    return
  if kind == "png":  # a top-level PNG's chunks are named alone (its metadata).
    parts = ((n if where == "raw bytes" else f"{where}: {n}", b) for n, b in png_text(data))
  elif kind == "zip":
    parts = _zip_views(where, data, budget)
  else:
    out = _decompress(kind, data, where, budget)
    parts = [] if out is None else [(f"{where}: {kind} content", out)]
  for inner, part in parts:
    yield from _views(inner, part, budget, depth + 1)


def _match_views(where, data, matcher, budget, depth):
  for w, view in _views(where, data, budget, depth):
    for off, t, enc in matcher.find(view):
      yield w, off, t, enc


def _stream(path: str, matcher: _Matcher) -> Iterator[tuple[str, int, dict, str]]:
  """Raw bytes of a file in blocks overlapping by the longest pattern; each
  block's escapes undone too (an escape cut by a block's end is missed)."""
  overlap = matcher.longest - 1
  with open(path, "rb") as f:
    base, carry = 0, b""
    while True:
      block = f.read(BLOCK)
      data = carry + block
      last = not block
      # Matches starting in the overlap are found in the next block.
      limit = len(data) if last else max(len(data) - overlap, 0)
      for off, t, enc in matcher.find(data, limit):
        yield "raw bytes", base + off, t, enc
      unescaped = _unescape(block)
      if unescaped is not None:
        for off, t, enc in matcher.find(unescaped):
          yield "raw bytes, escapes undone", base, t, enc
      if last:
        return
      carry = data[limit:]
      base += limit


def _array_records(path: str) -> Iterator[tuple[str, bytes]]:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  reader = array_record_module.ArrayRecordReader(path)
  try:
    for i, record in enumerate(reader.read_all()):
      yield f"record {i}", record
  finally:
    reader.close()


def scan_file(path: str, matcher: _Matcher, metadata_only: bool = False) -> list[dict]:
  """Hits in one file, decoded by its kind (see the module docstring); with
  metadata_only, PNG files only (a figure's pixels are searched as bytes but
  cannot show text drawn into them)."""
  with open(path, "rb") as f:
    head = f.read(8)
  kind = _container(head) if len(head) >= 4 else None
  if metadata_only and kind != "png":
    return []
  budget = _Budget()
  if ".array_record" in os.path.basename(path):
    try:
      records = list(_array_records(path))
    except Exception:  # pylint: disable=broad-except
      records = []  # not readable as array_record (altered, truncated).
    # The raw bytes too: what was appended to a shard is in no record.
    matches = [m for where, data in records
               for m in _match_views(where, data, matcher, budget, 1)]
    return _collect([*matches, *_stream(path, matcher)]) + budget.findings()
  if kind is None:
    return _collect(_stream(path, matcher))
  if os.path.getsize(path) > MAX_DECODED:
    budget.unscanned.append(("file", f"a {kind} file over {MAX_DECODED} bytes: its "
                                     "content is not decoded"))
    return _collect(_stream(path, matcher)) + budget.findings()
  with open(path, "rb") as f:
    data = f.read()
  return _collect(_match_views("raw bytes", data, matcher, budget, 0)) + budget.findings()


# --- Walking the shared folders --------------------------------------------------


def _entries(root: str) -> Iterator[tuple[str, str]]:
  """(path, "file" | "folder" | "link" | "special") of everything under root,
  links not followed (a root that is itself a link is read through)."""
  if not os.path.isdir(root):
    yield root, "file"
    return
  for d, dirs, names in os.walk(root):  # followlinks=False: links are listed, not entered.
    dirs.sort()
    for n in dirs:
      p = os.path.join(d, n)
      yield p, "link" if os.path.islink(p) else "folder"
    for n in sorted(names):
      p = os.path.join(d, n)
      mode = os.lstat(p).st_mode
      yield p, ("link" if stat.S_ISLNK(mode) else
                "file" if stat.S_ISREG(mode) else "special")


def _finding(kind: str, what: str, where: str) -> dict:
  return {"where": where, "kind": kind, "matched": what, "encoding": None, "count": 1,
          "offset": 0}


def scan(targets: dict, tokens: list[dict], figures: Iterable[str] = ()) -> dict:
  """Scans every file of `targets` (name -> file or folder; missing ones are
  listed, not scanned), the names under them, and the PNG files of
  `figures` (folders).

  Returns:
    {"targets": name -> "scanned" | "missing", "files_scanned", "bytes_scanned",
     "tokens": kind -> how many values, "n_tokens", "hits": [{"file" (relative
     to the target's parent folder), "target", "where", "kind" (of identifier,
     or "link", "special file", "not scanned"), "matched", "encoding",
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

    def add(path, hits, name=name, base=base):
      out["hits"] += [{"file": os.path.relpath(path, base), "target": name, **h}
                      for h in hits]

    for path, kind in _entries(root):
      if metadata_only and not (kind == "file" and path.endswith(".png")):
        continue
      if path != root:  # a name under the folder: searched like content.
        add(path, _collect(("name", off, t, enc) for off, t, enc in
                           matcher.find(os.fsencode(os.path.basename(path)))))
      if kind == "link":
        add(path, [_finding("link", os.readlink(path), "symbolic link (not followed; "
                            "a copy or tar -h would ship its target)")])
        continue
      if kind == "special":
        add(path, [_finding("special file", "not a regular file", "not read")])
        continue
      if kind != "file":
        continue
      real = os.path.realpath(path)
      if real in seen:
        continue
      seen.add(real)
      out["files_scanned"] += 1
      out["bytes_scanned"] += os.path.getsize(path)
      try:
        add(path, scan_file(path, matcher, metadata_only))
      except OSError as e:
        add(path, [_finding("not scanned", f"unreadable ({e.strerror})", "file")])
  return out
