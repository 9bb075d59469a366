"""The CLI contract that later tooling depends on."""

import json
import subprocess
import sys

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
    assert code == 2 and "did you mean 'channels'" in err and "Traceback" not in err
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
