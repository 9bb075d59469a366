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
