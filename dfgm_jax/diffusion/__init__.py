"""Diffusion process: schedules, forward noising, posterior, masked loss."""
