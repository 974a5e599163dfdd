"""Flax NNX networks: the diffusion denoiser (unet), segmentation UNet, VGG."""
