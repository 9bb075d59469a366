"""Sweeps: search spaces as data (space.py), budget-filtered Optuna search inside Ray Tune with
early stopping (runner.py, schedulers.py), results.csv per sweep."""

import os
import sys

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def keep_ray_on_loopback() -> bool:
    """Make a Ray started by this process advertise and listen on 127.0.0.1 only (a laptop sweep
    opens no port to the network). Ray reads the switch when it is imported, so this must run
    before `import ray`; returns False when it is too late (Ray already imported without it)."""
    if "ray" in sys.modules:
        return os.environ.get(LOOPBACK_ENV) == "0"
    os.environ.setdefault(LOOPBACK_ENV, "0")
    return os.environ[LOOPBACK_ENV] == "0"
