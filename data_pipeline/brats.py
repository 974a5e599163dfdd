"""BraTS folder layouts: versions, file names, labels, case discovery, centers.

One loader accepts the BraTS 2018, 2019, 2020, 2021 and 2023-GLI training
layouts (see shared/docs/BRATS_FORMAT.md sections 1 and 2), flat or nested (the
Kaggle copy of 2020 nests the data folder twice; the 2018 and 2019 releases
split cases into HGG/ and LGG/), with `.nii` or `.nii.gz` files and the
case-355 seg-file quirk of the Kaggle 2020 copy.

Centers: BraTS 2020 reads them from name_mapping.csv; BraTS 2018 and 2019 ids
carry the contributing site (`Brats18_<site>_<local>_<n>`,
`BraTS19_<site>_<local>_<n>`: CBICA, 2013, TMC, TCIA01..TCIA13); with
`merge_site_numbers` (config.data.merge_site_numbers, the default) TCIA01..13
become one center TCIA, as in BraTS 2020's mapping; without it each TCIA site
is its own center.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import re
from typing import Iterable, Sequence

from dfgm_jax import errors

# Canonical modality names used everywhere in this project (BraTS 2020/2021
# suffixes). BraTS 2023 files use the names on the right.
MODALITIES = ("t1", "t1ce", "t2", "flair")
MODALITY_ALIASES_2023 = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}

# Canonical label scheme: 0 background, 1 NCR/NET, 2 edema, 3 enhancing tumor.
# Whole tumor (WT) = label > 0.
CANONICAL_LABELS = (0, 1, 2, 3)
CANONICAL_LABEL_NAMES = ("background", "ncr_net", "edema", "enhancing")

VERSIONS = ("2018", "2019", "2020", "2021", "2023")
# Versions whose case ids name the contributing site (no name_mapping.csv).
SITE_IN_ID_VERSIONS = ("2018", "2019")
# The grade folders of the 2018 / 2019 training releases.
GRADE_FOLDERS = ("HGG", "LGG")

# Per version: case-folder regex, separator between id and suffix, allowed seg
# labels, and the map from file labels to canonical labels.
CASE_PATTERNS = {
    # <site>_<local id>_<timepoint>; sites CBICA, 2013, TMC, TCIA01..13 (and
    # other tokens in validation releases); lower-case "Brats18".
    "2018": re.compile(r"^Brats18_([A-Za-z0-9]+)_([A-Za-z0-9]+)_(\d+)$"),
    "2019": re.compile(r"^BraTS19_([A-Za-z0-9]+)_([A-Za-z0-9]+)_(\d+)$"),
    "2020": re.compile(r"^BraTS20_Training_(\d{3})$"),
    "2021": re.compile(r"^BraTS2021_(\d{5})$"),
    "2023": re.compile(r"^BraTS-GLI-(\d{5})-(\d{3})$"),
}
DATA_FOLDER_NAMES = {
    "2018": "MICCAI_BraTS_2018_Data_Training",
    "2019": "MICCAI_BraTS_2019_Data_Training",
    "2020": "MICCAI_BraTS2020_TrainingData",
    "2021": "RSNA_ASNR_MICCAI_BraTS2021_TrainingData",
    "2023": "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData",
}
KAGGLE_OUTER_FOLDER = "BraTS2020_TrainingData"
FILE_SEPARATOR = {"2018": "_", "2019": "_", "2020": "_", "2021": "_", "2023": "-"}
LABEL_MAPS = {
    "2018": {0: 0, 1: 1, 2: 2, 4: 3},
    "2019": {0: 0, 1: 1, 2: 2, 4: 3},
    "2020": {0: 0, 1: 1, 2: 2, 4: 3},
    "2021": {0: 0, 1: 1, 2: 2, 4: 3},
    "2023": {0: 0, 1: 1, 2: 2, 3: 3},
}
NIFTI_SUFFIXES = (".nii.gz", ".nii")

# name_mapping.csv of BraTS 2020 (exact header, BRATS_FORMAT.md 1.5).
NAME_MAPPING_FILE = "name_mapping.csv"
# A small JSON file the phantom (data_pipeline/phantom.py) writes in the data
# folder it returns, so that preprocessing can record that the slices are
# phantom, not BraTS (their Dice is not the paper's). Discovery reads folders
# only (find_case_folders), so the file is ignored there.
PHANTOM_MARKER = "dfgm_phantom.json"
NAME_MAPPING_HEADER = (
    "Grade",
    "BraTS_2017_subject_ID",
    "BraTS_2018_subject_ID",
    "TCGA_TCIA_subject_ID",
    "BraTS_2019_subject_ID",
    "BraTS_2020_subject_ID",
)
SURVIVAL_FILE = "survival_info.csv"
SURVIVAL_HEADER = ("Brats20ID", "Age", "Survival_days", "Extent_of_Resection")

# The 2020 seg file of case 355 in the Kaggle copy.
QUIRK_355_SEG_STEM = "W39_1998.09.19_Segm"


class BratsDataError(errors.UserError, ValueError):
  """Bad input data. The message always names the offending path."""

  def __init__(self, path: str | os.PathLike, reason: str):
    self.path = os.fspath(path)
    # One line: a binary prints it as `error: <path>: <reason>`, and a
    # library's text (nibabel's "...\n - could the file be damaged?") may
    # hold line breaks.
    self.reason = " ".join(reason.split())
    super().__init__(f"{self.path}: {self.reason}")

  def __reduce__(self):  # picklable across worker processes.
    return (BratsDataError, (self.path, self.reason))


def modality_file_suffix(version: str, modality: str) -> str:
  """The suffix a version uses for a canonical modality name ('seg' allowed)."""
  if modality == "seg":
    return "seg"
  if modality not in MODALITIES:
    raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
  return MODALITY_ALIASES_2023[modality] if version == "2023" else modality


def file_stem(version: str, case_id: str, modality: str) -> str:
  """File name without extension, e.g. BraTS20_Training_001_t2."""
  return case_id + FILE_SEPARATOR[version] + modality_file_suffix(version, modality)


ID_PREFIX = {"2018": "Brats18", "2019": "BraTS19"}


def local_id_for(site: str, number: int) -> str:
  """A 2018/2019 local id for `number` in the style of `site`.

  CBICA: three capitals (0 -> AAA, 1 -> AAB); TMC: five digits; others
  (2013, TCIA..): the plain number.
  """
  if site == "CBICA":
    if not 0 <= number < 26**3:
      raise ValueError(f"CBICA local ids encode 0..{26**3 - 1}, got {number}")
    return "".join(chr(65 + (number // 26**p) % 26) for p in (2, 1, 0))
  if site == "TMC":
    return f"{number:05d}"
  return str(number)


def case_id_for(version: str, number: int, timepoint: int = 0,
                site: str = "CBICA") -> str:
  """The case id (= folder name) of case `number` in a version's naming.

  2018 / 2019 ids name a site (`site`, e.g. CBICA, TCIA01, 2013, TMC) and a
  local id made from `number` (local_id_for); their timepoint is
  `timepoint + 1` (the releases' `_1`).
  """
  if version in SITE_IN_ID_VERSIONS:
    return (f"{ID_PREFIX[version]}_{site}_{local_id_for(site, number)}_"
            f"{timepoint + 1}")
  if version == "2020":
    return f"BraTS20_Training_{number:03d}"
  if version == "2021":
    return f"BraTS2021_{number:05d}"
  if version == "2023":
    return f"BraTS-GLI-{number:05d}-{timepoint:03d}"
  raise ValueError(f"unknown BraTS version {version!r}; expected one of {VERSIONS}")


def case_number(version: str, case_id: str) -> int:
  if version in SITE_IN_ID_VERSIONS:
    raise ValueError(f"BraTS {version} ids carry a site and local id, not a "
                     f"case number ({case_id!r}); see site_of_case_id")
  match = CASE_PATTERNS[version].match(case_id)
  if not match:
    raise ValueError(f"{case_id!r} is not a BraTS {version} case id")
  return int(match.group(1))


def site_of_case_id(version: str, case_id: str) -> str:
  """The site token of a 2018 / 2019 case id (CBICA, TCIA01, 2013, TMC...)."""
  match = CASE_PATTERNS[version].match(case_id) if version in CASE_PATTERNS else None
  if version not in SITE_IN_ID_VERSIONS or not match:
    raise ValueError(f"{case_id!r} is not a BraTS {version} case id naming a "
                     "site (Brats18_<site>_<id>_<n> or BraTS19_<site>_<id>_<n>)")
  return match.group(1)


@dataclasses.dataclass(frozen=True)
class Case:
  """One BraTS case on disk.

  Attributes:
    case_id: folder name, e.g. BraTS20_Training_001.
    version: '2018', '2019', '2020', '2021' or '2023'.
    folder: the case folder.
    files: canonical modality name ('t1', ..., 'seg') -> path; a modality whose
      file is missing is absent from the dict.
    center: institution the case belongs to (e.g. CBICA, TCIA).
    grade: HGG / LGG when the mapping (2020) or the grade folder the case
      sits in (2018 / 2019) says so, else ''.
  """

  case_id: str
  version: str
  folder: str
  files: dict
  center: str
  grade: str = ""


def detect_version(folder_name: str) -> str | None:
  for version, pattern in CASE_PATTERNS.items():
    if pattern.match(folder_name):
      return version
  return None


def _find_nifti(folder: str, stem: str) -> str | None:
  for suffix in NIFTI_SUFFIXES:
    path = os.path.join(folder, stem + suffix)
    if os.path.isfile(path):
      return path
  return None


def _is_nifti(name: str) -> bool:
  return name.endswith(NIFTI_SUFFIXES)


def case_files(version: str, case_id: str, folder: str) -> dict:
  """Maps canonical modality names and 'seg' to the files present in `folder`.

  Handles the seg-file quirk (BRATS_FORMAT.md 1.2): when `<id>_seg.nii[.gz]`
  is missing, a single other NIfTI file in the folder that is not one of the
  four modality files is taken as the segmentation, and this is logged.
  """
  files = {}
  for modality in MODALITIES + ("seg",):
    path = _find_nifti(folder, file_stem(version, case_id, modality))
    if path is not None:
      files[modality] = path
  if "seg" not in files:
    known = set(files.values())
    others = sorted(
        os.path.join(folder, name)
        for name in os.listdir(folder)
        if _is_nifti(name) and os.path.join(folder, name) not in known
    )
    if len(others) == 1:
      logging.warning("%s: no %s file; using %s as its segmentation",
                      folder, file_stem(version, case_id, "seg"), others[0])
      files["seg"] = others[0]
  return files


def find_case_folders(root: str) -> list[tuple[str, str, str]]:
  """Finds BraTS case folders below `root` in any of the supported layouts.

  Returns:
    Sorted list of (version, case_id, folder).

  Raises:
    BratsDataError: `root` is missing, holds no BraTS case folders, or mixes
      versions.
  """
  if not os.path.isdir(root):
    raise BratsDataError(root, "not a directory")
  found = []
  for dirpath, dirnames, _ in os.walk(root):
    dirnames.sort()
    keep = []
    for name in dirnames:
      version = detect_version(name)
      if version is None:
        keep.append(name)  # descend: Kaggle copies nest the data folder.
      else:
        found.append((version, name, os.path.join(dirpath, name)))
    dirnames[:] = keep
  if not found:
    raise BratsDataError(
        root,
        "no BraTS case folders found (expected folders named like "
        "Brats18_CBICA_AAB_1, BraTS19_TCIA01_425_1, BraTS20_Training_001, "
        "BraTS2021_00000 or BraTS-GLI-00000-000)")
  versions = sorted({v for v, _, _ in found})
  if len(versions) > 1:
    raise BratsDataError(root, f"mixes BraTS versions {versions}; point "
                         "--brats_dir at one data set")
  ids = [c for _, c, _ in found]
  duplicates = sorted({c for c in ids if ids.count(c) > 1})
  if duplicates:
    raise BratsDataError(root, f"case folders appear more than once: {duplicates[:5]}")
  return sorted(found, key=lambda item: item[1])


def site_to_center(site: str, merge_site_numbers: bool = True) -> str:
  """BraTS19 site token -> center name. TCIA01..TCIA13 -> TCIA when merging."""
  if merge_site_numbers:
    stripped = re.sub(r"\d+$", "", site)
    if stripped:
      return stripped
  return site


def read_name_mapping(path: str, merge_site_numbers: bool = True
                      ) -> dict[str, tuple[str, str]]:
  """Reads a BraTS 2020 name_mapping.csv.

  Returns:
    BraTS20 id -> (center, grade). The center is the second `_` token of
    `BraTS_2019_subject_ID` (CBICA, TCIA01.., 2013, TMC); rows whose BraTS19 id
    is NA (the cases new in 2020) are absent, so they get the data-set center.

  Raises:
    BratsDataError: the file lacks the columns of BRATS_FORMAT.md 1.5.
  """
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    fields = reader.fieldnames or []
    for column in ("BraTS_2019_subject_ID", "BraTS_2020_subject_ID"):
      if column not in fields:
        raise BratsDataError(path, f"missing column {column!r} (found {fields})")
    mapping = {}
    for row in reader:
      brats20 = (row.get("BraTS_2020_subject_ID") or "").strip()
      brats19 = (row.get("BraTS_2019_subject_ID") or "").strip()
      if not brats20 or brats19 in ("", "NA"):
        continue
      tokens = brats19.split("_")
      if len(tokens) < 3:
        raise BratsDataError(path, f"cannot parse BraTS19 id {brats19!r}")
      mapping[brats20] = (site_to_center(tokens[1], merge_site_numbers),
                          (row.get("Grade") or "").strip())
  return mapping


def default_center(version: str) -> str:
  """Center of cases without a site mapping: named after the data set."""
  return f"BraTS{version}"


def _find_mapping_file(root: str, case_folders: Sequence[str]) -> str | None:
  """name_mapping.csv lives beside the case folders (or in the root)."""
  candidates = {os.path.dirname(f) for f in case_folders} | {root}
  for folder in sorted(candidates):
    path = os.path.join(folder, NAME_MAPPING_FILE)
    if os.path.isfile(path):
      return path
  return None


def discover_cases(root: str, merge_site_numbers: bool = True) -> list[Case]:
  """Finds every case below `root` and assigns it a center.

  Centers: 2020 from name_mapping.csv (cases without a site there, and all
  2021 / 2023 cases, get default_center); 2018 / 2019 from the site in the
  case id (site_of_case_id).

  Args:
    root: a BraTS training-data folder in any supported layout.
    merge_site_numbers: map TCIA01..TCIA13 to one center TCIA (the paper's
      TCIA = 167 cases, HGG and LGG); False keeps each TCIA site apart.

  Returns:
    Cases sorted by id.
  """
  found = find_case_folders(root)
  version = found[0][0]
  mapping = {}
  mapping_path = _find_mapping_file(root, [f for _, _, f in found])
  if mapping_path is not None and version == "2020":
    mapping = read_name_mapping(mapping_path, merge_site_numbers)
  elif version == "2020":
    logging.warning("%s: no %s; every case gets center %s", root,
                    NAME_MAPPING_FILE, default_center(version))
  cases = []
  for version, case_id, folder in found:
    if version in SITE_IN_ID_VERSIONS:
      parent = os.path.basename(os.path.dirname(folder))
      center = site_to_center(site_of_case_id(version, case_id),
                              merge_site_numbers)
      grade = parent if parent in GRADE_FOLDERS else ""
    else:
      center, grade = mapping.get(case_id, (default_center(version), ""))
    cases.append(Case(case_id=case_id, version=version, folder=folder,
                      files=case_files(version, case_id, folder),
                      center=center, grade=grade))
  return cases


def centers_of(cases: Iterable[Case]) -> dict[str, int]:
  counts = {}
  for case in cases:
    counts[case.center] = counts.get(case.center, 0) + 1
  return dict(sorted(counts.items()))
