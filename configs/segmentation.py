"""The `seg` section: the downstream segmenter and its training (ALGORITHM.md 7).

The network is dfgm_jax/models/seg_unet.py, the trainer
dfgm_jax/train/segmentation.py. Paper values where the paper states them
(Adam, lr 1e-3, BCE-with-logits); the rest are our choices (ALGORITHM.md 7).
A config adds it with `config.seg = segmentation.get_seg_config()`.
"""

import ml_collections


def get_seg_config() -> ml_collections.ConfigDict:
  """The segmenter (paper scale); the input channels are data.modalities."""
  c = ml_collections.ConfigDict()
  # Channels of the UNet's first level; level i has width * 2^i (64: the
  # standard UNet, about 31M parameters with transposed convolutions).
  c.width = 64
  # 2x down-samplings (4: the standard UNet; image_size must allow them).
  c.depth = 4
  # Bilinear up-sampling (about 17M parameters at width 64) instead of 2x2
  # transposed convolutions.
  c.bilinear = False
  # Activations: float32 or bfloat16 (parameters stay float32).
  c.dtype = "float32"
  # Adam's learning rate, constant (paper).
  c.lr = 1e-3
  # bce (BCE-with-logits, mean over pixels; paper) or bce_dice (plus a soft
  # Dice loss, mean over images).
  c.loss = "bce"
  # Global batch size (a multiple of the devices).
  c.batch_size = 16
  # How long a run trains, a fixed budget either way (no model selection,
  # the test set is never looked at): "steps" (the headline) trains every
  # run of a comparison, before and after, `steps` optimizer steps, so
  # that adding a synthetic set adds data, not updates; "epochs" is the
  # paper's fixed epoch rule (`epochs` passes over the run's own training
  # set), under which a run with the synthetic set added takes ~2-3x the
  # steps of its before run (on the demo that alone read as a +30 % gain).
  c.budget = "steps"
  # Optimizer steps of every run with budget=steps. 1500 = 50 epochs of
  # center 1's real set at paper scale (CBICA, 483 slices: 30 steps of 16
  # per epoch), i.e. run A's length under the paper's rule; the after runs
  # take as many. The evaluation's convergence check (eval/runs.py) says
  # whether the before runs' loss is flat by then.
  c.steps = 1500
  # Epochs of every run with budget=epochs (the paper's rule).
  c.epochs = 50
  # Probability of a horizontal flip of each training example (image and
  # mask together).
  c.hflip = 0.5
  # Seeds of a run: each one an initialisation, data order and flips; the
  # results are reported as mean and std over them.
  c.seeds = (0, 1, 2)
  # How the seeds are trained: stacked (one compiled program, vmap over the
  # models; on out-of-memory the trainer falls back to one seed at a time by
  # itself), sequential (one at a time), or auto: stacked on CPUs (one
  # compile instead of one per seed; the throughput per seed was 0.82-1.23x,
  # and about 0.5x in CPU time at the demo's width 8, docs/benchmark_log.md)
  # and sequential on accelerators (on an H200 the vmapped convolutions ran
  # at 0.34x: 474 against 1,378 images/s at width 64). With a compilation
  # cache (run_pipeline and launch.evaluate keep one) the seeds share one
  # compile, so sequential wins there: the demo sets it. Same results up to
  # float rounding either way.
  c.stack_seeds = "auto"
  # Write metrics every this many steps (and at the end).
  c.log_every = 10
  # Save a checkpoint every this many epochs of the run's training set (and
  # at the end), with either budget; 0: only at the end.
  c.checkpoint_every_epochs = 5
  # Checkpoints kept per seed group.
  c.checkpoints_to_keep = 2
  # Save checkpoints in the background.
  c.async_checkpoints = True
  # Also write TensorBoard event files beside metrics.jsonl.
  c.tensorboard = True
  return c


def get_evaluation_config() -> ml_collections.ConfigDict:
  """The `evaluation` section: what the pipeline compares dfgm with (issue 12).

  Not part of any run's identity but its own stages': changing the
  baselines never invalidates the dfgm synthetic set or a segmentation run.
  """
  c = ml_collections.ConfigDict()
  # Baseline synthetic sets the pipeline makes for runs B_<mode>, D_<mode>
  # (ALGORITHM.md 8): cutpaste (no model) and/or anomalydiffusion (its own
  # model, trained like G1 but on the dilated region: the fair baseline);
  # () for none.
  c.baselines = ("cutpaste", "anomalydiffusion")
  # Slices per synthetic set (a fixed subsample) the quality table's VGG16
  # features are computed on; 0: all.
  c.quality_max_slices = 512
  # KID (kernel inception distance) on the same features: the
  # unbiased MMD^2 averaged over this many random subsets of
  # min(n_real, n_synthetic, quality_kid_subset_size) slices a side (a kernel
  # on at most 2 x 512 rows, computed once: the subsets cost next to nothing
  # beside the VGG16 features).
  c.quality_kid_subsets = 100
  c.quality_kid_subset_size = 1000
  # The real-vs-real noise floor: random splits of the real patients into
  # halves, each set's FD and KID against the same half at the same n; a set
  # is called above the noise (or ahead of another) only in >= 90 % of them.
  # 20 splits give the fraction in steps of 5 %.
  c.quality_real_splits = 20
  # Test patients a center needs for a gain's interval: the bootstrap
  # resamples patients (and seeds), and with fewer the interval is too
  # narrow to mean anything (1 patient: zero width). Below it the report
  # gives the point gain and says the test set is too small to tell.
  c.min_test_patients = 5
  return c
