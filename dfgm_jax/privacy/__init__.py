"""Privacy audit (issue 14): memorization metrics of synthetic sets.

  distances     region-masked RMSE nearest neighbours, chunked on device.
  memorization  DCR, NN ratio, Carlini's calibrated distance, source-ring
                replication, with thresholds from held-out slices.
  membership    loss-based membership inference against a diffusion model.
  attack_stats  a membership attack's numbers with patient-bootstrap intervals.
  scan          private identifiers in the files that would be shared.
  audit         every check as one run(): privacy.json, privacy.md, summary.
"""
