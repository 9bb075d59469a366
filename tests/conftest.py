"""Test tiers and what every test shares.

    pytest            the fast tier: tests that train nothing big, start no Ray and kill nothing
    pytest --full     everything (README's test command; CI runs it)

A test is out of the fast tier when it is marked `slow` (trains or exports for more than a few
seconds), `ray` (starts or uses Ray) or `chaos` (kills a process and resumes). Naming tests
(`pytest tests/test_sweep.py::test_x`, `-k racing`) or a marker expression (`-m ray`) runs what
is named, whatever its tier.

The whole session shares one cache folder (MDSEARCH_CACHE_DIR: text embeddings, the attribute
classifier), set before Ray can be imported, so a Ray the tests start hands it to its workers and
is never restarted to change it. The first sweep starts a local Ray on 127.0.0.1; later tests
in the process reuse it (tests of clusters, kills and resumes start their own), and it is
stopped at the end of the session.
"""

import os
import shutil
import tempfile

# Every Ray the tests start (local, or a Cluster of nodes) stays on 127.0.0.1: Ray reads this
# when it is imported, so it is set before any test module imports it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402

from helpers import tiny  # noqa: E402

TIERED = ("slow", "ray", "chaos")
_CACHE = tempfile.mkdtemp(prefix="mdsearch-test-cache-")
os.environ["MDSEARCH_CACHE_DIR"] = _CACHE


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="run every tier (slow, ray, chaos), not only the fast one")


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    named = (config.getoption("markexpr") or config.getoption("keyword")
             or any("::" in a for a in config.args))
    if config.getoption("--full") or named:
        return
    fast, later = [], []
    for item in items:
        (later if any(item.get_closest_marker(m) for m in TIERED) else fast).append(item)
    if later:
        config.hook.pytest_deselected(items=later)
        items[:] = fast


def pytest_report_header(config):
    if not config.getoption("--full"):
        return "tier: fast (slow, ray and chaos tests deselected; --full runs every tier)"
    return "tier: full"


@pytest.fixture(scope="session", autouse=True)
def _stop_ray_at_the_end():
    yield
    import sys

    if "ray" in sys.modules:
        import ray

        ray.shutdown()


@pytest.fixture(autouse=True, scope="session")
def _state_key(tmp_path_factory):
    """The key that signs sweep state (mdsearch.search.signing) is the test session's own, not
    the user's ~/.config/mdsearch/state.key."""
    os.environ["MDSEARCH_STATE_KEY"] = str(tmp_path_factory.mktemp("key") / "state.key")
    yield


@pytest.fixture
def tiny_spec():
    return tiny


@pytest.fixture
def lock_holder():
    """Start another process that holds DIRECTORY's run lock (mdsearch.rundir.locked); returns
    it once the lock is held. It is killed at the end of the test."""
    import subprocess
    import sys

    started = []

    def hold(directory, what):
        code = ("import time\nfrom mdsearch.rundir import locked\n"
                f"with locked({str(directory)!r}, {what!r}):\n    print('in', flush=True)\n"
                "    time.sleep(60)")
        process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout.readline().strip() == "in"
        return process

    yield hold
    for process in started:
        process.kill()
        process.wait()
