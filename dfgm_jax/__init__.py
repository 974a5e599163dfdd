"""DFGM in JAX/Flax: few-shot brain-tumor MRI synthesis and its evaluation."""
