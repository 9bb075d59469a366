"""The filesystem a sweep folder is written through: a copy killed half-way never leaves a cut
file where Tune's state (or a checkpoint) was."""

import pickle

import pyarrow.fs as pafs

from mdsearch.search.storage import PARTIAL, atomic_local_fs, remove_partials


def test_copies_arrive_whole_and_replace_the_old_file(tmp_path):
    src, dst = tmp_path / "staging", tmp_path / "sweep"
    (src / "checkpoint_000001").mkdir(parents=True)
    (src / "experiment_state-1.json").write_text('{"new": true}')
    (src / "checkpoint_000001" / "checkpoint.pt").write_bytes(bytes(range(256)) * 4096)
    dst.mkdir()
    (dst / "experiment_state-1.json").write_text('{"old": true}')
    pafs.copy_files(str(src), str(dst), destination_filesystem=atomic_local_fs())
    assert (dst / "experiment_state-1.json").read_text() == '{"new": true}'
    assert (dst / "checkpoint_000001" / "checkpoint.pt").read_bytes() == \
        bytes(range(256)) * 4096
    assert not list(dst.rglob(f"*{PARTIAL}"))


def test_a_stream_never_closed_leaves_the_old_file_and_a_temp_that_resume_removes(tmp_path):
    state = tmp_path / "searcher-state-1.pkl"
    state.write_text('{"format": 1}')
    fs = atomic_local_fs()
    stream = fs.open_output_stream(str(state))  # what pyarrow's copy does when it begins
    stream.write(b'{"form')  # ... and a kill here
    assert state.read_text() == '{"format": 1}'  # not emptied, not cut
    assert [p.name.startswith(".") for p in tmp_path.glob(f"*{PARTIAL}")] == [True]
    assert remove_partials(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == [state.name]


def test_the_filesystem_travels_to_trial_actors(tmp_path):
    fs = pickle.loads(pickle.dumps(atomic_local_fs()))
    with fs.open_output_stream(str(tmp_path / "a.txt")) as f:
        f.write(b"x")
    assert (tmp_path / "a.txt").read_bytes() == b"x"
    assert fs == atomic_local_fs()


def test_a_state_file_and_its_signature_match_whichever_of_them_a_kill_cuts_off(tmp_path):
    """Tune copies experiment_state-*.json and its .sig as two files: the sweep folder must hold
    a matching pair after a kill between them, in either order."""
    import pytest

    from mdsearch.search import signing

    src, dst = tmp_path / "staging", tmp_path / "sweep"
    src.mkdir()
    dst.mkdir()
    state, fs = "experiment_state-1.json", atomic_local_fs()
    (src / state).write_text('{"old": 1}')
    signing.sign(src / state)
    pafs.copy_files(str(src), str(dst), destination_filesystem=fs)
    signing.check(dst)
    (src / state).write_text('{"new": 2}')  # the next experiment checkpoint, in staging
    signing.sign(src / state)
    with fs.open_output_stream(str(dst / state)) as f:  # the state file copied first ...
        f.write((src / state).read_bytes())
    signing.check(dst)  # ... and a kill before its signature: still a matching pair
    with fs.open_output_stream(str(dst / (state + ".sig"))) as f:
        f.write((src / (state + ".sig")).read_bytes())
    signing.check(dst)
    (src / state).write_text('{"newer": 3}')  # and the next one, signature copied first ...
    signing.sign(src / state)
    with fs.open_output_stream(str(dst / (state + ".sig"))) as f:
        f.write((src / (state + ".sig")).read_bytes())
    signing.check(dst)  # ... and a kill before the state file: still a matching pair
    pafs.copy_files(str(src), str(dst), destination_filesystem=fs)
    signing.check(dst)
    (dst / state).write_text('{"crafted": 4}')  # a file this driver did not write: refused
    with pytest.raises(signing.UnsignedStateError, match="does not match its signature"):
        signing.check(dst)
