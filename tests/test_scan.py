"""The scan of shareable files (dfgm_jax/privacy/scan.py): every form an
identifier can hide in, links, and the scan's bounds.

Each plant hides a case id, a path or the salt in a fresh shared folder in a
form a plain case-sensitive byte search misses (checked first), and the scan
must name it. Fast: no slices, no model.
"""

import base64
import bz2
import gzip
import io
import json
import lzma
import os
import secrets
import struct
import zipfile
import zlib

import numpy as np
import pytest

from dfgm_jax.privacy import scan

CASE = "BraTS20_Training_007"
DATA = "/data/brats_private_copy"
SALT = secrets.token_hex(16)


@pytest.fixture(scope="module")
def tokens():
  manifest = {"cases": [{"case_id": CASE}, {"case_id": "BraTS20_Training_012"}],
              "brats_dir": DATA}
  return scan.private_tokens(manifest, salt=SALT)


def _png(extra_chunks=()) -> bytes:
  """A valid 1x1 grey PNG with `extra_chunks` ((type, body)) before IDAT."""
  def chunk(kind, body):
    return (struct.pack(">I", len(body)) + kind + body +
            struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
  ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
  out = scan._PNG + chunk(b"IHDR", ihdr)
  for kind, body in extra_chunks:
    out += chunk(kind, body)
  return out + chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND", b"")


def _zip(members: dict) -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
    for name, data in members.items():
      z.writestr(name, data)
  return buf.getvalue()


def _npz_unicode() -> bytes:
  buf = io.BytesIO()
  np.savez_compressed(buf, case=np.array([CASE, "other"]), x=np.zeros(3))
  return buf.getvalue()


def _escaped_json() -> bytes:
  return json.dumps({"note": "".join(f"\\u{ord(c):04x}" for c in CASE)}).replace(
      "\\\\", "\\").encode()


# name -> (files to write: relative path -> bytes, the identifier that must be found).
PLANTS = {
    "file name": ({f"set/{CASE}.txt": b"nothing here"}, CASE),
    "folder name": ({f"set/{CASE.lower()}/x.bin": b"\0" * 8}, CASE),
    "lowercase": ({"set/notes.txt": f"from {CASE.lower()}".encode()}, CASE),
    "utf-16": ({"set/notes.txt": f"from {CASE}".encode("utf-16")}, CASE),
    "utf-32": ({"set/notes.txt": f"from {CASE}".encode("utf-32")}, CASE),
    "npz unicode array": ({"set/extra.npz": _npz_unicode()}, CASE),
    "base64 in json": ({"set/meta.json": json.dumps(
        {"blob": base64.b64encode(f"src={CASE};".encode()).decode()}).encode()}, CASE),
    "\\u escapes in json": ({"set/meta.json": _escaped_json()}, CASE),
    "hex": ({"set/meta.txt": f"id=0x{CASE.encode().hex()}".encode()}, CASE),
    "custom png chunk": ({"set/preview.png": _png([(b"prVt", zlib.compress(
        f"case {CASE}".encode()))])}, CASE),
    "zip inside a zip": ({"set/bundle.zip": _zip({"inner.zip": _zip(
        {"notes.txt": f"{DATA}/{CASE}".encode() * 3})})}, CASE),
    "xz": ({"set/log.xz": lzma.compress(f"read {DATA}\n".encode() * 20)}, DATA),
    "bz2": ({"set/log.bz2": bz2.compress(f"read {DATA}\n".encode() * 20)}, DATA),
    "gzip": ({"set/log.gz": gzip.compress(f"read {DATA}\n".encode() * 20)}, DATA),
    "salt upper case": ({"set/key.txt": SALT.upper().encode()}, SALT),
}


def _write(root, files):
  for rel, data in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)
  return os.path.join(root, "set")


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_scan_finds_each_planted_form(plant, tokens, tmp_path):
  files, secret = PLANTS[plant]
  shared = _write(str(tmp_path), files)
  # A plain, case-sensitive byte search of the contents misses each plant.
  for data in files.values():
    assert secret.encode() not in data
  out = scan.scan({"set": shared}, tokens)
  assert out["targets"]["set"] == "scanned"
  found = {h["matched"] for h in out["hits"]}
  assert secret in found, out["hits"]


