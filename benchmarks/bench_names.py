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
