"""Experiment CLIs, configs and benchmark scripts over the sing_jax library."""
