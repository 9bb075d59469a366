"""MLflow tracking against a real `mlflow server` on 127.0.0.1."""

import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from mdsearch.arch import presets
from mdsearch.track import MLflowTracker, flatten
from mdsearch.train.trainer import train_trial
from helpers import ImageStats, tiny_recipe


def test_flatten():
    assert flatten({"a": {"b": [1, {"c": 2}]}, "d": None}) == {"a.b.0": 1, "a.b.1.c": 2,
                                                             "d": None}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("mlflow server did not start on 127.0.0.1")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_trial_logs_params_metrics_and_artifacts_to_a_server(mlflow_server, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("MDSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    tracker = MLflowTracker(experiment="test-trials", run_name="md-tiny",
                            tracking_uri=mlflow_server)
    result = train_trial(presets.get("md", ffn_expansion=4), tiny_recipe(), tmp_path / "run",
                         evaluator=ImageStats(), tracker=tracker)
    client = MlflowClient(mlflow_server)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "ok"
    assert run.data.params["spec.ffn_expansion"] == "4.0"
    assert run.data.params["recipe.width"] == "0.0625"
    assert int(run.data.metrics["params"]) == result.params
    losses = client.get_metric_history(tracker.run_id, "loss")
    assert len(losses) >= result.steps
    assert [m.step for m in client.get_metric_history(tracker.run_id, "sample_std")] == [3, 6]
    artifacts = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"spec.yaml", "samples_000006.png"} <= artifacts


def test_an_unreachable_tracking_server_is_one_clear_error(tmp_path, capsys, monkeypatch):
    from mdsearch.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")  # nothing listens there
    assert main(["train", "--out", str(tmp_path / "run"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "MLflow tracking server http://127.0.0.1:1 does not answer" in err
    assert "--no-mlflow" in err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_autoencoder_and_one_step_runs_log_to_the_server(mlflow_server, tmp_path, monkeypatch):
    from mdsearch.train.ufogen import ufogen_trial
    from mdsearch.train.vae import vae_train
    from helpers import VaeStats as Stats, ufogen_recipe, vae_recipe

    monkeypatch.setenv("MDSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    client = MlflowClient(mlflow_server)
    vae = MLflowTracker(experiment="test-vae", tracking_uri=mlflow_server)
    vae_train(vae_recipe(), tmp_path / "vae", evaluator=Stats(), tracker=vae)
    run = client.get_run(vae.run_id)
    assert run.info.status == "FINISHED" and run.data.params["recipe.arch.latent_channels"] == "4"
    assert [m.step for m in client.get_metric_history(vae.run_id, "psnr")] == [2, 4]
    assert run.data.metrics["decoder_gmacs"] > 0

    start = tmp_path / "start"
    train_trial(presets.get("md"), tiny_recipe(), start, evaluator=ImageStats())
    ufo = MLflowTracker(experiment="test-ufogen", tracking_uri=mlflow_server)
    ufogen_trial(start, ufogen_recipe(), tmp_path / "ufo", evaluator=ImageStats(), tracker=ufo)
    run = client.get_run(ufo.run_id)
    assert run.info.status == "FINISHED" and run.data.params["ufogen.adapter"] == "full"
    assert [m.step for m in client.get_metric_history(ufo.run_id, "sample_std")] == [2, 4]
    assert len(client.get_metric_history(ufo.run_id, "g_loss")) == 4


def test_report_from_an_unreachable_tracking_server_is_one_line_within_seconds(tmp_path, capsys):
    import time

    from mdsearch.cli import main

    started = time.monotonic()
    code = main(["report", "--mlflow", "x", "--tracking-uri", "http://127.0.0.1:1",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - started < 30, err
    assert "http://127.0.0.1:1 does not answer" in err and "Traceback" not in err


def test_a_file_tracking_store_is_one_line_naming_the_way_out(tmp_path, capsys, monkeypatch):
    """MLflow 3 refuses file stores (maintenance mode) with a traceback; mdsearch says so in one
    line and names what works (a database URI, or MLflow's own opt-out)."""
    from mdsearch.cli import main

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for uri in (f"file://{tmp_path}/ml", str(tmp_path / "mlruns")):
        code = main(["report", "--mlflow", "x", "--tracking-uri", uri,
                     "--out", str(tmp_path / "r")])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        assert f"{uri}: a file store" in err and "MLFLOW_ALLOW_FILE_STORE=true" in err
