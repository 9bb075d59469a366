"""The elastic supernet's weight sharing: every configuration of a space is a slice of one set of
weights, and a slice computes what the configuration's own UNet computes with those weights."""

import json

import pytest
import torch

from mdsearch.arch.proxy import proxy_spec
from mdsearch.arch.spec import ArchSpec, Level, Path
from mdsearch.arch.supernet import (SupernetError, build_supernet, extract, run_subnet,
                                    subnet_weights, supernet_spec)
from mdsearch.search.space import load_space

SMALL = ArchSpec(
    name="small", latent_channels=3, context_dim=24, context_len=5, time_freq_dim=16,
    time_embed_dim=32, head_dim=8, norm_groups=8, ffn_expansion=4.0,
    levels=[Level(channels=32, down=Path(conv_blocks=1), up=Path(conv_blocks=2)),
            Level(channels=64, conv="separable", conv_expansion=3,
                  down=Path(conv_blocks=2, layers=2, self_attn=True, cross_attn=True),
                  up=Path(conv_blocks=3, layers=2, self_attn=True, cross_attn=True))])


def inputs(spec, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, spec.latent_channels, size, size, generator=g),
            torch.tensor([10.0, 700.0]),
            torch.randn(2, spec.context_len, spec.context_dim, generator=g))


def supernet(spec=SMALL, seed=0):
    torch.manual_seed(seed)
    net = build_supernet(spec)
    with torch.no_grad():  # no zero biases, so that a wrong slice cannot hide
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.mark.slow
def test_every_quickstart_configuration_is_a_slice_of_its_supernet():
    space = load_space("quickstart")
    specs = [proxy_spec(space.spec_for(p), 0.0625, 3, 384, 16) for p in space.grid()]
    big = supernet_spec(specs)
    assert big.levels[2].channels == max(s.levels[2].channels for s in specs)
    assert big.ffn_expansion == 4.0 and big.levels[1].down.cross_attn
    net = supernet(big)
    for spec in specs:  # every one slices to exactly its own UNet's shapes
        subnet_weights(net, spec)
    x = inputs(specs[0], size=16)
    for spec in (specs[0], specs[-1], big):
        with torch.no_grad():
            shared = run_subnet(net, spec, *x)
            plain = extract(net, spec)(*x)
        assert shared.shape == x[0].shape and torch.equal(shared, plain)


@pytest.mark.parametrize("change, silence", [
    # fewer transformer layers: the supernet's extra layers with their residual branches zeroed
    ({"levels.1.down.layers": 1, "levels.1.up.layers": 1},
     lambda n: [n.down[1].blocks[j].transformer.layers[1] for j in range(2)]
     + [n.up[0].blocks[j].transformer.layers[1] for j in range(3)]),
    # no cross-attention at level 1: the supernet's cross-attention outputs zeroed
    ({"levels.1.down.cross_attn": False, "levels.1.up.cross_attn": False},
     lambda n: [layer.cross_attn for path in (n.down[1], n.up[0]) for b in path.blocks
                for layer in b.transformer.layers]),
])
def test_a_smaller_depth_or_no_attention_is_the_supernet_with_those_parts_silenced(change,
                                                                                  silence):
    net, sub = supernet(), SMALL.override(change)
    x = inputs(SMALL)
    with torch.no_grad():
        for module in silence(net):
            for name, p in module.named_parameters():
                if name.endswith(("to_out.weight", "to_out.bias", "proj_out.weight",
                                  "proj_out.bias")):
                    p.zero_()
        assert torch.allclose(run_subnet(net, sub, *x), run_subnet(net, SMALL, *x),
                              atol=1e-6, rtol=0)


