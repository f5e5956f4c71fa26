"""End to end: `dvc repro` in a fresh clone on a small built-in dataset, everything read back."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.conftest import copy_working_tree, free_port, stage_env, stop_process, wait_until_serving, write_params
from tests.test_plots_offline import external_loads

pytestmark = pytest.mark.e2e
TASKS = ["shape", "color", "size", "position"]


def dvc(clone: Path, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=clone, env=stage_env(clone),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def repro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    clone = copy_working_tree(tmp_path_factory.mktemp("e2e") / "repo")
    write_params(clone, {"compare": {"single_task": True}})
    proc = dvc(clone, "repro")
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return clone


def test_every_stage_output_exists(repro: Path):
    for rel in [
        "data/builtin/shapes/labels.csv", "data/ingested/manifest.csv", "data/ingested/data_report.json",
        "data/preprocessed/train_images.npy", "models/model.safetensors", "models/checkpoint.pt",
        "models/model_spec.json", "models/mlflow_run.json", "reports/train_history.csv",
        "reports/test_metrics.json", "reports/registry.json", *[f"reports/confusion/{t}.png" for t in TASKS],
        "reports/confusion_grid.png", "metrics.json",
        "reports/task_gradient_cosine.json", "reports/task_error_correlation.json", "reports/comparison.json",
        *[f"models_single_task/{t}/model.safetensors" for t in TASKS],
    ]:  # fmt: skip
        assert (repro / rel).is_file(), rel
    lock = yaml.safe_load((repro / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"ingest", "preprocess", "grouping", "train", "evaluate", "register", "baselines", "all_in_one", "compare"}


def test_repro_again_is_up_to_date(repro: Path):
    status = dvc(repro, "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout
    again = dvc(repro, "repro")
    assert again.returncode == 0
    assert "Data and pipelines are up to date." in again.stdout, again.stdout
    assert "Running stage" not in again.stdout


def test_dvc_metrics_show_reads_the_means_and_delta_m_and_the_per_task_files_when_named(repro: Path):
    """By default one file, metrics.json (means, Δm, negative-transfer count): one row that fits a
    120-column terminal; the per-task reports when named as targets."""
    shown = dvc(repro, "metrics", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    files = next(iter(json.loads(shown.stdout).values()))["data"]
    assert set(files) == {"metrics.json"}
    flat = files["metrics.json"]["data"]
    written = json.loads((repro / "reports" / "comparison.json").read_text())
    assert flat["delta_m"] == pytest.approx(written["delta_m_pct"]["balanced_accuracy"])
    assert set(written["delta_m_pct"]) == {"balanced_accuracy", "accuracy"}
    assert 0 <= flat["mean_mtl_balanced_accuracy"] <= 1 and flat["negative_transfer_tasks"] in range(len(TASKS) + 1)
    plain = dvc(repro, "metrics", "show")
    assert plain.returncode == 0 and max(map(len, plain.stdout.splitlines())) <= 120, plain.stdout
    named = dvc(repro, "metrics", "show", "--json", "reports/test_metrics.json", "reports/comparison.json")
    assert named.returncode == 0, named.stderr
    files = next(iter(json.loads(named.stdout).values()))["data"]
    test = files["reports/test_metrics.json"]["data"]
    assert set(test["tasks"]) == set(TASKS) and 0 <= test["mean"]["balanced_accuracy"] <= 1
    assert files["reports/comparison.json"]["data"]["delta_m_pct"] == pytest.approx(written["delta_m_pct"])


# What `dvc plots show` draws, each once: the two training charts (train_history.csv) and seven images,
# the confusion matrices of all tasks one of them (reports/confusion_grid.png), whatever the task count;
# and the error gallery, an image per task (reports/errors/).
PLOTS = {
    "Mean accuracy per epoch": "vega", "Mean loss per epoch": "vega",
    "reports/confusion_grid.png": "image", "reports/training_curves.png": "image", "reports/task_gradient_cosine.png": "image",
    "reports/task_error_correlation.png": "image", "reports/task_affinity.png": "image", "reports/calibration.png": "image",
    "reports/gradcam.png": "image", **{f"reports/errors/{t}.png": "image" for t in ("shape", "color", "size", "position")},
}  # fmt: skip


def test_dvc_plots_show_draws_each_plot_once_and_none_empty(repro: Path, tmp_path: Path):
    """The plots as DVC renders them (`dvc plots show --json`, the data of its HTML page): the expected
    plots and no more (no stage-level duplicate, no CSV drawn as a default line chart, no chart per
    task); every chart has data rows with the fields it draws, every image is there."""
    plots = dvc(repro, "plots", "show", "--json", "-o", str(tmp_path / "json"))  # images copied there
    assert plots.returncode == 0, plots.stderr
    shown = json.loads(plots.stdout)["data"]
    assert {name: [p["type"] for p in panels] for name, panels in shown.items()} == {k: [v] for k, v in PLOTS.items()}
    epochs = len(__import__("pandas").read_csv(repro / "reports" / "train_history.csv"))
    for name, (panel,) in shown.items():
        assert panel["revisions"] == ["workspace"], name
        if panel["type"] == "image":
            assert Path(panel["url"]).is_file(), panel
            continue
        rows = panel["content"]["data"]["values"]
        # two series (train, val), one point per epoch each
        assert sorted({r["field"] for r in rows}) == sorted(f"{s}/mean/{name.split()[1]}" for s in ("train", "val"))
        assert len(rows) == 2 * epochs and all(float(r["dvc_inferred_y_value"]) >= 0 for r in rows), rows[:2]
    html = dvc(repro, "plots", "show", "-o", str(tmp_path / "plots"))
    assert html.returncode == 0, html.stderr
    page = (tmp_path / "plots" / "index.html").read_text()
    body = page.split("</head>", 1)[1]  # the plots (the head holds the Vega bundle, whose code has "<img" too)
    images = sum(kind == "image" for kind in PLOTS.values())
    assert body.count("vegaEmbed(") == 2 and body.count("<img") == images, body[:2000]
    # DVC used the project's page (.dvc/config plots.html_template): Vega inline, nothing from a CDN
    assert external_loads(page) == [] and "window.vegaEmbed=" in page


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
    # the network off: every host unresolvable, every request through a proxy that is not there
    "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9", "--virtual-time-budget=20000",
]  # fmt: skip


def _drawn_charts(page: Path, profile: Path) -> int:
    """How many Vega charts headless Chromium drew in `page` with the network off (vega-embed's `marks`
    element exists only once a chart is rendered)."""
    done = subprocess.run(
        [shutil.which("chromium") or "chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.count('class="marks"')


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_dvc_plots_show_draws_its_charts_in_a_browser_without_network(repro: Path, tmp_path: Path):
    """The page `dvc plots show` writes, opened in headless Chromium that can reach no host: both charts
    drawn. The same page with DVC's own CDN scripts in place of the inline bundle draws none (what users
    saw offline), so the network is really off."""
    html = dvc(repro, "plots", "show", "-o", str(tmp_path / "plots"))
    assert html.returncode == 0, html.stderr
    page = tmp_path / "plots" / "index.html"
    assert _drawn_charts(page, tmp_path / "profile-1") == 2
    from dvc_render.vega import VegaRenderer

    text = page.read_text()
    start, end = text.index('<script type="text/javascript">'), text.index("</script>") + len("</script>")
    cdn = page.with_name("cdn.html")
    cdn.write_text(text[:start] + VegaRenderer.SCRIPTS + text[end:])
    assert _drawn_charts(cdn, tmp_path / "profile-2") == 0


def test_mlflow_run_registry_and_loaded_model(repro: Path, monkeypatch: pytest.MonkeyPatch):
    mlflow.set_tracking_uri(f"sqlite:///{repro / 'mlflow.db'}")
    client = MlflowClient()
    run_id = json.loads((repro / "models" / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    metrics = json.loads((repro / "reports" / "test_metrics.json").read_text())
    for t in TASKS:
        assert run.data.metrics[f"test/{t}/accuracy"] == pytest.approx(metrics["tasks"][t]["accuracy"])
        assert run.data.metrics[f"test/{t}/f1_macro"] == pytest.approx(metrics["tasks"][t]["f1_macro"])
    # the run is tagged with the commit and with the DVC hash of the ingested data
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repro, capture_output=True, text=True).stdout.strip()
    assert run.data.tags["git_commit"] == commit
    lock = yaml.safe_load((repro / "dvc.lock").read_text())
    manifest_md5 = next(o["md5"] for o in lock["stages"]["ingest"]["outs"] if o["path"] == "data/ingested/manifest.csv")
    assert run.data.tags["dvc.data_md5"] == manifest_md5

    version = client.get_model_version_by_alias("mtl-shapes", "champion")
    assert str(version.version) == "1" and version.run_id == run_id

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model("models:/mtl-shapes@champion")
    manifest = __import__("pandas").read_csv(repro / "data" / "ingested" / "manifest.csv")
    row = manifest[manifest["split"] == "test"].iloc[0]
    image = np.asarray(Image.open(repro / row["path"]).convert("RGB"))
    out = model.predict(image[None])
    spec = json.loads((repro / "models" / "model_spec.json").read_text())
    for t in TASKS:
        assert out[t].iloc[0] in spec["tasks"][t]
        assert 0 < out[f"{t}_probability"].iloc[0] <= 1
    predicted = __import__("pandas").read_csv(repro / "reports" / "predictions" / "shape.csv")["predicted"].iloc[0]
    assert out["shape"].iloc[0] == predicted  # same image, same answer as the evaluate stage


def test_mlflow_ui_server_shows_run_metrics_plots_and_champion(repro: Path, tmp_path: Path):
    """What a user sees in `mlflow ui`: served over the REST API from the pipeline's SQLite store."""
    import urllib.parse
    import urllib.request

    port = free_port()
    log_path = tmp_path / "mlflow-server.log"
    log = open(log_path, "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{repro / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=repro, env=stage_env(repro), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def get(endpoint: str, **query: str) -> bytes:
        url = f"{base}{endpoint}" + ("?" + urllib.parse.urlencode(query) if query else "")
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200
            return r.read()

    try:
        wait_until_serving(f"{base}/health", server, log_path, "mlflow server", timeout=180)
        assert b"<html" in get("/").lower()  # the UI itself
        alias = json.loads(get("/api/2.0/mlflow/registered-models/alias", name="mtl-shapes", alias="champion"))
        run_id = alias["model_version"]["run_id"]
        assert str(alias["model_version"]["version"]) == "1"
        run = json.loads(get("/api/2.0/mlflow/runs/get", run_id=run_id))["run"]
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        expected = json.loads((repro / "reports" / "test_metrics.json").read_text())
        for t in TASKS:
            assert metrics[f"test/{t}/accuracy"] == pytest.approx(expected["tasks"][t]["accuracy"])
        listing = json.loads(get("/api/2.0/mlflow/artifacts/list", run_id=run_id, path="plots/confusion"))
        assert {f["path"] for f in listing["files"]} == {f"plots/confusion/{t}.png" for t in TASKS}
        png = get("/get-artifact", path="plots/confusion/shape.png", run_uuid=run_id)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        stop_process(server)
        log.close()


def test_user_csv_is_one_params_line_away_and_tracked_by_dvc(tmp_path: Path):
    from tests.test_ingest import make_faces

    clone = copy_working_tree(tmp_path / "repo")
    csv = make_faces(clone, n=30)
    write_params(clone, {"data": {"source": "data/datasets/faces/labels.csv"}})
    proc = dvc(clone, "repro", "ingest")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = __import__("pandas").read_csv(clone / "data" / "ingested" / "manifest.csv")
    assert len(manifest) == 30 and list(manifest.columns)[2:] == ["gender", "age_group", "glasses", "split"]
    assert json.loads(dvc(clone, "status", "ingest", "--json").stdout) == {}
    # changing an image of the user's dataset makes the ingest stage stale
    Image.new("RGB", (24, 24), "red").save(csv.parent / "images" / "0.png")
    status = json.loads(dvc(clone, "status", "ingest", "--json").stdout)
    assert "ingest" in status and "data/datasets" in json.dumps(status["ingest"])
