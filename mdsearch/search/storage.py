"""The filesystem Ray Tune writes a sweep folder through: the local disk, with every file
replaced atomically.

Tune writes its experiment and searcher state (and each trial's checkpoint) in a staging folder
first, then copies the files into the sweep folder with `pyarrow.fs.copy_files`, which opens
each destination (emptying it) and then writes it. A driver killed during that copy left an
empty or cut `searcher-state-*.pkl` or `experiment_state-*.json` behind, and `--resume` then had
nothing whole to resume from. Through `atomic_local_fs()` each file is written to a hidden
temporary file beside it (`.NAME.PARTIAL`) and renamed over the old one when complete, so a
kill at any moment leaves the previous version or the new one, never a part. Leftover temporary
files of a killed copy are removed when the sweep resumes (`remove_partials`). A Tune pickle's
keyed signature (`signing.py`) is extended with the new version's before the new version is
renamed into place, so a kill between a state file and its signature's copy leaves a matching
pair.
"""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path

import pyarrow.fs as pafs

from ..rundir import fault_point
from . import signing

PARTIAL = "mdsearch-partial"
_IDS = itertools.count()


class _ReplacedOnClose(io.FileIO):
    """A new file written under a temporary name and renamed to its own on close."""

    def __init__(self, path: str):
        self.final = path
        folder, name = os.path.split(path)
        self.temp = os.path.join(folder, f".{name}.{os.getpid()}-{next(_IDS)}.{PARTIAL}")
        super().__init__(self.temp, "wb")

    def __del__(self):  # dropped without close (an error mid-copy): the old file stays
        if not self.closed:
            io.FileIO.close(self)
            try:
                os.unlink(self.temp)
            except OSError:
                pass

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        # (tests: a kill with the new file written, not yet renamed; by file name, such as
        # storage-copy-searcher-state, so that only the process copying that file is killed)
        fault_point("storage-copy-" + os.path.basename(self.final))
        if signing.is_state_file(self.final):  # its signature first: old and new both match
            signing.sign_incoming(self.temp, self.final)
        elif self.final.endswith(signing.SIGNATURE) and \
                signing.is_state_file(self.final[:-len(signing.SIGNATURE)]):
            signing.keep_previous(self.temp, self.final)
        os.replace(self.temp, self.final)


class AtomicLocalHandler(pafs.FileSystemHandler):
    """pyarrow's local filesystem, except that output streams replace their file atomically."""

    def __init__(self):
        self.fs = pafs.LocalFileSystem()

    def __reduce__(self):  # Ray sends the storage filesystem to every trial's actor
        return AtomicLocalHandler, ()

    def __eq__(self, other):
        return isinstance(other, AtomicLocalHandler)

    def __ne__(self, other):
        return not self == other

    def get_type_name(self):
        return "mdsearch-atomic-local"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("mdsearch never empties the root of a filesystem")

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        with self.fs.open_input_stream(src) as source, \
                self.open_output_stream(dest, None) as target:
            while chunk := source.read(1 << 24):
                target.write(chunk)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        import pyarrow

        return pyarrow.PythonFile(_ReplacedOnClose(path), mode="w")

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path)


def atomic_local_fs() -> pafs.PyFileSystem:
    return pafs.PyFileSystem(AtomicLocalHandler())


def remove_partials(folder: str | Path) -> int:
    """Delete the temporary files a killed copy left in `folder` (at any depth); their count."""
    removed = 0
    for path in Path(folder).rglob(f".*.{PARTIAL}"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed
