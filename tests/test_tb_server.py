"""The real TensorBoard server, on a freshly trained smoke run, read back over its HTTP API."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import SMOKE, Cli, only_run

TENSORBOARD = Path(sys.executable).with_name("tensorboard")
READY_SECONDS = 90  # a loaded CI machine can take a while to import TensorFlow's stubs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(base: str, path: str, **query: str) -> bytes:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def get_json(base: str, path: str, **query: str):
    return json.loads(get(base, path, **query))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("tb-server")
    result = Cli()("train", "--config", SMOKE, "--logdir", logdir, "--epochs", "1",
                   "--set", "data.train_size=256", "--set", "data.test_size=128", "-q")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    run = only_run(logdir).name
    port = free_port()
    process = subprocess.Popen(
        [str(TENSORBOARD), "--logdir", str(logdir), "--port", str(port), "--host", "127.0.0.1",
         "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_SECONDS
        while True:  # ready once it answers and has loaded the run's scalars
            try:
                if run in get_json(base, "/data/plugin/scalars/tags"):
                    break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                output = process.communicate()[0].decode(errors="replace")
                pytest.fail(f"TensorBoard did not serve {run} in {READY_SECONDS}s:\n{output}")
            time.sleep(0.5)
        yield base, run
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_scalars_are_served(server):
    base, run = server
    tags = get_json(base, "/data/plugin/scalars/tags")[run]
    assert {"train/loss", "train/loss_per_image", "test/accuracy", "grad_norm/total"} <= set(tags)
    points = get_json(base, "/data/plugin/scalars/scalars", run=run, tag="test/accuracy")
    assert [step for _, step, _ in points] == [4] and 0 <= points[0][2] <= 1


@pytest.mark.slow
def test_histograms_are_served(server):
    base, run = server
    tags = get_json(base, "/data/plugin/histograms/tags")[run]
    assert {"weights/model1.conv1.weight", "grads/model1.linear2.bias"} <= set(tags)
    events = get_json(base, "/data/plugin/histograms/histograms", run=run,
                      tag="weights/model1.conv1.weight")  # fmt: skip
    (_, step, buckets), *_ = events
    assert step == 4 and sum(count for _, _, count in buckets) == pytest.approx(32 * 3 * 5 * 5)


@pytest.mark.slow
def test_images_are_served_as_pngs(server):
    base, run = server
    tags = get_json(base, "/data/plugin/images/tags")[run]
    assert {"inputs/first_batch", "confusion/test", "gradients/flow"} <= set(tags)
    for tag in ("inputs/first_batch", "confusion/test", "gradients/flow"):
        (entry,) = get_json(base, "/data/plugin/images/images", run=run, tag=tag)
        blob = get(base, "/data/plugin/images/individualImage?" + entry["query"])
        assert blob.startswith(b"\x89PNG\r\n\x1a\n") and len(blob) > 5000, tag


@pytest.mark.slow
def test_graph_is_served(server):
    base, run = server
    info = get_json(base, "/data/plugin/graphs/info")
    assert info[run]["run_graph"] is True
    graph = get(base, "/data/plugin/graphs/graph", run=run).decode()
    for layer in ("conv1", "conv2", "conv3", "linear1", "linear2"):
        assert f"Linear[{layer}]" in graph or f"Conv2d[{layer}]" in graph, layer


@pytest.mark.slow
def test_custom_scalars_layout_is_served(server):
    base, _ = server
    layout = get_json(base, "/data/plugin/custom_scalars/layout")
    titles = [category["title"] for category in layout["category"]]
    assert titles[0] == "1. loss, accuracy, learning rate"
    charts = {c["title"]: c["multiline"]["tag"] for c in layout["category"][1]["chart"]}
    assert charts["conv1"] == [r"^grad_norm/model1\.conv1\.[^.]+$"]
    speed = {c["title"]: c["multiline"]["tag"] for c in layout["category"][2]["chart"]}
    assert speed["seconds per epoch: the steps, and each evaluation"] == [
        r"^train/epoch_seconds$",
        r"^(val|test)/eval_seconds$",
    ]


@pytest.mark.slow
def test_hparams_columns_are_served(server):
    base, _ = server
    request = urllib.request.Request(
        f"{base}/data/plugin/hparams/experiment", data=b'{"experimentName": ""}',
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        experiment = json.loads(response.read())
    names = [h["name"] for h in experiment["hparamInfos"]]
    assert "loss.reduction" in names and "optim.lr" in names and "data.cache_dir" not in names
    metrics = [m["name"]["tag"] for m in experiment["metricInfos"]]
    assert metrics[0] == "test/accuracy"
