"""The `data` section shared by every config: preprocessing and slicing.

Defaults follow shared/docs/ALGORITHM.md Appendix A and BRATS_FORMAT.md
sections 1.6 and 5. Lengths are in mm (converted with each volume's voxel size)
so that downsampled phantom data slices like full-resolution BraTS.
dfgm_jax/config_checks.py says what each field accepts.
"""

import ml_collections


def get_data_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Modalities stacked as image channels (canonical names t1, t1ce, t2, flair).
  c.modalities = ("t2",)
  # Also require the other BraTS modality files of a case (each read to its
  # end and checked finite and not all zero).
  c.require_all_modalities = True
  # Centers that get <center>_train / <center>_test splits: comma-separated
  # names, 'all', or 'auto' (CBICA,TCIA when present, else every center).
  c.centers = "auto"
  # TCIA01..TCIA13 -> TCIA (the paper's TCIA = 167 cases, HGG and LGG).
  # False keeps each TCIA site its own center (name them in `centers`). The
  # site is name_mapping.csv's (2020) or the case id's (2018 / 2019).
  c.merge_site_numbers = True
  # Share of each center's patients in its test split, in [0, 1);
  # round-half-up: 103/26 of CBICA's 129, 134/33 of TCIA's 167.
  c.test_fraction = 0.2
  # Seed of the patient split.
  c.split_seed = 0
  # Tumor slices: z = 0, stride, 2*stride, ... with enough whole tumor, at most
  # tumor_slices_per_volume around the largest cross-section (0 = no cap).
  c.slice_stride_mm = 5.0
  c.tumor_slices_per_volume = 5
  # Whole-tumor area a tumor slice needs.
  c.min_tumor_area_mm2 = 100.0
  # Healthy slices: stride grid, no tumor, >= healthy_min_gap_mm from every
  # tumor slice, brain area >= healthy_min_brain_frac of the slice area,
  # <= healthy_slices_per_volume per volume (0 = no cap), never from test
  # patients, then a seeded (healthy_seed) subsample to healthy_max. The
  # `healthy` split (the memory bank, G2's healthy data, DP's unclipped pool)
  # takes public-origin slices only (volumes of non-private centers); with
  # fewer than healthy_max it holds those there are (logged, manifest
  # `healthy`). Each private center's training patients' healthy slices go to
  # its own private <center>_healthy split (that center's local synthesis);
  # its test patients' go to <center>_test_healthy (all of them; the
  # evaluation's false positives only).
  c.healthy_slices_per_volume = 5
  # Grid of the healthy slices in mm (0 = slice_stride_mm): a finer grid
  # gives more public backgrounds from few public volumes.
  c.healthy_stride_mm = 0.0
  c.healthy_min_gap_mm = 3.0
  c.healthy_min_brain_frac = 0.15
  c.healthy_max = 825
  c.healthy_seed = 0
  # Research switch for all-private data: fill the `healthy` split up to
  # healthy_max from private centers' training patients after the public
  # volumes. A synthetic set made on such slices is not shareable (written to
  # W/private/synthetic), G2 refuses it and DP-SGD refuses to train on it.
  c.healthy_include_private = False
  # Normalisation: clip brain voxels to these percentiles, scale to [-1, 1].
  c.norm_percentiles = (0.5, 99.5)
  # Output grid size in pixels (square slices).
  c.image_size = 128
  # How volumes reach that grid: 'resize' (antialiased, e.g. 240 -> 128) or
  # 'pad' (240 -> 256).
  c.spatial = "resize"
  # Shard formats written: tfrecord (tf.data) and array_record (TF-free).
  c.formats = ("tfrecord", "array_record")
  # Files per split; 0 lets TFDS choose.
  c.num_shards_hint = 0
  # 'raise' stops at the first bad case; 'skip' skips it and lists it in the manifest.
  c.on_error = "raise"
  return c
