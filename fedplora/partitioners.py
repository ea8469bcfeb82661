"""The names the ``partitioner`` setting accepts, in a module that imports nothing of fedplora.

``config.py`` declares the setting with these choices and ``tasks/partition.py`` implements them;
both import the names from here. (They used to live in ``config.py``, and ``tasks/partition.py``
importing ``config`` closed the cycle config -> tasks -> tasks.partition -> config, since
``config`` reads the task registry; ``tests/test_imports.py`` fails on any such cycle.)
"""

PARTITIONERS = ("iid", "dirichlet", "dirichlet_per_client", "pathological", "natural")  # tasks/partition.py

__all__ = ["PARTITIONERS"]
