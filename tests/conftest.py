import os

# Every Ray the tests start (local, or a Cluster of nodes) stays on 127.0.0.1: Ray reads this
# when it is imported, so it is set before any test module imports it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402

from mdsearch.arch import presets  # noqa: E402

TINY = {"head_dim": 16, "norm_groups": 8, "context_dim": 32, "context_len": 8,
        "time_freq_dim": 32, "time_embed_dim": 64}


def tiny(name: str, **overrides):
    """A preset's topology at a width small enough to run real tensors on 2 CPU cores."""
    widths = {"sd15": (32, 64, 64, 64), "sdxl": (32, 64, 64)}.get(name, (32, 64, 64))
    fields = {**TINY, **{f"levels.{i}.channels": c for i, c in enumerate(widths)}}
    if name == "sdxl":
        fields.update(micro_cond_dim=8, pooled_dim=16, **{"levels.2.down.layers": 2,
                                                          "levels.2.up.layers": 2,
                                                          "mid_layers": 2})
    if name == "sd15":
        fields.update(num_heads=4, head_dim=None)
    fields.update(overrides)
    return presets.get(name, fields)


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
