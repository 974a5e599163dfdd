"""Where healthy slices came from, and whether a set built on them may be shared.

Preprocessing records, per slice of every split, its origin:
  public   a volume of a non-private center (BraTS's 2013, TMC, new-2020
           cases beside the private CBICA and TCIA): public data;
  private  a private center's patient: a training patient, or in the
           evaluation-only <center>_test and <center>_test_healthy a test patient.
The manifest holds the origin of each slice (`slice_origins`, aligned with
`slices`) and the counts per split (`splits[name]["origins"]`).

DFGM shares backgrounds from public slices only. This module is the one
reader of those counts for the stages that must judge by them: the
synthesis stage (where the set goes and what its manifest says), G2's guard
(train/g2.py), the DP engines' unclipped healthy pool (launch/train_data.py)
and the privacy audit's background check. A manifest written before origins
were recorded says nothing, and "unknown" is never taken for "public".

JAX-free: the data layer and the library both use it.
"""

from __future__ import annotations

import dataclasses

PUBLIC = "public"
PRIVATE = "private"
ORIGINS = (PUBLIC, PRIVATE)
HEALTHY = "healthy"
# A private center's own healthy slices (its training patients'): private,
# for that center's local synthesis.
CENTER_HEALTHY_SUFFIX = "_healthy"
# A private center's TEST patients' tumor-free slices, "<center>_test_healthy":
# private, for the evaluation's false-positive measure only (never a bank,
# never training data). It ends in CENTER_HEALTHY_SUFFIX, so every guard that
# refuses <center>_healthy refuses it too.
TEST_HEALTHY = "test_healthy"
# The config field that lets private slices into the `healthy` split.
RESEARCH_SWITCH = "config.data.healthy_include_private"


@dataclasses.dataclass(frozen=True)
class Verdict:
  """Whether a synthetic set may be shared, judged by its backgrounds.

  Attributes:
    shareable: every background is a public-origin slice and the set is not
      an institute's local or an evaluation-only set.
    origins: {"public": n, "private": m} of the bank's slices; None when the
      manifest records no origins.
    reason: why the set is not shareable ('' when it is).
    private_bank: the bank itself holds private or unknown-origin slices
      (such a set is written to the private part of the workdir).
  """

  shareable: bool
  origins: dict | None
  reason: str = ""
  private_bank: bool = False

  def to_dict(self) -> dict:
    out = {"shareable": self.shareable, "healthy_origins": self.origins}
    if self.reason:
      out["not_shareable_because"] = self.reason
    return out


def slice_key(case_id: str, z: int) -> str:
  """A real slice's example key, "<case_id>/<z:03d>": what preprocessing
  writes and what a synthetic set's salted background hash is taken of."""
  return f"{case_id}/{int(z):03d}"


def split_origins(manifest: dict, split: str) -> dict | None:
  """{"public": n, "private": m} of a split, None when not recorded."""
  info = manifest.get("splits", {}).get(split, {})
  origins = info.get("origins")
  if not isinstance(origins, dict):
    return None
  return {o: int(origins.get(o, 0)) for o in ORIGINS}


def all_public(origins: dict | None) -> bool:
  """True when `origins` (split_origins) are recorded and none is private;
  unrecorded origins are never taken for public."""
  return origins is not None and origins[PRIVATE] == 0


def is_public(manifest: dict, split: str) -> bool:
  """True when every slice of `split` is recorded as public-origin."""
  return all_public(split_origins(manifest, split))


def describe(origins: dict | None) -> str:
  if origins is None:
    return "origin not recorded"
  return f"{origins[PUBLIC]} public-origin, {origins[PRIVATE]} private-patient slices"


def bank_verdict(manifest: dict, split: str = HEALTHY, *, local: bool = False,
                 baseline: bool = False) -> Verdict:
  """The shareability of a synthetic set whose backgrounds come from `split`.

  Args:
    manifest: the slice set's manifest (a preprocessing output, or the
      local-synthesis data's, whose `healthy` entry is the institute's split).
    split: the split the memory bank is built from.
    local: an institute's local synthesis (its own healthy slices): never
      shareable, whatever their origin.
    baseline: an evaluation-only baseline set: never shareable.
  """
  origins = split_origins(manifest, split)
  private_bank = not all_public(origins)
  if private_bank:
    reason = (f"its backgrounds come from split {split!r}, which holds "
              f"{describe(origins)}" + (
                  f" (made with {RESEARCH_SWITCH}=True)" if origins else
                  " (preprocessed before origins were recorded: preprocess again)"))
  elif local:
    reason = ("an institute's local synthesis: its backgrounds are the institute's "
              "own healthy slices")
  elif baseline:
    reason = "an evaluation baseline set, made for the evaluation only"
  else:
    reason = ""
  return Verdict(shareable=not reason, origins=origins, reason=reason,
                 private_bank=private_bank)


def set_shareable(manifest: dict) -> tuple[bool, str]:
  """(shareable, reason) a synthetic set's manifest states; unstated: not."""
  if manifest.get("shareable") is True:
    return True, ""
  if "shareable" not in manifest:
    return False, ("its manifest does not state that it is shareable (made before "
                   "backgrounds' origins were recorded: synthesize it again)")
  return False, str(manifest.get("not_shareable_because") or "its manifest says so")
