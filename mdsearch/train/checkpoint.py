"""Reading a run's checkpoint: safely (weights only), with one clear error when it is damaged,
and with what it was trained from.

Checkpoints carry their full-size spec, proxy spec and recipe (`Training.save`), so a
checkpoint file alone can be rebuilt; run directories written before that still load, from the
YAML files beside their checkpoint.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
import yaml

from ..arch.spec import ArchSpec
from ..arch.unet import build
from ..errors import MdsearchError
from ..rundir import CHECKPOINT, PROXY_SPEC, RECIPE, SPEC


class CheckpointError(MdsearchError):
    """A checkpoint that is missing, damaged or not mdsearch's."""


def checkpoint_path(path: str | Path) -> Path:
    """A run directory's checkpoint, or the checkpoint file itself."""
    path = Path(path)
    return path / CHECKPOINT if path.is_dir() and path.suffix != ".pt" else path


RESUMED = "restore a copy, or delete it to train this run from step 0"
"""The advice for a damaged checkpoint of the run being trained (its own --out)."""


def read_checkpoint(path: str | Path, advice: str = "restore a copy, or train the run again"
                    ) -> dict:
    """The checkpoint's contents, loaded with weights_only=True (never unpickling code).
    `advice`: what to do when it is damaged (RESUMED for the run being trained)."""
    ckpt = checkpoint_path(path)
    if not ckpt.exists():
        raise CheckpointError(f"{ckpt}: checkpoint not found")
    if not ckpt.is_file():
        raise CheckpointError(f"{ckpt}: not a file (a checkpoint is one file, written by "
                              "mdsearch train)")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, random bytes, or a pickle of something else
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        if not reason or "weights_only" in str(err) or not zipfile.is_zipfile(ckpt):
            # torch's advice to unpickle, or its bare KeyError on random bytes: not ours
            reason = f"{type(err).__name__}: the file is not a torch zip checkpoint"
        raise CheckpointError(
            f"{ckpt}: not a readable mdsearch checkpoint ({reason}). It is damaged or not "
            f"ours: {advice}") from None
    if not isinstance(state, dict) or not ({"ema", "model"} & set(state)):
        raise CheckpointError(f"{ckpt}: no 'ema' or 'model' weights in it, so it is not an "
                              "mdsearch checkpoint")
    return state


def described(path: str | Path, state: dict | None = None) -> dict:
    """What a checkpoint was trained from: {"spec", "proxy_spec": ArchSpec or None, "recipe":
    dict or None}, from the checkpoint itself, else from the YAML copies beside it."""
    ckpt = checkpoint_path(path)
    state = read_checkpoint(ckpt) if state is None else state
    out: dict = {}
    for key, name, parse in (("spec", SPEC, None), ("proxy_spec", PROXY_SPEC, None),
                             ("recipe", RECIPE, "recipe")):
        text, source = state.get(key), f"{ckpt} ({key})"
        if not isinstance(text, str) and (ckpt.parent / name).is_file():
            text, source = (ckpt.parent / name).read_text(), str(ckpt.parent / name)
        if not isinstance(text, str):
            out[key] = None
        elif parse == "recipe":
            data = json.loads(text) if key in state else yaml.safe_load(text)
            out[key] = data if isinstance(data, dict) else None
        else:
            out[key] = ArchSpec.from_dict(yaml.safe_load(text), source=source)
    return out


def run_kind(state: dict, about: dict) -> str | None:
    """What trained a checkpoint (`state`, with `described`'s `about`): "ufogen" (a one-step
    generator), "vae" (an autoencoder), or None for a diffusion training run (mdsearch train)."""
    if state.get("one_step"):
        return "ufogen"
    if "vae_recipe" in state:
        return "vae"
    return (about["recipe"] or {}).get("kind")


def ema_model(path: str | Path, state: dict | None = None) -> tuple[ArchSpec, torch.nn.Module]:
    """A run's proxy spec and its EMA weights as a plain UNet in eval mode (a stacked run: its
    first live seed), built from the checkpoint alone; a CheckpointError (one line) when the
    spec is missing or the weights do not fit it."""
    ckpt = checkpoint_path(path)
    state = read_checkpoint(ckpt) if state is None else state
    spec = described(ckpt, state)["proxy_spec"]
    if spec is None:
        raise CheckpointError(f"{ckpt.parent / PROXY_SPEC}: the spec the checkpoint was trained "
                              "with is missing (neither in the checkpoint nor beside it)")
    model = build(spec)
    try:
        model.load_state_dict(state.get("ema", state.get("model")))
    except RuntimeError as err:  # weights of another spec
        first = str(err).strip().splitlines()[1:2] or [str(err)]
        raise CheckpointError(f"{ckpt}: its weights do not fit the spec it names "
                              f"({first[0].strip()})") from None
    return spec, model.eval()
