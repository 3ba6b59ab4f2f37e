"""Drafters: DFlash (block diffusion conditioned on target features) and baselines."""
