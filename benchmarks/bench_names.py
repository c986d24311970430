"""The benchmark suite's model and variant names, in one place.

``conftest.py`` builds them and ``report.py`` tables them; ``test_overhead.py`` parametrizes over
them at import time, before any fixture exists, and cannot import ``conftest.py`` itself (it
would clash with ``tests/conftest.py`` under the module name ``conftest``).
"""

MODELS: tuple[str, ...] = ("digits_cnn", "mlp", "resnet18_gn")
VARIANTS: tuple[str, ...] = (
    "nonprivate",
    "dp",
    "oracle",
    "oracle_sync",
    "default",
    "fixed",
    "critic_every_step",
)

# Opacus ghost clipping (no per-sample gradients): the DP ghost step, the defaults, and tokens +
# Gram oracle every step with and without overlap. The small models; ResNet-18's ghost step on
# a CPU takes seconds.
GHOST_MODELS: tuple[str, ...] = ("digits_cnn", "mlp")
GHOST_VARIANTS: tuple[str, ...] = ("dp", "default", "oracle", "oracle_sync")
