"""--report-to and --config through `accelerate launch`: a second tracker offline, and a replay."""
import json

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from conftest import launch, read_metrics

FLAGS = ["--epochs", "2", "--schedule-epochs", "1", "--train-limit", "640", "--test-limit", "200",
         "--target-acc", "100", "--lr", "0.02", "--seed", "7"]


@pytest.fixture(scope="module")
def reported(tmp_path_factory, mnist_root):
    """A run reporting to MLflow and TensorBoard, with settings other than the defaults."""
    out = tmp_path_factory.mktemp("trackers") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # the run folder's own store
        result = launch([*FLAGS, "--data-dir", str(mnist_root), "--output-dir", str(out),
                         "--report-to", "mlflow,tensorboard"])
    assert result.returncode == 0, result.stderr
    return out


def test_report_to_mlflow_gets_what_tensorboard_gets_offline_in_the_run_folder(reported, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this process's reader: MLflow 3 asks
    out = reported
    m = read_metrics(out)
    client = mlflow.MlflowClient((out / "mlruns").as_uri())
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.info.run_name == out.name
    history = client.get_metric_history(run.info.run_id, "val/acc")
    # Every tracker counts optimizer steps (10 an epoch here): each epoch at its last, the final report at the end.
    assert [(h.step, h.value) for h in history] == [(10 * e["epoch"], e["val_acc"]) for e in m["epochs"]]
    assert [(h.step, h.value) for h in client.get_metric_history(run.info.run_id, "epoch")] == [(10, 1), (20, 2)]
    assert [h.step for h in client.get_metric_history(run.info.run_id, "step/loss")] == [10, 20]  # every 10 steps
    assert [h.step for h in client.get_metric_history(run.info.run_id, "hparam/final_val_acc")] == [20]
    assert run.data.params["lr"] == "0.02" and run.data.params["report_to"] == "mlflow,tensorboard"
    assert run.data.metrics["hparam/final_val_acc"] == m["final_val_acc"]
    assert list(out.glob("tensorboard/events.out.tfevents.*"))  # TensorBoard as before


def test_a_run_replayed_from_its_config_json_gives_bit_identical_weights(reported, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first, replay = reported, tmp_path / "replay"
    # The replay reports where the first run did, MLflow included, into its own folder.
    result = launch(["--config", str(first / "config.json"), "--output-dir", str(replay)])
    assert result.returncode == 0, result.stderr
    assert "--config ignores" in result.stderr  # world size, versions...: they describe the old run
    config = json.loads((replay / "config.json").read_text())
    assert (config["lr"], config["seed"], config["train_limit"]) == (0.02, 7, 640)
    assert (replay / "mlruns").is_dir()
    a, b = load_file(first / "model.safetensors"), load_file(replay / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
