"""The CLI contract that later tooling depends on."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from mdsearch.arch.spec import ArchSpec
from mdsearch.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cost_json_contract(capsys):
    code, out, _ = run(capsys, "cost", "--preset", "md", "--resolution", "512", "--json")
    data = json.loads(out.strip().splitlines()[-1])
    assert code == 0
    assert {"name", "params", "gmacs", "conv_blocks", "sa_layers", "ca_layers", "channels",
            "resolution"} <= set(data)
    assert isinstance(data["params"], int) and isinstance(data["gmacs"], float)
    assert (data["name"], data["resolution"], data["conv_blocks"]) == ("md", 512, 11)


def test_spec_file_and_set_work_for_cost(capsys, tmp_path):
    _, out, _ = run(capsys, "spec", "--preset", "md")
    path = tmp_path / "md.yaml"
    path.write_text(out)
    assert ArchSpec.from_file(path).to_yaml() == out
    _, a, _ = run(capsys, "cost", "--spec", str(path), "--set", "ffn_expansion=4", "--json")
    _, b, _ = run(capsys, "cost", "--preset", "md", "--set", "ffn_expansion=4", "--json")
    _, c, _ = run(capsys, "cost", "--preset", "md", "--json")
    assert json.loads(a) == json.loads(b) and json.loads(a)["params"] > json.loads(c)["params"]
    _, j, _ = run(capsys, "spec", "--preset", "md-lite", "--json")
    assert json.loads(j)["levels"][2]["channels"] == 896


def test_user_errors_are_one_line_without_traceback(capsys, tmp_path):
    code, out, err = run(capsys, "cost", "--set", "levels.2.channel=3")
    assert code == 2 and "did you mean 'levels.2.channels'" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "levels": [{"channels": 64, "color": 1}]}))
    code, _, err = run(capsys, "cost", "--spec", str(bad))
    assert code == 2 and "bad.yaml" in err and "levels[0].color" in err
    code, _, err = run(capsys, "cost", "--resolution", "100")
    assert code == 2 and "resolution 100" in err


def test_table1_json_and_markdown(capsys):
    code, out, _ = run(capsys, "table1", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and set(rows) == {"sd15", "sdxl", "md", "md-lite"}
    for r in rows.values():
        assert {"name", "params_m", "gmacs", "paper_params_m", "paper_gmacs"} <= set(r)
    assert rows["md"]["paper_params_m"] == 386 and rows["md-lite"]["paper_params_m"] is None
    _, md, _ = run(capsys, "table1", "--markdown")
    assert "| md |" in md and "| sd15 |" in md
    # SD-XL's GMACs differ from the paper by more than 5%: the markdown says why
    assert "**sdxl** differs from the paper by more than 5%" in md and "counted" in md


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "mdsearch.cli", "cost", "--preset", "md-lite",
                          "--json"], capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["sa_layers"] == 12


@pytest.mark.parametrize("argv, message", [
    (["cost", "--set", "levels.2.channels=1000000000"], "levels[2].channels: must be between 1"),
    (["cost", "--set", "head_dim=0"], "field head_dim: must be positive, got 0"),
    (["cost", "--spec", "{tmp}/binary.yaml"], "binary.yaml: not a text file"),
    (["sweep", "{tmp}/binary.yaml"], "binary.yaml: not a text file"),
    (["train", "--trial", "{tmp}/dup.yaml", "--out", "{tmp}/out"],
     "key 'steps' given twice (lines 2 and 3)"),
    (["train", "--trial", "{tmp}/nan.yaml", "--out", "{tmp}/out"],
     "field optimizer.lr: must be a finite number, got nan"),
    (["train", "--trial", "{tmp}/r13.yaml", "--out", "{tmp}/out", "--no-mlflow"],
     "field resolution: 13 px gives 13 latent pixels"),
    (["train", "--trial", "{tmp}/acc.yaml", "--out", "{tmp}/out", "--no-mlflow"],
     "field batch_size: 6 over 1 worker(s) is 6 per worker, which does not split into "
     "accumulate: 4"),
    (["sweep", "quickstart", "--trial", "{tmp}/w64.yaml", "--storage", "{tmp}/out",
      "--no-mlflow"], "recipe w64: one trial needs CPU 64 (there are "),
    (["train", "--out", "{tmp}/binary.yaml"], "binary.yaml: exists and is not a directory"),
    (["export", "--out", "{tmp}/binary.yaml"], "binary.yaml: exists and is not a directory"),
    (["report", "{tmp}", "--out", "{tmp}/binary.yaml"], "exists and is not a directory"),
    (["train", "--steps", "0", "--out", "{tmp}/out"], "--steps: must be at least 1, got 0"),
    (["train", "--workers", "-2", "--out", "{tmp}/out"], "--workers: must be at least 1"),
    (["vae", "train", "--workers", "3", "--out", "{tmp}/out", "--no-mlflow"],
     "field workers: 3 must be positive and split batch_size (16)"),
    (["sweep", "quickstart", "--num-samples", "0"], "--num-samples: must be at least 1"),
    (["export", "--latent-size", "-4", "--out", "{tmp}/out"], "--latent-size: must be at least"),
    (["export", "--resolution", "13", "--out", "{tmp}/out"], "resolution 13: must be a positive"),
    (["reliability", "{tmp}", "--redraws", "1"], "--redraws: must be at least 2"),
    (["train", "--seed", "99999999999999999999999", "--out", "{tmp}/out"],
     "--seed: must be in 0..2147483647"),
    (["vae", "train", "--seed", "-1", "--out", "{tmp}/out"], "--seed: must be in 0..2147483647"),
    (["generate", "--bundle", "{tmp}", "--prompt", "x", "--seed", "2147483648", "--out",
      "{tmp}/x.png"], "--seed: must be in 0..2147483647"),
    (["train", "--seeds", "0", "--out", "{tmp}/out"], "--seeds: must be at least 1"),
    (["export", "--checkpoint", "{tmp}", "--preset", "md-lite", "--out", "{tmp}/out"],
     "--checkpoint exports the spec the run trained: drop --preset"),
    (["generate", "--bundle", "{tmp}", "--prompt", "x", "--guidance", "nan", "--out",
      "{tmp}/x.png"], "--guidance: must be a finite number > 0, got nan"),
    (["sweep", "{tmp}/nanspace.yaml"], "dimensions.f.values: must be finite numbers, got nan"),
    (["train", "--trial", "{tmp}/ref1.yaml", "--out", "{tmp}/out", "--no-mlflow"],
     "field eval.reference_images: FID's reference statistics need at least 2 images, got 1"),
    (["vae", "cost", "--recipe", "{tmp}/grid0.yaml"], "field eval.grid: must be at least 1"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys, monkeypatch, argv,
                                                         message):
    monkeypatch.setenv("MDSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "dup.yaml").write_text("name: d\nsteps: 3\nsteps: 4\n")
    (tmp_path / "nan.yaml").write_text("name: n\noptimizer: {lr: .nan}\n")
    (tmp_path / "r13.yaml").write_text(
        "name: r13\nresolution: 13\ndata: {kind: synthetic, size: 64, eval_size: 32}\n"
        "text_encoder: {name: minilm, max_length: 8}\nwidth: 0.0625\nbatch_size: 4\nsteps: 2\n")
    tiny = ("data: {kind: synthetic, size: 64, eval_size: 32}\nresolution: 16\n"
            "text_encoder: {name: minilm, max_length: 8}\nwidth: 0.0625\nsteps: 2\n")
    (tmp_path / "acc.yaml").write_text("name: acc\nbatch_size: 6\naccumulate: 4\n" + tiny)
    (tmp_path / "w64.yaml").write_text("name: w64\nbatch_size: 64\nworkers: 64\n" + tiny)
    (tmp_path / "ref1.yaml").write_text("name: ref1\neval: {reference_images: 1}\n" + tiny)
    vae = yaml.safe_load(open("trials/vae_cpu.yaml"))
    (tmp_path / "grid0.yaml").write_text(yaml.safe_dump({**vae, "eval": {**vae.get("eval", {}),
                                                                          "grid": 0}}))
    (tmp_path / "nanspace.yaml").write_text(
        "base: md\nobjectives: [text_gain]\n"
        "dimensions: {f: {field: ffn_expansion, values: [.nan, 3]}}\n")
    try:
        code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("mdsearch")] == \
        [line for line in err.splitlines() if message in line]  # one error line
    assert not (tmp_path / "out").exists()  # no half-written output


def test_fidelity_and_report_refuse_what_they_cannot_rank(tmp_path, capsys):
    sweep = tmp_path / "s"
    sweep.mkdir()
    (sweep / "results.csv").write_text(
        "trial_id,status,stop_reason,a,seed,params,gmacs,text_gain,steps\n"
        "t1,completed,,1,0,10,1.0,0.5,6\nt2,completed,,2,0,20,2.0,abc,6\n")
    assert main(["report", str(sweep), "--out", str(tmp_path / "r")]) == 2
    assert "column 'text_gain' holds 'abc' (trial t2)" in capsys.readouterr().err
    other = tmp_path / "l"
    shutil.copytree(sweep, other)
    assert main(["fidelity", str(sweep), str(other), "--metric", "nosuch"]) == 2
    assert "no column 'nosuch'" in capsys.readouterr().err
    (sweep / "results.csv").write_text(
        "trial_id,status,stop_reason,a,seed,params,gmacs,text_gain,steps\n"
        "t1,completed,,1,0,10,1.0,0.5,6\n")
    shutil.copy(sweep / "results.csv", other / "results.csv")
    assert main(["fidelity", str(sweep), str(other), "--metric", "text_gain"]) == 2
    assert "rank agreement needs at least 2" in capsys.readouterr().err


def test_a_local_folder_does_not_shadow_a_built_in_name(tmp_path, monkeypatch):
    """`runs/`, `full/` or `quickstart/` in the working directory: `--trial full` and `sweep
    quickstart` still mean the built-in files (a local *file* of that name still wins)."""
    from mdsearch.search.space import load_space
    from mdsearch.train.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    for name in ("cpu_quick", "full", "quickstart"):
        (tmp_path / name).mkdir()
    assert load_recipe("cpu_quick").name == "cpu_quick" and load_recipe("full").name == "full"
    assert load_space("quickstart").name == "quickstart"


def test_files_that_cannot_be_read_or_written_are_one_line(tmp_path, capsys, monkeypatch):
    """Inputs the user may not read and an --out it may not write: exit 2, one line naming the
    path, before any work. (File modes do not bind root, which the CI runs as, so the operating
    system's refusals are simulated: reads of the inputs raise EACCES and `os.access` says the
    locked folder is not writable.)"""
    import pathlib

    base = tmp_path / "perm"
    base.mkdir()
    unreadable = {base / name for name in ("recipe.yaml", "space.yaml", "spec.yaml")}
    for path in unreadable:
        path.write_text("name: x\n")
    (base / "locked").mkdir()
    read_text = pathlib.Path.read_text

    def denied(self, *args, **kwargs):
        if self in unreadable:
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    access = os.access
    monkeypatch.setattr(pathlib.Path, "read_text", denied)
    monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and
                        pathlib.Path(p) != base / "locked")
    monkeypatch.setenv("MDSEARCH_CACHE_DIR", str(base / "cache"))
    cases = [
        (["cost", "--spec", f"{base}/spec.yaml"], f"{base}/spec.yaml: cannot be read"),
        (["train", "--trial", f"{base}/recipe.yaml", "--out", f"{base}/out"],
         f"{base}/recipe.yaml: cannot be read"),
        (["sweep", f"{base}/space.yaml"], f"{base}/space.yaml: cannot be read"),
        (["vae", "cost", "--recipe", f"{base}/recipe.yaml"], f"{base}/recipe.yaml: cannot be read"),
        (["report", str(base), "--out", f"{base}/locked/report"],
         f"{base}/locked/report: cannot be written ({base}/locked is not writable"),
        (["train", "--out", f"{base}/locked/run"], f"{base}/locked/run: cannot be written"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        lines = [line for line in err.splitlines() if line.startswith("mdsearch")]
        assert code == 2 and "Traceback" not in err, (argv, err)
        assert len(lines) == 1 and message in lines[0], (argv, err)
    assert not (base / "out").exists() and list((base / "locked").iterdir()) == []
