"""Shared fixtures: tiny hand-made BraTS cases and a preprocessed phantom set."""

import os
import sys

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from data_pipeline import brats  # noqa: E402
from dfgm_jax import platform  # noqa: E402

platform.apply_xla_flags()  # the binaries' XLA flags, for in-process tests too.

# Real data beside the repo (../shared, read-only); absent on a bare clone.
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
REAL_SAMPLE = os.path.join(SHARED_DATA, "brats_real_sample", "TCGA-DU-7294")
# A small derivative of REAL_SAMPLE kept in the repo (tests/data/README.md):
# cropped to the brain, 2x downsampled, so real anatomy needs no ../shared.
REAL_FIXTURE = os.path.join(ROOT, "tests", "data", "real_tcga_du_7294")
REAL_ID = "TCGA-DU-7294"
REQUIRE_SHARED_ENV = "DFGM_REQUIRE_SHARED"


def require_shared(path, what):
  """`path` (under ../shared) for a test that needs it, else skip the test.

  On a bare clone ../shared is absent and the test is skipped with a reason;
  with DFGM_REQUIRE_SHARED=1 (.ci/run, where ../shared is present) a missing
  path fails the test instead.
  """
  if os.path.exists(path):
    return path
  reason = (f"{os.path.relpath(path, ROOT)} not found: {what}; ../shared must "
            "sit beside the repository")
  if os.environ.get(REQUIRE_SHARED_ENV) == "1":
    pytest.fail(f"{reason} ({REQUIRE_SHARED_ENV}=1)")
  pytest.skip(reason)
BRATS_AFFINE = np.array([[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0],
                         [0, 0, 0, 1]], float)


def write_nifti(path, array, affine=BRATS_AFFINE):
  import nibabel as nib
  img = nib.Nifti1Image(array, affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  nib.save(img, path)


def make_case(root, version, number, shape=(24, 24, 20), seed=0, ext=".nii.gz",
              tumor=True, labels=None, site="CBICA", with_seg=True):
  """Writes one small synthetic case (ellipsoid brain, a blob tumor).

  `site` names the site of a 2018 / 2019 id (brats.case_id_for); without
  `with_seg` the case has no seg file (a validation case).
  """
  rng = np.random.default_rng([seed, number])
  case_id = brats.case_id_for(version, number, site=site)
  folder = os.path.join(root, case_id)
  os.makedirs(folder, exist_ok=True)
  grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape],
                              indexing="ij"))
  brain = (grid ** 2).sum(0) < 0.8
  seg = np.zeros(shape, np.uint8)
  if tumor:
    blob = ((grid - np.array([0.2, 0.1, 0.0])[:, None, None, None]) ** 2).sum(0)
    et = 3 if version == "2023" else 4
    seg[(blob < 0.25) & brain] = 2
    seg[(blob < 0.1) & brain] = et
    seg[(blob < 0.03) & brain] = 1
  if labels is not None:
    seg = labels
  for modality in brats.MODALITIES:
    vol = np.where(brain, rng.integers(100, 1000, shape), 0).astype(np.int16)
    write_nifti(os.path.join(folder, brats.file_stem(version, case_id, modality)
                             + ext), vol)
  if with_seg:
    write_nifti(os.path.join(folder, brats.file_stem(version, case_id, "seg")
                             + ext), seg)
  return case_id, folder


@pytest.fixture(scope="session")
def phantom_2020(tmp_path_factory):
  """Eight downsampled BraTS 2020 phantom cases (CBICA, TCIA and others)."""
  from data_pipeline import phantom
  out = tmp_path_factory.mktemp("phantom2020")
  return phantom.generate(str(out), version="2020", num_cases=8, seed=0,
                          scale=0.4)


@pytest.fixture(scope="session")
def tiny_data_cfg():
  from configs import tiny
  return tiny.get_config().data.to_dict()


@pytest.fixture(scope="session")
def preprocessed_2020(phantom_2020, tiny_data_cfg, tmp_path_factory):
  """The phantom set preprocessed with the tiny config (both formats)."""
  from data_pipeline import preprocess
  out = str(tmp_path_factory.mktemp("slices2020"))
  manifest = preprocess.run(phantom_2020.data_dir, out, tiny_data_cfg,
                            progress=False)
  return out, manifest


def train_tiny(data_dir, workdir, center, num_steps, **train_overrides):
  """Trains the tiny preset on preprocessed slices; returns (config, result)."""
  from configs import tiny
  from dfgm_jax.train import diffusion
  from launch import train_data
  config = tiny.get_config()
  config.train.reader = "grain"
  config.train.center = center
  config.train.num_steps = num_steps
  for key, value in train_overrides.items():
    setattr(config.train, key, value)
  sampler = train_data.make_sampler(config, data_dir)
  return config, sampler, diffusion.train(config, str(workdir), sampler.batch,
                                          progress=False)
