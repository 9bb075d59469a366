"""Keeping a local Ray on this machine: a laptop sweep or data-parallel run opens no port to the
network. (A bottom-layer module: the trainer's distributed runs and the sweeps both use it.)"""

import logging
import os
import socket
import sys

from .errors import MdsearchError

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class RayAddressError(MdsearchError):
    """A cluster address nothing answers at."""


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """Fail in one line, within `timeout` seconds, when a host:port cluster address does not
    answer (ray.init would retry for minutes). "auto", "local", None and ray:// addresses are left
    to Ray."""
    if address is None or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RayAddressError(f"--address {address}: expected host:port (the head node's GCS "
                              "address, e.g. 10.0.0.1:6379), auto or local")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError, OverflowError) as err:
        raise RayAddressError(f"--address {address}: no Ray cluster answers there "
                              f"({type(err).__name__}: {err}); start its head node (ray start "
                              "--head), fix the address, or leave --address out for a local "
                              "Ray") from None


def keep_ray_on_loopback() -> bool:
    """Make a Ray started by this process advertise and listen on 127.0.0.1 only (a laptop sweep
    opens no port to the network). Ray reads the switch when it is imported, so this must run
    before `import ray`; returns False when it is too late (Ray already imported without it)."""
    if "ray" in sys.modules:
        return os.environ.get(LOOPBACK_ENV) == "0"
    os.environ.setdefault(LOOPBACK_ENV, "0")
    return os.environ[LOOPBACK_ENV] == "0"


def start_ray(address: str | None = None, progress=None, **init_args) -> bool:
    """Start Ray for this process: a private local instance on 127.0.0.1 when `address` is None
    (never a Ray that another job left running on the machine, which `ray.init()` alone would
    join), else join the cluster at `address` ("auto", or host:port). Returns False when Ray was
    already initialised in this process (nothing started)."""
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        if not keep_ray_on_loopback() and progress is not None:
            progress("warning: Ray was imported before mdsearch could keep it on 127.0.0.1; set "
                f"{LOOPBACK_ENV}=0 before importing ray")
        # Ray turns token authentication on for a new local cluster (good) and logs a WARNING
        # saying so into the user's terminal (noise: nothing is wrong). Only that logger is
        # quietened; RAY_AUTH_MODE is left alone (set after Ray's import, it would make the
        # driver and its GCS disagree on the mode).
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR)
        ray.init(**{"address": "local", "include_dashboard": False, "logging_level": "WARNING",
                    "log_to_driver": False, **init_args})
    else:
        check_address(address)
        ray.init(**{"address": address, "logging_level": "WARNING", "log_to_driver": False,
                    **init_args})
    return True