def test_a_narrower_ffn_is_the_supernet_ffn_with_its_extra_units_silenced():
    """The GLU input projection holds [value | gate]: a wrong half would change the output."""
    net, sub = supernet(), SMALL.override({"ffn_expansion": 2})
    x = inputs(SMALL)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("ffn.proj_out.weight"):
                p[:, p.shape[1] // 2:] = 0
        assert torch.allclose(run_subnet(net, sub, *x), run_subnet(net, SMALL, *x),
                              atol=1e-6, rtol=0)
        assert not torch.allclose(run_subnet(net, sub, *x),
                                  run_subnet(supernet(seed=1), sub, *x), atol=1e-3)


def test_a_narrower_level_takes_the_leading_channels_of_each_part_of_a_concatenated_input():
    net, sub = supernet(), SMALL.override({"levels.1.channels": 32})
    w = subnet_weights(net, sub)
    # up level 0's first block takes [x from level 1 (64 -> 32), skip of level 0 (32)]
    full = net.up[1].blocks[0].conv.conv1.weight
    assert net.up[1].blocks[0].in_parts == (64, 32)
    expected = torch.cat([full[:, :32], full[:, 64:96]], dim=1)
    assert torch.equal(w["up.1.blocks.0.conv.conv1.weight"], expected)
    # a separable block's depthwise conv acts on its input: [x (64 -> 32), skip (64 -> 32)]
    depthwise = net.up[0].blocks[0].conv.depthwise.weight
    assert torch.equal(w["up.0.blocks.0.conv.depthwise.weight"],
                       torch.cat([depthwise[:32], depthwise[64:96]]))
    q = net.down[1].blocks[0].transformer.layers[0].self_attn.to_q.weight  # heads: leading
    assert torch.equal(w["down.1.blocks.0.transformer.layers.0.self_attn.to_q.weight"],
                       q[:32, :32])
    out = run_subnet(net, sub, *inputs(SMALL))
    assert torch.isfinite(out).all()


def test_a_configurations_loss_trains_exactly_its_slice_of_the_supernet():
    net, sub = supernet(), SMALL.override({"levels.1.channels": 32, "ffn_expansion": 2})
    run_subnet(net, sub, *inputs(SMALL)).square().mean().backward()
    q = net.down[1].blocks[0].transformer.layers[0].self_attn.to_q.weight.grad
    assert q[:32, :32].abs().sum() > 0 and q[32:].abs().sum() == 0 and q[:, 32:].abs().sum() == 0
    proj_in = net.down[1].blocks[0].transformer.layers[0].ffn.proj_in.weight.grad  # 2 x 256
    used = torch.zeros(512, dtype=torch.bool)
    used[:64] = used[256:320] = True  # the value and gate halves' first 64 units each
    assert proj_in[used].abs().sum() > 0 and proj_in[~used].abs().sum() == 0


def test_an_extracted_configuration_is_a_plain_model_with_the_supernets_weights():
    net, sub = supernet(), SMALL.override({"levels.1.up.conv_blocks": 2, "ffn_expansion": 3})
    model = extract(net, sub)
    x = inputs(SMALL)
    with torch.no_grad():
        assert torch.equal(model(*x), run_subnet(net, sub, *x))
    assert not any(p.requires_grad is False for p in model.parameters())
    assert model.spec == sub


@pytest.mark.parametrize("change, field", [
    ({"levels.1.conv": "full"}, "levels.1.conv"),
    ({"kv_share": True}, "kv_share"),
    ({"attn_nonlinearity": "relu"}, "attn_nonlinearity"),
])
def test_a_space_varying_what_slicing_cannot_hold_is_refused_naming_the_field(change, field):
    with pytest.raises(SupernetError, match=f"{field}: the configurations differ"):
        supernet_spec([SMALL, SMALL.override(change)])


def test_a_configuration_larger_than_the_supernet_is_refused_naming_the_weight():
    net = supernet(SMALL.override({"levels.1.channels": 32}))
    with pytest.raises(SupernetError, match=r"needs \d+ along dim 0, the supernet holds \d+: "
                                            "not a sub-network"):
        subnet_weights(net, SMALL)


# --- Training the supernet (mdsearch.train.supernet) -------------------------------------------

TINY_RECIPE = {
    "name": "tiny", "data": {"kind": "synthetic", "size": 64, "eval_size": 32, "seed": 0},
    "text_encoder": {"name": "minilm", "max_length": 8}, "resolution": 16, "width": 0.0625,
    "batch_size": 4, "steps": 4, "ema_decay": 0.9, "checkpoint_every": 2, "log_every": 2,
    "eval": {"every": 2, "sample_steps": 2, "prompts": 8, "reference_images": 32},
    "optimizer": {"lr": 1e-3, "warmup_steps": 1}}
TINY_SPACE = {
    "name": "tiny_space", "base": "md",
    "dimensions": {
        "inner_channels": {"field": "levels.2.channels", "values": [512, 640]},
        "inner_layers": {"fields": ["levels.2.down.layers", "levels.2.up.layers"],
                         "values": [1, 2]},
        "ffn_expansion": {"field": "ffn_expansion", "values": [2, 3]}},
    "objectives": [{"text_gain": "max"}],
    "search": {"algorithm": "grid"}}


def tiny_run(tmp_path, out, space=TINY_SPACE, **kwargs):
    from mdsearch.search.space import parse_space
    from mdsearch.train.recipe import Recipe
    from mdsearch.train.supernet import SupernetTraining

    return SupernetTraining(parse_space(space, "tiny_space.yaml"),
                            Recipe.from_dict(TINY_RECIPE), tmp_path / out, **kwargs)


@pytest.mark.slow
@pytest.mark.minilm
def test_a_killed_supernet_training_resumes_to_the_uninterrupted_weights(tmp_path):
    whole = tiny_run(tmp_path, "whole")
    assert len(whole.specs) == 8
    whole.run()
    cut = tiny_run(tmp_path, "cut")
    cut.run(steps=2)  # a run stopped at its checkpoint (a kill after it loses nothing more)
    again = tiny_run(tmp_path, "cut")
    assert again.step == 2
    again.run()
    for a, b in zip(whole.net.state_dict().values(), again.net.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(whole.ema.model.state_dict().values(), again.ema.model.state_dict().values()):
        assert torch.equal(a, b)
    assert whole.losses == again.losses
    # each step trained the sandwich: the largest and the smallest configuration, then random
    g = torch.Generator().manual_seed(5)
    chosen = whole.step_configurations(g)
    sizes = [sum(p.numel() for p in whole.extract(s).parameters()) for s in whole.specs]
    assert sizes[chosen[0]] == max(sizes) and sizes[chosen[1]] == min(sizes) and len(chosen) == 4
    model = whole.extract(whole.specs[chosen[1]])  # a plain UNet with the EMA's weights
    assert model(torch.zeros(1, 3, 16, 16), 5, torch.zeros(1, 8, 384)).shape == (1, 3, 16, 16)


@pytest.mark.minilm
def test_supernet_train_refuses_a_space_it_cannot_hold_in_one_line(tmp_path, capsys):
    import yaml

    from mdsearch.cli import main

    space = dict(TINY_SPACE, dimensions={
        "conv_32": {"field": "levels.1.conv", "values": ["full", "separable"]}})
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(TINY_RECIPE))
    code = main(["supernet", "train", "--space", str(tmp_path / "space.yaml"), "--trial",
                 str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "sn"), "--no-mlflow"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "levels.1.conv: the configurations differ ('full' vs 'separable')" in err
    assert not (tmp_path / "sn" / "supernet.pt").exists()


@pytest.mark.slow
@pytest.mark.minilm
def test_supernet_score_ranks_every_configuration_on_one_bank_without_training(tmp_path, capsys):
    import pandas as pd
    import yaml

    from mdsearch.cli import main

    (tmp_path / "space.yaml").write_text(yaml.safe_dump(TINY_SPACE))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(
        {**TINY_RECIPE, "eval": {**TINY_RECIPE["eval"], "bank": 24}}))
    sn = tmp_path / "sn"
    assert main(["supernet", "train", "--space", str(tmp_path / "space.yaml"), "--trial",
                 str(tmp_path / "recipe.yaml"), "--out", str(sn), "--json", "--no-mlflow"]) == 0
    assert (sn / "space.yaml").is_file()  # score needs only the folder
    before = (sn / "supernet.pt").read_bytes()
    assert main(["supernet", "score", str(sn), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["configurations"] == 8
    scores = pd.read_csv(sn / "scores.csv")
    assert len(scores) == 8 and scores[["inner_channels", "inner_layers",
                                        "ffn_expansion"]].drop_duplicates().shape[0] == 8
    assert scores["params"].is_unique and scores["text_gain"].notna().all()
    assert (scores["supernet_step"] == 4).all()
    assert (sn / "supernet.pt").read_bytes() == before  # scoring trains nothing
    assert main(["supernet", "score", str(sn)]) == 0  # the same bank: the same numbers again
    assert pd.read_csv(sn / "scores.csv").equals(scores)
    assert "ranked text_gain inverted" in capsys.readouterr().out


@pytest.mark.minilm
def test_supernet_training_is_one_mlflow_run_continued_on_resume(tmp_path, monkeypatch):
    import yaml
    from mlflow.tracking import MlflowClient

    from mdsearch.cli import main
    from mdsearch.track import default_tracking_uri

    monkeypatch.chdir(tmp_path)  # the default store: ./mlruns
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(TINY_SPACE))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(TINY_RECIPE))
    train = ["supernet", "train", "--space", "space.yaml", "--trial", "recipe.yaml",
             "--out", "sn", "--rule", "uniform", "--random", "3"]
    assert main([*train, "--steps", "2"]) == 0  # stopped, then resumed: one run
    assert main(train) == 0
    client = MlflowClient(default_tracking_uri())
    experiment = client.get_experiment_by_name("supernet")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.data.params["rule"] == "uniform" and run.data.params["random"] == "3"
    assert run.data.params["configurations"] == "8" and run.data.tags["status"] == "finished"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == [2, 4]
    assert run.data.metrics["shared_params"] > 0


# --- Sweeps scored on a supernet (mdsearch sweep SPACE --supernet DIR) ---------------------------

@pytest.fixture(scope="module")
def trained_supernet(tmp_path_factory):
    """A trained tiny supernet's folder and its space file (grid search; 8 configurations),
    trained once for the module: tests read it and write elsewhere."""
    import yaml

    tmp_path = tmp_path_factory.mktemp("supernet")
    recipe = {**TINY_RECIPE, "eval": {**TINY_RECIPE["eval"], "bank": 24},
              "resources": {"cpu": 1, "gpu": 0}}
    space = {**TINY_SPACE, "search": {"algorithm": "tpe", "num_samples": 3, "seed": 0,
                                      "max_concurrent": 1}}
    space["dimensions"] = {**space["dimensions"],  # (640 would be 512's proxy at 1/16 width)
                           "inner_channels": {"field": "levels.2.channels", "values": [512, 768]}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    from mdsearch.search.space import load_space
    from mdsearch.train.recipe import Recipe
    from mdsearch.train.supernet import SupernetTraining

    run = SupernetTraining(load_space(tmp_path / "space.yaml"), Recipe.from_dict(recipe),
                           tmp_path / "sn")
    run.run()
    return tmp_path / "sn", tmp_path / "space.yaml"


@pytest.mark.ray
@pytest.mark.minilm
def test_a_supernet_scored_sweep_writes_each_slices_score_as_a_trial(trained_supernet, tmp_path):
    from dataclasses import replace

    from mdsearch.arch.spec import ArchSpec
    from mdsearch.rundir import SPEC
    from mdsearch.search.space import load_space
    from mdsearch.search.sweep import run_sweep
    from mdsearch.train.supernet import finetune_recipe, open_supernet
    from mdsearch.train.trainer import train_trial

    sn, space_file = trained_supernet
    before = (sn / "supernet.pt").read_bytes()
    result = run_sweep(load_space(space_file), supernet=sn, name="scored",
                       storage=tmp_path / "sweeps", mlflow=False)
    table = result.table
    assert len(table) == 3 and (table["status"] == "completed").all()
    assert (table["steps"] == 0).all() and (table["supernet_step"] == 4).all()
    assert (sn / "supernet.pt").read_bytes() == before  # scoring trains nothing
    shared = open_supernet(sn, load_space(space_file))
    dims = ["inner_channels", "inner_layers", "ffn_expansion"]
    for _, row in table.iterrows():  # each trial's numbers are its slice's, scored here again
        spec = shared.space.spec_for({d: int(row[d]) for d in dims})
        mine = shared.score_one(spec)
        assert row["text_gain"] == pytest.approx(mine["text_gain"], rel=1e-5, abs=1e-7)
        assert row["val_loss_mid"] == pytest.approx(mine["val_loss_mid"], rel=1e-5)
        assert row["params"] > 0 and row["gmacs"] > 0
    assert (tmp_path / "sweeps" / "scored" / "results.csv").is_file()
    again = run_sweep(load_space(space_file), name="scored", storage=tmp_path / "sweeps",
                      mlflow=False, resume=True)  # remembers its supernet; nothing to redo
    assert again.table[dims + ["text_gain"]].equals(table[dims + ["text_gain"]])

    # --finetune N: each slice trained N steps from the supernet's weights, then evaluated
    tuned = run_sweep(load_space(space_file), supernet=sn, finetune=2, name="tuned",
                      storage=tmp_path / "sweeps", mlflow=False).table
    assert len(tuned) == 3 and (tuned["status"] == "completed").all()
    assert (tuned["steps"] == 2).all()
    for _, row in tuned.iterrows():  # each fine-tune in its own trial folder (workers reused)
        folder = tmp_path / "sweeps" / "tuned" / row["path"]
        saved = ArchSpec.from_file(folder / SPEC)  # (named by Tune's order of the point)
        assert replace(saved, name="") == replace(shared.space.spec_for(
            {d: int(row[d]) for d in dims}), name="")
    row = tuned.iloc[0]
    spec = shared.space.spec_for({d: int(row[d]) for d in dims})
    alone = train_trial(spec, finetune_recipe(shared.recipe, 2), tmp_path / "alone",
                        seed=int(row["seed"]),
                        start=shared.extract(shared.proxy(spec)).state_dict())
    assert row["text_gain"] == pytest.approx(alone.metrics["text_gain"], rel=1e-4, abs=1e-6)
    scratch = train_trial(spec, finetune_recipe(shared.recipe, 2), tmp_path / "scratch",
                          seed=int(row["seed"]))
    assert scratch.metrics["val_loss"] != pytest.approx(alone.metrics["val_loss"], rel=1e-3)


@pytest.mark.minilm
@pytest.mark.parametrize("args, message", [
    (["--supernet", "{sn}", "--trial", "cpu_quick"], "--trial cpu_quick with --supernet"),
    (["--finetune", "3"], "--finetune 3 fine-tunes slices of a supernet: give --supernet DIR"),
    (["--supernet", "{tmp}"], "no supernet.pt here"),
    (["--supernet", "{sn}", "--space-seeds"], "field seeds: [0, 1]; a supernet score"),
    (["--supernet", "{sn}", "--other-space"], "a supernet of other configurations than"),
])
def test_a_supernet_sweep_it_cannot_score_is_refused_in_one_line(trained_supernet, tmp_path,
                                                                 capsys, args, message):
    import yaml

    from mdsearch.cli import main

    sn, space_file = trained_supernet
    space = yaml.safe_load(space_file.read_text())
    if "--space-seeds" in args:
        space["seeds"], space["search"] = [0, 1], {"algorithm": "grid"}
    if "--other-space" in args:
        space["dimensions"]["ffn_expansion"]["values"] = [2, 4]
    (tmp_path / "asked.yaml").write_text(yaml.safe_dump(space))
    args = [a.format(sn=sn, tmp=tmp_path) for a in args if a not in ("--space-seeds",
                                                                      "--other-space")]
    code = main(["sweep", str(tmp_path / "asked.yaml"), *args, "--storage",
                 str(tmp_path / "sweeps"), "--no-mlflow"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert message in err
    assert not (tmp_path / "sweeps").exists() or not any((tmp_path / "sweeps").rglob("*.csv"))


@pytest.mark.slow
@pytest.mark.minilm
def test_evolve_removes_the_block_with_the_least_loss_per_ms_until_the_target(trained_supernet,
                                                                             tmp_path, capsys):
    from helpers import fake_table

    from mdsearch.arch.latency import Table, unit_cost
    from mdsearch.arch.spec import ArchSpec
    from mdsearch.cli import main
    from mdsearch.search.evolve import neighbours
    from mdsearch.search.space import load_space
    from mdsearch.train.supernet import open_supernet

    sn, space_file = trained_supernet
    shared = open_supernet(sn, load_space(space_file))
    specs = [shared.space.spec_for(p) for p in shared.points]
    table = Table(fake_table(tmp_path / "lat.csv", specs, ms=lambda u: 1 + 10 * unit_cost(u)[1]))
    ms = {i: table.predict(s).total_ms for i, s in enumerate(specs)}
    start = shared.points[shared.largest]
    target = sorted(ms.values())[2]  # three configurations meet it
    assert main(["supernet", "evolve", str(sn), "--latency", str(tmp_path / "lat.csv"),
                 "--target-ms", str(target), "--out", str(tmp_path / "chosen.yaml"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    history = json.loads((tmp_path / "chosen.json").read_text())
    assert out["latency_ms"] <= target and history["start"]["point"] == start
    chosen = ArchSpec.from_file(tmp_path / "chosen.yaml")
    assert chosen == shared.space.spec_for(out["point"])
    # the first action: of the start's one-step neighbours that are faster, the one losing the
    # least text_gain per millisecond saved
    first = history["actions"][0]
    assert first["action"] == "remove"
    here = shared.score_one(shared.space.spec_for(start))["text_gain"]
    here_ms = table.predict(shared.space.spec_for(start)).total_ms

    def ratio(point):
        spec = shared.space.spec_for(point)
        return ((shared.score_one(spec)["text_gain"] - here)
                / (here_ms - table.predict(spec).total_ms))

    faster = [p for _, p in neighbours(start, shared.points, shared.space.dimensions)
              if table.predict(shared.space.spec_for(p)).total_ms < here_ms]
    assert first["point"] == max(faster, key=ratio)
    assert first["candidates"] == len(faster)
    assert [a["action"] for a in history["actions"]].count("remove") >= 1
    # a target nothing meets: one line naming the fastest, exit 2, nothing written
    code = main(["supernet", "evolve", str(sn), "--latency", str(tmp_path / "lat.csv"),
                 "--target-ms", str(min(ms.values()) / 2), "--out", str(tmp_path / "no.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "the fastest:" in err
    assert not (tmp_path / "no.yaml").exists()


@pytest.mark.parametrize("rule, random, message", [
    ("uniform", 0, "--random 0: the random configurations per step must be >= 1 with --rule "
                   "uniform"),
    ("sandwich", -1, "--random -1: the random configurations per step must be >= 0"),
    ("largest", 2, "--rule largest: one of sandwich, uniform")])
def test_a_sampling_rule_that_trains_nothing_is_refused(tmp_path, rule, random, message):
    from mdsearch.train.trainer import TrainError

    with pytest.raises(TrainError) as err:
        tiny_run(tmp_path, "sn", rule=rule, random=random)
    assert str(err.value) == message
    assert not (tmp_path / "sn").exists()


@pytest.mark.minilm
def test_an_extracted_slice_is_a_run_export_reads_with_the_supernets_weights(trained_supernet,
                                                                             tmp_path, capsys):
    from mdsearch.cli import main
    from mdsearch.export.onnx import load_checkpoint
    from mdsearch.search.space import load_space
    from mdsearch.train.supernet import open_supernet

    sn, space_file = trained_supernet
    point = ["--point", "inner_channels=768", "--point", "inner_layers=1", "--point",
             "ffn_expansion=3"]
    assert main(["supernet", "extract", str(sn), *point, "--out", str(tmp_path / "run")]) == 0
    shared = open_supernet(sn, load_space(space_file))
    spec = shared.space.spec_for({"inner_channels": 768, "inner_layers": 1, "ffn_expansion": 3})
    proxy, model = load_checkpoint(tmp_path / "run")  # what mdsearch export reads
    assert proxy == shared.proxy(spec)
    slice_ = shared.extract(proxy).state_dict()
    assert all(torch.equal(w, slice_[k]) for k, w in model.state_dict().items())
    code = main(["supernet", "extract", str(sn), "--point", "inner_channels=999", "--out",
                 str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "dimension inner_channels takes 512, 768" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