def test_what_each_plant_is_found_as(tokens, tmp_path):
  def hits(plant):
    shared = _write(str(tmp_path / plant.replace(" ", "_")), PLANTS[plant][0])
    return scan.scan({"set": shared}, tokens)["hits"]
  assert {h["where"] for h in hits("file name")} == {"name"}
  assert {h["file"] for h in hits("folder name")} == {f"set/{CASE.lower()}"}
  # (Little-endian text also holds the big-endian form one byte on.)
  assert "utf-32-le" in {h["encoding"] for h in hits("utf-32")}
  npz = {(h["where"], h["encoding"]) for h in hits("npz unicode array")}
  assert ("raw bytes: zip member 'case.npy'", "utf-32-le") in npz
  assert {h["encoding"] for h in hits("base64 in json")} == {"base64"}
  assert {h["where"] for h in hits("\\u escapes in json")} == {"raw bytes, escapes undone"}
  assert {h["where"] for h in hits("custom png chunk")} == {"PNG prVt chunk (zlib)"}
  nested = {h["where"] for h in hits("zip inside a zip")}
  assert "raw bytes: zip member 'inner.zip': zip member 'notes.txt'" in nested
  assert {h["kind"] for h in hits("salt upper case")} == {"salt"}


def test_a_link_in_a_shared_folder_is_a_finding_and_not_followed(tokens, tmp_path):
  private = tmp_path / "W" / "private"
  private.mkdir(parents=True)
  (private / "salt").write_text(SALT)
  slices = tmp_path / "W" / "slices"
  slices.mkdir()
  (slices / "manifest.json").write_text(json.dumps({"case": CASE}))
  shared = tmp_path / "W" / "synthetic"
  shared.mkdir()
  (shared / "summary.json").write_text("{}")
  os.symlink(private / "salt", shared / "salt_link")
  os.symlink(slices, shared / "slices_link")
  os.symlink(tmp_path / "gone", shared / "broken")
  out = scan.scan({"synthetic set": str(shared)}, tokens)
  links = {h["file"]: h for h in out["hits"] if h["kind"] == "link"}
  assert set(links) == {"synthetic/salt_link", "synthetic/slices_link", "synthetic/broken"}
  assert links["synthetic/salt_link"]["matched"] == str(private / "salt")
  # Not followed: the salt and the case id behind the links are not read.
  assert out["files_scanned"] == 1
  assert not any(h["kind"] in ("salt", "case id") for h in out["hits"])


def test_nesting_and_decompressed_size_are_bounded(tokens, tmp_path, monkeypatch):
  data = f"{CASE}".encode()
  for _ in range(scan.MAX_DEPTH + 1):
    data = gzip.compress(data)
  deep = _write(str(tmp_path / "deep"), {"set/deep.gz": data})
  (hit,) = scan.scan({"set": deep}, tokens)["hits"]
  assert hit["kind"] == "not scanned" and "nested more than" in hit["matched"]
  monkeypatch.setattr(scan, "MAX_DECODED", 1000)
  bomb = _write(str(tmp_path / "bomb"), {"set/zeros.xz": lzma.compress(b"\0" * 5000)})
  (hit,) = scan.scan({"set": bomb}, tokens)["hits"]
  assert hit["kind"] == "not scanned" and "more than 1000 bytes" in hit["matched"]


def test_clean_binary_and_text_files_give_no_hit(tokens, tmp_path):
  rng = np.random.default_rng(0)
  buf = io.BytesIO()
  np.savez(buf, w=rng.normal(size=(256, 256)).astype(np.float32))
  files = {"set/params.npz": buf.getvalue(),
           "set/noise.bin": rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes(),
           "set/summary.json": json.dumps({"center": "CBICA", "sha": secrets.token_hex(32),
                                           "b64": base64.b64encode(b"x" * 300).decode()
                                           }).encode(),
           "set/log.gz": gzip.compress(b"CBICA_synthetic " * 100),
           "set/preview.png": _png([(b"tEXt", b"Title\0CBICA")])}
  out = scan.scan({"set": _write(str(tmp_path), files)}, tokens)
  assert out["hits"] == [] and out["files_scanned"] == len(files)


def test_forms_cover_every_base64_alignment():
  cores = [p for p, _, enc in scan.forms(CASE) if enc == "base64"]
  for k in range(3):
    text = base64.b64encode(b"x" * k + CASE.encode() + b"tail")
    assert any(c in text for c in cores), k
