"""SnapFusion's architecture evolution under a latency target, on a trained supernet.

    result = evolve(open_supernet("runs/qs-supernet", space), Table("tables/qs_512.csv"), 1200)
    result["point"], result["spec"], result["actions"]

Start from the space's largest configuration. An *action* moves one dimension of the
configuration one step along its values (one transformer layer fewer or more, the 32x32
transformers off or on, the next width or FFN expansion): it removes blocks (the latency drops)
or adds them. Each candidate is scored by its slice of the supernet on the held-out bank (no
training) and its latency predicted from the table. While the predicted latency is above the
target, take the removing action with the best change in quality per millisecond saved (the
smallest loss per ms); once it is met, take adding actions that stay within the target, the best
gain in quality per millisecond added first, while any improves the quality. Every action tried
and taken is recorded with its score and latency.

The scores are the supernet's: deterministic (one shared training, one bank), but a screen whose
agreement with stand-alone training is measured by benchmarks/supernet_fidelity.py
(docs/supernet.md). The chosen network is written as an ArchSpec YAML for `mdsearch train`.
"""

from __future__ import annotations

from ..config import ConfigError
from ..progress import quiet
from ..quality import direction


class EvolveError(ConfigError):
    """A target no configuration of the space can meet, or a table or metric that cannot judge."""


def key(point: dict) -> tuple:
    return tuple(sorted(point.items()))


def neighbours(point: dict, points: list[dict], dimensions) -> list[tuple[str, dict]]:
    """(dimension, point) for every configuration one step away: one dimension changed to the
    value next to its own in the dimension's list."""
    out = []
    for other in points:
        changed = [d for d in dimensions if point.get(d.name) != other.get(d.name)]
        if len(changed) != 1:
            continue
        d = changed[0]
        a, b = point.get(d.name), other.get(d.name)
        if a in d.values and b in d.values and abs(d.values.index(a) - d.values.index(b)) == 1:
            out.append((d.name, other))
    return out


def evolve(shared, table, target_ms: float, metric: str | None = None,
           progress=None) -> dict:
    """Evolve `shared.space` (a SupernetTraining) to `target_ms` of predicted latency per UNet
    call (`table`: a latency Table, at its own resolution). Returns the chosen point, its
    full-size spec, its score and latency, the start's, and every action ("remove"/"add")
    taken, with the candidates each step compared."""
    say = progress or quiet
    space = shared.space
    metric = metric or space.quality.metric
    if metric not in ("val_loss", "val_loss_low", "val_loss_mid", "val_loss_high", "text_gain"):
        raise EvolveError(f"--metric {metric}: a supernet scores val_loss, its bands "
                          "(val_loss_low/_mid/_high) and text_gain")
    sign = 1.0 if direction(metric) == "max" else -1.0  # quality = sign * metric: higher better
    if target_ms <= 0:
        raise EvolveError(f"--target-ms {target_ms:g}: give a latency in milliseconds (> 0)")
    points = list(shared.points)
    latency = {key(p): table.predict(space.spec_for(p)).total_ms for p in points}
    scored: dict[tuple, dict] = {}

    def judge(point: dict) -> dict:
        if key(point) not in scored:
            score = shared.score_one(space.spec_for(point))[metric]
            scored[key(point)] = {"point": point, metric: score, "latency_ms": latency[key(point)]}
        return scored[key(point)]

    fastest = min(latency.values())
    if fastest > target_ms:
        raise EvolveError(f"--target-ms {target_ms:g}: no configuration of {space.name} is "
                          f"predicted that fast by {table.path} (the fastest: {fastest:.1f} ms)")
    start = points[shared.largest]
    current = judge(start)
    say(f"start: the largest configuration {start}: {metric} {current[metric]:.4g}, "
        f"{current['latency_ms']:.1f} ms; target {target_ms:g} ms")
    actions, seen = [], {key(start)}
    while True:
        over = current["latency_ms"] > target_ms
        options = []
        for dim, point in neighbours(current["point"], points, space.dimensions):
            if key(point) in seen:
                continue
            cand = judge(point)
            d_ms = cand["latency_ms"] - current["latency_ms"]
            d_q = sign * (cand[metric] - current[metric])
            if over and d_ms < 0:  # removing: the least quality lost per ms saved
                options.append((d_q / -d_ms, "remove", dim, cand, d_ms, d_q))
            elif not over and d_ms > 0 and cand["latency_ms"] <= target_ms and d_q > 0:
                options.append((d_q / d_ms, "add", dim, cand, d_ms, d_q))
        if not options:
            break
        ratio, kind, dim, cand, d_ms, d_q = max(options, key=lambda o: o[0])
        actions.append({"action": kind, "dimension": dim,
                        "from": current["point"][dim], "to": cand["point"][dim],
                        "point": cand["point"], metric: cand[metric],
                        "latency_ms": round(cand["latency_ms"], 3),
                        "delta_quality": d_q, "delta_ms": round(d_ms, 3),
                        "quality_per_ms": ratio, "candidates": len(options)})
        say(f"{kind} {dim} {current['point'][dim]} -> {cand['point'][dim]}: {metric} "
            f"{cand[metric]:.4g} ({'+' if d_q >= 0 else ''}{d_q:.3g}), "
            f"{cand['latency_ms']:.1f} ms ({d_ms:+.1f}); best of {len(options)}")
        seen.add(key(cand["point"]))
        current = cand
    if current["latency_ms"] > target_ms:
        raise EvolveError(f"--target-ms {target_ms:g}: evolution stopped at "
                          f"{current['latency_ms']:.1f} ms with no action left that lowers it")
    spec = space.spec_for(current["point"])
    return {"metric": metric, "target_ms": target_ms, "point": current["point"],
            "spec": spec, metric: current[metric], "latency_ms": current["latency_ms"],
            "start": {"point": start, metric: scored[key(start)][metric],
                      "latency_ms": scored[key(start)]["latency_ms"]},
            "actions": actions, "scored": len(scored), "supernet_step": shared.step,
            "table": str(table.path), "resolution": table.resolution}
