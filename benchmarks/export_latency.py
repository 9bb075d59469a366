"""ONNX Runtime CPU latency of the md UNet against the sd15 UNet, side by side in one run.

    python benchmarks/export_latency.py [--latent 64] [--runs 5] [--out /tmp/mdsearch-export]

Both UNets are exported with random weights (latency does not depend on the values) at the
same latent size (64x64 = 512x512 images) and timed per UNet call in the same ONNX Runtime
session setup. The paper's on-device per-step ratio (Table 4, iPhone 15 Pro) is
142 ms / 357 ms = 0.40; the goal here is <= 0.45.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdsearch.arch import presets  # noqa: E402
from mdsearch.export.onnx import export_unet, random_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="mdsearch-export-"))
    results = {}
    for name in ("md", "sd15"):
        spec = presets.get(name)
        results[name] = export_unet(spec, random_model(spec), out / name, args.latent,
                                    latency_runs=args.runs,
                                    progress=lambda m: print(f"[{name}] {m}", flush=True))
    print(f"\n{'UNet':<6}{'params':>10}{'file MB':>10}{'export s':>10}{'ORT ms/call':>13}"
          f"{'max abs err':>13}")
    for name, r in results.items():
        print(f"{name:<6}{r.params / 1e6:>9.1f}M{r.size_bytes / 1e6:>10.0f}"
              f"{r.export_seconds:>10.1f}{r.latency_ms:>13.0f}{r.max_abs_err:>13.2g}")
    ratio = results["md"].latency_ms / results["sd15"].latency_ms
    print(f"\nmd / sd15 latency per UNet call: {ratio:.2f} (paper on device: 142/357 = 0.40; "
          f"goal <= 0.45)")


if __name__ == "__main__":
    main()
