"""Tests: downsampled phantom volumes, 32 x 32 slices, the tiny network.

Tests tune this config freely; the demo (configs/demo.py) does not derive
from it. Variants: none (--config=configs/tiny.py).
"""

import ml_collections

import configs
from configs import data
from configs import diffusion
from configs import federated
from configs import segmentation

VARIANTS = {"": "tests: phantom at 0.4 scale, 32 x 32, tiny network"}


def get_config(arg=None) -> ml_collections.ConfigDict:
  configs.variant(arg, VARIANTS, "tiny.py")
  config = ml_collections.ConfigDict()
  # Seed of the model's initialisation and of training's randomness.
  config.seed = 0

  # The phantom BraTS folder (launch/make_phantom.py, data_pipeline/phantom.py).
  config.phantom = ml_collections.ConfigDict()
  # BraTS release whose layout the phantom copies: 2020 | 2021 | 2023.
  config.phantom.version = "2020"
  # Cases written.
  config.phantom.num_cases = 8
  # Seed of the phantom's anatomy and tumors.
  config.phantom.seed = 0
  # Grid scale in (0, 1]: 0.4 writes 96 x 96 x 62 volumes, fast to read.
  config.phantom.scale = 0.4

  config.data = data.get_data_config()
  # 32 x 32 slices.
  config.data.image_size = 32
  # The coarse grid holds smaller tumors; keep enough tumor slices.
  config.data.min_tumor_area_mm2 = 50.0
  # Healthy slices kept.
  config.data.healthy_max = 40

  diffusion.add_diffusion_sections(config)
  # The smallest network (dfgm_jax/models/unet.py presets).
  config.model.preset = "tiny"
  # T = 100 diffusion steps: short sampler runs in tests.
  config.diffusion.num_steps = 100
  config.train.batch_size = 8
  config.train.num_steps = 20
  config.train.warmup_steps = 5
  config.train.lr = 1e-3
  config.train.log_every = 5
  config.train.checkpoint_every = 10
  # Synchronous saves: a test reads the checkpoint right after train().
  config.train.async_checkpoints = False
  # Random batches of the right shapes: no data set needed.
  config.train.reader = "synthetic"

  # Federated G1: two clients, two short rounds.
  config.fed = federated.get_fed_config()
  config.fed.centers = "CBICA,TCIA"
  config.fed.rounds = 2
  config.fed.local_steps = 3

  # The segmenter of the evaluation: a narrow, shallow UNet, 6 steps per
  # run (the equal-steps budget), two stacked seeds (enough to test the
  # mean, std and stacking).
  config.seg = segmentation.get_seg_config()
  config.seg.width = 8
  config.seg.depth = 2
  config.seg.batch_size = 4
  config.seg.budget = "steps"
  config.seg.steps = 6
  config.seg.epochs = 1
  config.seg.seeds = (0, 1)
  config.seg.log_every = 5
  config.seg.checkpoint_every_epochs = 0
  # Synchronous saves and no event files: tests read right after training.
  config.seg.async_checkpoints = False
  config.seg.tensorboard = False
  # What the pipeline compares dfgm with: the cheap cutpaste baseline only.
  config.evaluation = segmentation.get_evaluation_config()
  config.evaluation.baselines = ("cutpaste",)
  config.evaluation.quality_max_slices = 64
  # Decentralized stages of run_pipeline (federated G1, G2, local
  # synthesis): off; see configs/federated.py.
  config.decentralized = federated.get_decentralized_config()
  return config
