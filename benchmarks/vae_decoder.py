"""The lightweight decoder against the full one, side by side in one run (the paper's Table 4:
SD's decoder 285 ms, MobileDiffusion's 92 ms on an iPhone 15 Pro: 3.1x).

    python benchmarks/vae_decoder.py                                   # paper-scale recipes only
    python benchmarks/vae_decoder.py --full runs/vae/c8 --light runs/vae/c8-light

For each pair of decoders: parameters and GMACs (`mdsearch.train.vae.cost_of`, 512x512), the ONNX
Runtime CPU latency of one decode (median of --runs, the two decoders exported and timed in the
same process, alternating), and, for trained runs, their reconstruction metrics at the end of
training (trial_result.json). The paper-scale pair (trials/vae.yaml vs trials/vae_light.yaml,
random weights: latency does not depend on them) decodes 64x64x8 latents into a 512x512 image as
Table 4 does. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mdsearch.data.autoencoder import DiffusersAutoencoder  # noqa: E402
from mdsearch.export.decoder import export_decoder  # noqa: E402
from mdsearch.export.onnx import cpu_session  # noqa: E402
from mdsearch.rundir import RESULT, VAE_RECIPE  # noqa: E402
from mdsearch.train.vae import VAERecipe, build_vae, cost_of, load_vae_recipe  # noqa: E402

METRICS = ("psnr", "ssim", "rfid_proxy")


def random_autoencoder(recipe: VAERecipe, folder: Path) -> DiffusersAutoencoder:
    """The recipe's autoencoder with random weights, saved and loaded as a run's would be."""
    torch.manual_seed(0)
    build_vae(recipe).save_pretrained(folder)
    return DiffusersAutoencoder(folder)


def run_recipe(run: Path) -> VAERecipe:
    import yaml

    return VAERecipe.from_dict(yaml.safe_load((run / VAE_RECIPE).read_text()), str(run))


def timed_pair(pair: dict, latent: int, runs: int, out: Path) -> dict[str, float]:
    """Median ONNX Runtime ms per decode of each decoder, timed alternately in one process."""
    sessions = {}
    for name, ae in pair.items():
        result = export_decoder(ae, out / name, latent, latency_runs=1)
        if result.within_tolerance is False:
            raise SystemExit(f"{name}: ONNX parity failed ({result.rel_err:.3g})")
        sessions[name] = (cpu_session(result.path),
                          np.random.default_rng(0).standard_normal(
                              (1, ae.channels, latent, latent)).astype(np.float32))
    times = {name: [] for name in pair}
    for _ in range(runs):
        for name, (session, feed) in sessions.items():
            start = time.perf_counter()
            session.run(None, {"latents": feed})
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", type=Path, help="a trained autoencoder run (train: all)")
    parser.add_argument("--light", type=Path, help="its lightweight decoder run (train: decoder)")
    parser.add_argument("--latent", type=int, default=None,
                        help="latent side for the trained pair (default: their training "
                             "resolution / 8)")
    parser.add_argument("--runs", type=int, default=5, help="timed decodes per decoder")
    parser.add_argument("--skip-paper-scale", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows, out = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_paper_scale:
            recipes = {"full": load_vae_recipe("vae"), "light": load_vae_recipe("vae_light")}
            pair = {k: random_autoencoder(r, tmp / f"paper_{k}") for k, r in recipes.items()}
            ms = timed_pair(pair, 64, args.runs, tmp / "paper_onnx")
            costs = {k: cost_of(r) for k, r in recipes.items()}
            for k in ("full", "light"):
                rows.append((f"paper scale: {recipes[k].name} (random weights)", 512, costs[k],
                             ms[k], {}))
            out["paper_latency_ratio"] = ms["full"] / ms["light"]
            out["paper_gmacs_ratio"] = costs["full"].decoder_gmacs / costs["light"].decoder_gmacs
        if args.full and args.light:
            recipes = {"full": run_recipe(args.full), "light": run_recipe(args.light)}
            pair = {"full": DiffusersAutoencoder(args.full),
                    "light": DiffusersAutoencoder(args.light)}
            latent = args.latent or recipes["full"].resolution // recipes["full"].factor
            ms = timed_pair(pair, latent, args.runs, tmp / "trained_onnx")
            for k, run in (("full", args.full), ("light", args.light)):
                metrics = json.loads((run / RESULT).read_text())["metrics"]
                rows.append((f"trained: {run}", latent * recipes[k].factor,
                             cost_of(recipes[k]), ms[k], metrics))
                out[f"trained_{k}"] = {m: metrics.get(m) for m in METRICS}
            out["trained_latency_ratio"] = ms["full"] / ms["light"]
    print("| decoder | image px | params | GMACs (512 px) | ORT CPU ms / decode | "
          + " | ".join(METRICS) + " |")
    print("|---" * (5 + len(METRICS)) + "|")
    for name, px, c, ms, metrics in rows:
        print(f"| {name} | {px} | {c.decoder_params / 1e6:.2f}M | {c.decoder_gmacs:.1f} | "
              f"{ms:.1f} | " + " | ".join(f"{metrics[m]:.4g}" if m in metrics else "-"
                                          for m in METRICS) + " |")
    out["paper_table4_ratio"] = 285 / 92
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}))


if __name__ == "__main__":
    main()
