"""BraTS defaults (T2, 128 x 128, the paper's model and sampler).

Variants (--config=configs/default.py[:variant]):
  (none)     BraTS 2020, 2021 or 2023 training data as found: the paper's
             private centers CBICA and TCIA when the data has them (2020),
             else every center (2021 and 2023 folders form one center);
             see data.centers = 'auto'.
  paper      the paper's setting exactly: BraTS 2020 with CBICA and TCIA as
             the private centers; data without them is refused.
  runlocal   the same data settings (it reads the same preprocessed slices)
             with a tiny network, small batches and a few steps: checks a
             real-data workflow end to end on a CPU in minutes (big_vision's
             ':runlocal'). Its models are not meant to be used.
"""

import ml_collections

import configs
from configs import data
from configs import diffusion
from configs import federated
from configs import segmentation

VARIANTS = {
    "": "BraTS 2020/2021/2023, centers auto",
    "paper": "BraTS 2020, CBICA and TCIA",
    "runlocal": "tiny model and few steps on the same data",
}


def get_config(arg=None) -> ml_collections.ConfigDict:
  variant = configs.variant(arg, VARIANTS, "default.py")
  config = ml_collections.ConfigDict()
  # Seed of the model's initialisation and of training's randomness.
  config.seed = 0
  config.data = data.get_data_config()
  diffusion.add_diffusion_sections(config)
  # Federated G1 (ALGORITHM.md 6): R = 100 rounds of tau = 500 local steps,
  # every private center of the slices a client.
  config.fed = federated.get_fed_config()
  # The evaluation's segmenter at paper scale: the standard UNet (width 64,
  # 4 down-samplings), 1500 optimizer steps for every run (budget=steps;
  # budget=epochs: the paper's 50 epochs), 3 seeds (ALGORITHM.md 7).
  config.seg = segmentation.get_seg_config()
  if variant == "paper":
    # The two private centers of the paper (BraTS 2020 name_mapping.csv).
    config.data.centers = "CBICA,TCIA"
  elif variant == "runlocal":
    config.model.preset = "tiny"
    config.train.batch_size = 8
    config.train.num_steps = 20
    config.train.warmup_steps = 5
    config.train.log_every = 5
    config.train.checkpoint_every = 10
    config.sampler.steps = 10
    config.sampler.resamples = 1
    config.sampler.batch_size = 8
    config.fed.rounds = 2
    config.fed.local_steps = 10
  # What the pipeline compares dfgm with (baseline sets, quality table).
  config.evaluation = segmentation.get_evaluation_config()
  # Decentralized stages of run_pipeline (federated G1, G2, local
  # synthesis): off; see configs/federated.py.
  config.decentralized = federated.get_decentralized_config()
  return config
