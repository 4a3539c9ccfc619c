"""Learning-rate schedules of the seeds, as optax schedules usable as ``learning_rate=``.

``sing_jax.schedules.warmup_cosine(...)`` and friends; docs/recipes.md has the table
of which optax function gives each of seed 003's schedules.
"""

from sing_jax._src.schedules import (
    SPHERICAL_BENCHMARK_DECAY_EPOCHS,
    SPHERICAL_BENCHMARK_EPOCHS,
    cosine_warm_restarts,
    damped_cosine,
    epochwise,
    step_decay_at_epochs,
    warmup_constant_cosine,
    warmup_cosine,
)

__all__ = [
    "SPHERICAL_BENCHMARK_DECAY_EPOCHS",
    "SPHERICAL_BENCHMARK_EPOCHS",
    "cosine_warm_restarts",
    "damped_cosine",
    "epochwise",
    "step_decay_at_epochs",
    "warmup_constant_cosine",
    "warmup_cosine",
]
