"""Ray Tune's pickles in a sweep folder, signed so that `--resume` never loads one it did not
write.

Tune keeps a sweep's resumable state as pickles: `tuner.pkl`, the trial states inside
`experiment_state-*.json`, `search_gen_state-*.json` (a pickle despite its name),
`callback-states-*.pkl` and each failed trial's `error.pkl`. `Tuner.restore` unpickles them, and
unpickling runs whatever code the file names. So mdsearch signs every such file as it is written
(an HMAC-SHA256 of its bytes in `FILE.sig` beside it), with a key kept outside the folder
(`~/.config/mdsearch/state.key`, or the file `MDSEARCH_STATE_KEY` names; made on first use, mode
600), and `check` refuses a resume, before Ray loads anything, when one of them is unsigned or
its signature does not match: a pickle crafted or swapped into a shared folder runs nothing.

Where the signing happens: `SignedSearchGenerator.save_to_dir` (Tune writes the experiment state,
then the search state, at every experiment checkpoint, both in the driver's staging folder that
it then copies into the sweep folder: the signatures are made there and travel with them),
`SignErrors.on_trial_error` (error.pkl) and `sign(tuner.pkl)` right after the Tuner is made.

A sweep resumed on another machine needs the same key there (copy the key file, or point
`MDSEARCH_STATE_KEY` at a copy); a folder made before mdsearch signed its state is resumed once
with `--trust-state`, which signs what is there after the user has vouched for it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from ray.tune import Callback
from ray.tune.search import SearchGenerator

from ..config import ConfigError

KEY_ENV = "MDSEARCH_STATE_KEY"
SIGNATURE = ".sig"
PICKLED = ("tuner.pkl", "experiment_state-*.json", "search_gen_state-*.json",
           "callback-states-*.pkl", "*/error.pkl")
"""Every file of a sweep folder that Ray Tune unpickles on --resume (or when it reads a resumed
sweep's failed trials), as globs relative to the folder."""


class UnsignedStateError(ConfigError):
    """A pickle in a sweep folder that mdsearch did not sign (or signed with another key)."""


def key_path() -> Path:
    return Path(os.environ.get(KEY_ENV) or Path.home() / ".config" / "mdsearch" / "state.key")


def _key() -> bytes:
    path = key_path()
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as err:
        raise UnsignedStateError(f"{path}: the key that signs sweep state cannot be read "
                                 f"({type(err).__name__}); {KEY_ENV} names another") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # O_EXCL: two first sweeps at once agree on one key
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _key()
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return _key()


def _mac(path: Path, key: bytes) -> str:
    return hmac.new(key, path.read_bytes(), hashlib.sha256).hexdigest()


def _write_signature(path: Path, macs: list[str]) -> None:
    """PATH.sig listing `macs`, one per line, written atomically (whole or absent)."""
    temp = path.with_name(f".{path.name}{SIGNATURE}.{os.getpid()}.tmp")
    temp.write_text("\n".join(macs) + "\n")
    os.replace(temp, path.with_name(path.name + SIGNATURE))


def sign(path: str | Path) -> None:
    """Write PATH.sig, the keyed hash of PATH's bytes."""
    path = Path(path)
    _write_signature(path, [_mac(path, _key())])


def is_state_file(path: str | Path) -> bool:
    """Whether a file, by its name, is one of the Tune pickles a sweep folder signs."""
    name = Path(path).name
    return any(fnmatch.fnmatch(name, pattern.rsplit("/", 1)[-1]) for pattern in PICKLED)


def sign_incoming(new: str | Path, final: str | Path) -> None:
    """Before `new` (a complete new version of the state file `final`) is renamed over it: add
    its keyed hash to FINAL.sig beside the current version's, so that a kill between this rename
    and the copy of the staging folder's signature leaves a pair that still matches. Nothing
    where this machine has no key (a worker node: Tune's state is the driver's)."""
    if not key_path().is_file():
        return
    final = Path(final)
    try:
        kept = final.with_name(final.name + SIGNATURE).read_text().split()[-1:]
    except (OSError, UnicodeDecodeError):
        kept = []
    _write_signature(final, [*kept, _mac(Path(new), _key())])


def keep_previous(new_signature: str | Path, final: str | Path) -> None:
    """Before a copied signature (`new_signature`, complete) replaces FINAL.sig: keep the
    current version's hash in it too, so that a kill before the state file itself is copied
    leaves a pair that still matches."""
    try:
        kept = Path(final).read_text().split()[-1:]
    except (OSError, UnicodeDecodeError):
        return
    incoming = Path(new_signature).read_text().split()
    Path(new_signature).write_text("\n".join([*kept, *incoming]) + "\n")


def pickled_files(sweep_dir: Path) -> list[Path]:
    return sorted({p for pattern in PICKLED for p in Path(sweep_dir).glob(pattern) if p.is_file()})


def check(sweep_dir: str | Path) -> None:
    """Refuse (one line naming the file) a sweep folder holding a Tune pickle that this key did
    not sign. Reads bytes only: nothing is unpickled."""
    key = _key()
    for path in pickled_files(Path(sweep_dir)):
        signature = path.with_name(path.name + SIGNATURE)
        try:  # (while a new version is copied in, the signature lists the old one's and its)
            expected = signature.read_text().split()
        except (OSError, UnicodeDecodeError):
            expected = None
        mac = _mac(path, key)
        if expected is None or not any(hmac.compare_digest(e, mac) for e in expected):
            why = ("has no signature" if expected is None else
                   "does not match its signature")
            raise UnsignedStateError(
                f"{path}: {why}: it is a pickle that Ray Tune would load (and run) on --resume, "
                f"and mdsearch did not write it with this machine's key ({key_path()}); nothing "
                "was loaded or changed. If you made this sweep yourself (before mdsearch signed "
                f"its state, or with another key), resume it once with --trust-state; else "
                "start a new sweep (another --name)")


def sign_all(sweep_dir: str | Path) -> int:
    """`--trust-state`: sign every Tune pickle in the folder as it is now; returns how many."""
    paths = pickled_files(Path(sweep_dir))
    for path in paths:
        sign(path)
    return len(paths)


class SignedSearchGenerator(SearchGenerator):
    """Tune's search generator, signing the state files of each experiment checkpoint: the
    experiment state (written just before this is called) and the search state (written by
    this). Tune writes `callback-states-*.pkl` after this, and only for callbacks that keep
    state; mdsearch's callbacks keep none (their state is results.csv and the journals), so
    such a file in a sweep folder was not written by mdsearch and `check` refuses it."""

    def save_to_dir(self, dirpath: str, session_str: str):
        super().save_to_dir(dirpath, session_str)
        for name in (f"experiment_state-{session_str}.json", f"search_gen_state-{session_str}.json"):
            if (Path(dirpath) / name).is_file():
                sign(Path(dirpath) / name)


class SignErrors(Callback):
    """Signs the error.pkl Tune writes for a failed trial (it loads it again when it reads the
    sweep's results)."""

    def on_trial_error(self, iteration, trials, trial, **info):
        path = trial.pickled_error_file
        if path and Path(path).is_file():
            sign(path)
