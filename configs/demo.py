"""The README's main job: phantom BraTS 2020 data, CPU minutes.

The tiny CPU network on full-size phantom volumes (32 cases) and 64 x 64
slices: G1 trained federated over CBICA and TCIA for a few hundred steps, a
short blended DDIM synthesis, the baselines, G2 and TCIA's local synthesis,
the segmentation runs, the privacy audit and the report (about 25 minutes on
a 2-core CPU).
It stands on its own (tests/test_configs.py compares it with a frozen copy,
tests/data/demo_config.json), so changing the test config never changes the
demo's numbers.

Variants: none (--config=configs/demo.py).
"""

import ml_collections

import configs
from configs import data
from configs import diffusion
from configs import federated
from configs import segmentation

VARIANTS = {"": "phantom BraTS 2020, tiny network, CPU minutes"}


def get_config(arg=None) -> ml_collections.ConfigDict:
  configs.variant(arg, VARIANTS, "demo.py")
  config = ml_collections.ConfigDict()
  # Seed of the model's initialisation and of training's randomness.
  config.seed = 0

  # The phantom BraTS folder (launch/make_phantom.py, data_pipeline/phantom.py).
  config.phantom = ml_collections.ConfigDict()
  # BraTS release whose layout the phantom copies: 2020 | 2021 | 2023.
  config.phantom.version = "2020"
  # Cases written (the 2020 layout spreads them over CBICA, TCIA, ...): 32
  # give CBICA 12 and TCIA 13 patients, 5 of each for testing (data below):
  # the evaluation's gain intervals and the privacy audit's held-out
  # patients need at least 5 (evaluation.min_test_patients).
  config.phantom.num_cases = 32
  # Seed of the phantom's anatomy and tumors.
  config.phantom.seed = 0
  # Grid scale in (0, 1]; 1.0 is the full BraTS grid 240 x 240 x 155.
  config.phantom.scale = 1.0

  config.data = data.get_data_config()
  # The 2020 phantom has both of the paper's private centers.
  config.data.centers = "CBICA,TCIA"
  # Healthy slices kept (825 at paper scale). Only the 7 volumes of the
  # phantom's non-private centers (2013, TMC, new-2020) give public
  # backgrounds, so a 2 mm healthy grid with up to 15 per volume (the tumor
  # slices keep the 5 mm grid).
  config.data.healthy_max = 200
  config.data.healthy_stride_mm = 2.0
  config.data.healthy_slices_per_volume = 15
  # 64 x 64 slices: small enough for CPU minutes.
  config.data.image_size = 64
  # Up to 8 tumor slices per case (5 mm apart) and 40 % of each center's
  # patients for testing: 5 test patients per center (7 and 8 for training).
  config.data.tumor_slices_per_volume = 8
  config.data.test_fraction = 0.4

  diffusion.add_diffusion_sections(config)
  # The smallest network (dfgm_jax/models/unet.py presets).
  config.model.preset = "tiny"
  # The paper's T = 1000 diffusion steps (the section's default).
  # Training: a few hundred steps of the CBICA client, read without TF.
  config.train.reader = "grain"
  config.train.center = "CBICA"
  config.train.batch_size = 8
  config.train.lr = 1e-3
  config.train.num_steps = 300
  config.train.warmup_steps = 50
  config.train.log_every = 50
  config.train.checkpoint_every = 100
  config.train.async_checkpoints = True
  # G1 is federated (decentralized.federated_g1 below): the two private
  # centers as two clients, 3 rounds of 50 local steps, so that the clients
  # together take as many steps as the central run above (300; the central
  # settings stay for launch.train_diffusion and the anomalydiffusion model).
  config.fed = federated.get_fed_config()
  config.fed.centers = "CBICA,TCIA"
  config.fed.rounds = 3
  config.fed.local_steps = 50
  # The clients one after another: on the 2-core CPU the vmapped (stacked)
  # program took about 1.7x the CPU time per client step of one client's
  # program (docs/benchmark_log.md), and the two clients share that program.
  config.fed.engine = "sequential"
  # Synthesis: a short blended DDIM run (the paper-scale default is 195 NFE).
  config.sampler.steps = 25
  config.sampler.resamples = 1
  config.sampler.batch_size = 8

  # The evaluation's segmenter (launch/evaluate.py): a narrow UNet with 3
  # down-samplings (64 / 8 = 8 pixels at the bottom), batch 8, two seeds.
  # Measured on these slices (2-core CPU, 15 epochs): run A reaches a mean
  # Dice of about 0.47 (C about 0.85) at 8.5 steps/s; width 12 gave 0.69 /
  # 0.90 at 5.5 steps/s, width 16 with batch 16 and 30 epochs 0.70 / 0.94 at
  # 1.5 steps/s: too slow for nine runs and too close to the ceiling to see
  # a gain.
  config.seg = segmentation.get_seg_config()
  config.seg.width = 8
  config.seg.depth = 3
  config.seg.batch_size = 8
  # Every run 300 optimizer steps, before and after alike: what
  # run B took under the old rule of 15 epochs (A took 90, its loss still
  # at 0.43-0.48 when it stopped). The evaluation's convergence check says
  # whether A's and C's loss is flat by then: measured (2-core CPU), not by
  # its 5 % rule: A's training loss fell 20-25 % over its last 20 % of 300
  # steps (C 16-22 %), and still 47 % at 1200 steps, while A's test Dice
  # did not improve (0.68 / 0.73 at 300, 0.67 / 0.68 at 1200; 0.47 at 90):
  # the 54 slices are being memorised. budget=epochs with epochs=15 gives
  # the old, unequal comparison.
  config.seg.budget = "steps"
  config.seg.steps = 300
  config.seg.epochs = 15
  config.seg.seeds = (0, 1)
  # One seed at a time: stacked, the seeds' grouped convolutions took about
  # 2x the CPU time per seed on the 2-core CPU (docs/benchmark_log.md); every
  # run and seed then trains one program, compiled once through the
  # pipeline's compilation cache (dfgm_jax/compile_cache.py).
  config.seg.stack_seeds = "sequential"
  # What the pipeline compares dfgm with (baseline sets, quality table):
  # both baselines; the quality table's VGG16 features (224 px on the CPU)
  # on 48 slices per set.
  config.evaluation = segmentation.get_evaluation_config()
  config.evaluation.quality_max_slices = 48
  # The decentralized stages of run_pipeline (configs/federated.py): G1
  # federated over CBICA and TCIA (in place of the central run), the shared
  # model G2 on the public synthetic set and the healthy slices, and TCIA's
  # local synthesis with G2 (harmonise, one healthy slice per published
  # tumor: as many images as run D adds), evaluated as run D_local.
  config.decentralized = federated.get_decentralized_config()
  config.decentralized.federated_g1 = True
  config.decentralized.g2 = True
  config.decentralized.local_synthesis = "harmonise"
  config.decentralized.local_k = 1
  # G2 (launch.train_g2; any train field): 150 steps from fresh weights.
  config.g2 = ml_collections.ConfigDict()
  config.g2.num_steps = 150
  return config
