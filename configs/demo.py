"""The README's main job: phantom BraTS 2020 data, CPU minutes."""

import ml_collections

from configs import data


def get_config(arg=None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.phantom = ml_collections.ConfigDict()
  config.phantom.version = "2020"
  config.phantom.num_cases = 12
  config.phantom.seed = 0
  config.phantom.scale = 1.0  # full BraTS grid 240 x 240 x 155.
  config.data = data.get_data_config()
  config.data.centers = "CBICA,TCIA"
  config.data.healthy_max = 200
  return config
