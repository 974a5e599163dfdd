"""Real BraTS MRI at the CPU's scale: the eleven BraTS 2018 cases, CPU minutes.

  python -m launch.run_pipeline --config=configs/real_cpu.py \
      --brats_dir=../shared/data/brats18_real --workdir=runs/real18

The demo's network and stages (configs/demo.py) on real scans: G1 trained
federated over CBICA and TCIA, a short blended DDIM synthesis, the
baselines, G2 and TCIA's local synthesis, the segmentation runs, the
privacy audit and the report, on 64 x 64 T2 slices. The eleven cases are
three public volumes (2013), two CBICA and six TCIA patients
(TCIA01/02/10/13 merged as BraTS 2020's mapping does); docs/real_data_run.md
is this config's run. It stands on its own, like the demo: changing the demo
or the test config never changes this run.

Any real BraTS folder works (docs/real_data.md); with many more patients,
configs/default.py is the better start.

Variants: none (--config=configs/real_cpu.py).
"""

import ml_collections

import configs
from configs import data
from configs import diffusion
from configs import federated
from configs import segmentation

VARIANTS = {"": "real BraTS (the eleven 2018 cases), tiny network, CPU minutes"}


def get_config(arg=None) -> ml_collections.ConfigDict:
  configs.variant(arg, VARIANTS, "real_cpu.py")
  config = ml_collections.ConfigDict()
  # Seed of the model's initialisation and of training's randomness.
  config.seed = 0

  # Only used without --brats_dir (the pipeline's phantom stage): a phantom
  # in the 2018 layout, so the config also runs on a machine without real data.
  config.phantom = ml_collections.ConfigDict()
  config.phantom.version = "2018"
  config.phantom.num_cases = 11
  config.phantom.seed = 0
  config.phantom.scale = 1.0

  config.data = data.get_data_config()
  # The paper's two private centers, kept apart (not pooled): G1 stays
  # federated over two clients, each with its own test patients. CBICA has
  # only two patients, so its client trains on one and its evaluation has
  # one: enough to run the federated rounds and the per-center tables, not
  # to say anything about CBICA.
  config.data.centers = "CBICA,TCIA"
  # Round-half-up per center (data_pipeline/slices.py: split_patients):
  # CBICA 2 -> 1 train / 1 test, TCIA 6 -> 4 train / 2 test. Any fraction
  # in [0.25, 0.75) gives CBICA its test patient; 0.3 keeps four TCIA
  # patients for training. Three test patients in all: below
  # evaluation.min_test_patients (5), so the gains come without intervals.
  config.data.test_fraction = 0.3
  # The public healthy bank comes from the three 2013 volumes only: a 1 mm
  # grid without a per-volume cap (every tumor-free slice with enough brain,
  # >= 3 mm from the tumor). The 2 mm grid gave 26 slices; neighbours 1 mm
  # apart are close to each other, but the matcher has twice the choice.
  config.data.healthy_max = 200
  config.data.healthy_stride_mm = 1.0
  config.data.healthy_slices_per_volume = 0
  # 64 x 64 slices, as the demo: CPU minutes.
  config.data.image_size = 64
  # Real tumors span 3-8 cm: up to 10 tumor slices per case on the 5 mm grid.
  config.data.tumor_slices_per_volume = 10

  diffusion.add_diffusion_sections(config)
  # The smallest network (dfgm_jax/models/unet.py presets).
  config.model.preset = "tiny"
  # Central training settings (launch.train_diffusion, the anomalydiffusion
  # baseline); G1 itself is federated below. train.center is also the center
  # whose tumors are synthesized and audited: it must be center 1 of
  # data.centers, whose synthetic split runs B, D and E read (CBICA_synthetic).
  config.train.reader = "grain"
  config.train.center = "CBICA"
  config.train.batch_size = 8
  config.train.lr = 1e-3
  config.train.num_steps = 300
  config.train.warmup_steps = 50
  config.train.log_every = 50
  config.train.checkpoint_every = 100
  config.train.async_checkpoints = True
  # G1 federated over the two private centers: 3 rounds of 50 local steps.
  config.fed = federated.get_fed_config()
  config.fed.centers = "CBICA,TCIA"
  config.fed.rounds = 3
  config.fed.local_steps = 50
  # Synthesis: a short blended DDIM run.
  config.sampler.steps = 25
  config.sampler.resamples = 1
  config.sampler.batch_size = 8

  # The evaluation's segmenter, as the demo's (width 8, 3 down-samplings,
  # batch 8, 300 optimizer steps per run) but one seed: the evaluation is the
  # pipeline's longest stage, and with three test patients a second seed
  # cannot turn "too few to tell" into a verdict.
  config.seg = segmentation.get_seg_config()
  config.seg.width = 8
  config.seg.depth = 3
  config.seg.batch_size = 8
  config.seg.budget = "steps"
  config.seg.steps = 300
  config.seg.epochs = 15
  config.seg.seeds = (0,)
  # Both baselines; the quality table on 48 slices per set. The evaluation's
  # min_test_patients stays at its default (5): with three test patients it
  # reports "too few to tell" rather than an interval.
  config.evaluation = segmentation.get_evaluation_config()
  config.evaluation.quality_max_slices = 48
  # Decentralized stages as the demo's: G1 federated, G2 on the public
  # synthetic set and the healthy slices, TCIA's local synthesis with G2.
  config.decentralized = federated.get_decentralized_config()
  config.decentralized.federated_g1 = True
  config.decentralized.g2 = True
  config.decentralized.local_synthesis = "harmonise"
  config.decentralized.local_k = 1
  config.g2 = ml_collections.ConfigDict()
  config.g2.num_steps = 150
  return config
