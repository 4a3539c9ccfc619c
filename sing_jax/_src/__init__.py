"""Implementation modules of sing_jax; the public API is re-exported by ``sing_jax``."""
