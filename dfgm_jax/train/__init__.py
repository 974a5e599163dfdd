"""Training loops: diffusion (central and federated), segmentation."""
