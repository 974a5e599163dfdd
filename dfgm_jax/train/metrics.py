"""Training metrics to `metrics.jsonl` and TensorBoard event files.

The event files are written here without TensorFlow or tensorboard (neither
is on the GPU hosts): an event file is a TFRecord stream of `Event` protocol
buffers, and a scalar event needs only a handful of protobuf fields, encoded
below by hand (wire format: varint keys, fixed64 double, fixed32 float,
length-delimited strings/messages).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time

from etils import epath
import numpy as np

_CRC_TABLE = None


def _crc32c(data: bytes) -> int:
  global _CRC_TABLE
  if _CRC_TABLE is None:
    table = []
    for i in range(256):
      c = i
      for _ in range(8):
        c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
      table.append(c)
    _CRC_TABLE = table
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = _crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


_SESSION_START = 1  # SessionLog.SessionStatus.START


def _event(wall_time: float, step: int, summary: bytes | None = None,
           file_version: str | None = None, session_start: bool = False) -> bytes:
  msg = _varint(1 << 3 | 1) + struct.pack("<d", wall_time)
  msg += _varint(2 << 3 | 0) + _varint(step)
  if file_version is not None:
    msg += _field_bytes(3, file_version.encode())
  if summary is not None:
    msg += _field_bytes(5, summary)
  if session_start:  # Event.session_log (7) = SessionLog{status (1): START}.
    msg += _field_bytes(7, _varint(1 << 3 | 0) + _varint(_SESSION_START))
  return msg


def _scalar_summary(scalars: dict) -> bytes:
  out = b""
  for tag, value in scalars.items():
    v = _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack(
        "<f", float(value))
    out += _field_bytes(1, v)
  return out


def _record(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", _masked_crc(header)) + data +
          struct.pack("<I", _masked_crc(data)))


class EventFileWriter:
  """Appends scalar summaries to one TensorBoard event file.

  With `start_step`, the file begins with a SessionLog START event at that
  step: TensorBoard then discards the events an interrupted run wrote after
  it (they are replayed), as it does for TensorFlow's own resumed runs.
  """

  def __init__(self, logdir: str, start_step: int | None = None):
    logdir = epath.Path(logdir)  # a bucket URL works too (dfgm_jax/paths.py).
    logdir.mkdir(parents=True, exist_ok=True)
    path = logdir / (f"events.out.tfevents.{int(time.time())}."
                     f"{socket.gethostname()}.{os.getpid()}")
    self.path = str(path)
    self._f = path.open("ab")
    self._f.write(_record(_event(time.time(), 0, file_version="brain.Event:2")))
    if start_step is not None:
      self._f.write(_record(_event(time.time(), int(start_step),
                                   session_start=True)))
    self._f.flush()

  def scalars(self, step: int, scalars: dict) -> None:
    self._f.write(_record(_event(time.time(), int(step),
                                 summary=_scalar_summary(scalars))))
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def drop_rows_after(jsonl: epath.Path, step: int) -> int:
  """Keeps the rows of a metrics.jsonl with step <= `step`; returns how many went.

  A run killed after its last checkpoint logged steps that its resume
  replays; without this they would appear twice. A torn last line (killed
  mid-write) goes too. Rewritten through a temporary file and a rename
  (a bucket object in one write).
  """
  if not jsonl.exists():
    return 0
  kept, dropped = [], 0
  for line in jsonl.read_text().splitlines():
    try:
      row = json.loads(line)
      keep = int(row["step"]) <= step
    except (ValueError, KeyError, TypeError):
      keep = False
    if keep:
      kept.append(line)
    else:
      dropped += 1
  if dropped:
    text = "".join(line + "\n" for line in kept)
    if "://" in str(jsonl):
      jsonl.write_text(text)  # a bucket object is replaced whole.
    else:
      tmp = jsonl.parent / f"{jsonl.name}.tmp{os.getpid()}"
      tmp.write_text(text)
      tmp.replace(jsonl)
  return dropped


class MetricsWriter:
  """metrics.jsonl + TensorBoard scalars; only process 0 writes.

  With `resume_step`, rows logged after that step by an interrupted run are
  dropped first (the resumed run logs them again): one row per step; the
  event file starts with a session start at that step, for the same reason.
  """

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True,
               resume_step: int | None = None):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if enabled:
      # A bucket URL works too (dfgm_jax/paths.py): pods keep workdirs in buckets.
      workdir = epath.Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      jsonl = workdir / "metrics.jsonl"
      self.jsonl_path = str(jsonl)
      if resume_step is not None:
        drop_rows_after(jsonl, resume_step)
      self._jsonl = jsonl.open("a")
      if tensorboard:
        self._tb = EventFileWriter(str(workdir / "tensorboard"),
                                   start_step=resume_step)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist())
             for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.scalars(step, {k: v for k, v in clean.items()
                              if isinstance(v, float)})

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
