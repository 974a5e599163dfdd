"""Paper defaults (BraTS 2020, T2, 128 x 128). Variants: default.py:paper."""

import ml_collections

from configs import data
from configs import diffusion


def get_config(arg=None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = data.get_data_config()
  config.data.centers = "CBICA,TCIA"
  diffusion.add_diffusion_sections(config)
  return config
