"""`mtl predict`: the registered champion and a local models/ folder, table and JSON output, errors;
the champion served by `mlflow models serve`, and what it refuses."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mtl_core.cli import main
from mtl_core.config import PreprocessConfig, load_config
from mtl_core.paths import ProjectPaths
from mtl_core.registry import image_files, model_source
from mtl_core.registry.predictor import ImageInputError, MultiTaskPredictor, as_image_batch, normalize_lut, resize_rgb
from mtl_core.stages.register import run_register
from mtl_core.transforms import eval_transform
from mtl_core.data.images import resize_rgb as preprocessing_resize
from tests.conftest import free_port, stage_env, stop_process, wait_until_serving


@pytest.fixture(scope="module", autouse=True)
def _own_tracking_store() -> Iterator[None]:
    """`mlflow.set_tracking_uri` also sets $MLFLOW_TRACKING_URI, which `tracking_uri()` prefers over the
    project's own store: unset it so that each project here uses its own mlflow.db, as a fresh `mtl` does."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


@pytest.fixture(autouse=True)
def _no_tracking_uri_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def project(trained_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the trained project with `mtl-shapes` registered and aliased `champion` in its own store."""
    root = tmp_path_factory.mktemp("predict") / "project"
    shutil.copytree(trained_project, root)
    report = run_register(load_config(root / "params.yaml"), root)
    assert report.champion_version == "1"
    return root


@pytest.fixture(scope="module")
def spec(project: Path) -> dict:
    return json.loads(ProjectPaths(project).model_spec.read_text())


@pytest.fixture(scope="module")
def predictor(project: Path) -> MultiTaskPredictor:
    paths = ProjectPaths(project)
    return MultiTaskPredictor(paths.model_spec, paths.weights)


@pytest.fixture(scope="module")
def test_images(project: Path, spec: dict, predictor: MultiTaskPredictor) -> list[tuple[str, dict[str, str]]]:
    """Two test-split images, as (path relative to the root, evaluate stage's predicted class per task).

    The evaluate stage's `reports/predictions/<task>.csv` rows are the test split in manifest order. Of the
    first 30 test images, the two whose top-1 leads its runner-up by the widest margin on every task are
    taken, so that the comparison with the evaluate stage cannot flip on float noise.
    """
    paths = ProjectPaths(project)
    manifest = pd.read_csv(paths.manifest, dtype=str, keep_default_na=False)
    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    evaluated = {t: pd.read_csv(paths.predictions_dir / f"{t}.csv")["predicted"] for t in spec["tasks"]}
    assert all(len(col) == len(test) for col in evaluated.values())  # every test image has every label

    out = predictor.predict_images(np.load(paths.images_cache("test"))[:30])
    margins = np.full(len(out), np.inf)
    for task, classes in spec["tasks"].items():
        top2 = np.sort(out[[f"{task}_prob_{c}" for c in classes]].to_numpy(), axis=1)[:, -2:]
        margins = np.minimum(margins, top2[:, 1] - top2[:, 0])
    picked = sorted(np.argsort(-margins)[:2])
    return [(test["path"][i], {t: evaluated[t][i] for t in spec["tasks"]}) for i in picked]


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def champion_json(project: Path, test_images) -> list[dict]:
    """`mtl predict --json` with the default model (the registry's champion) on the two test images."""
    images = [str(project / rel) for rel, _ in test_images]
    code, out, err = _run(["predict", *images, "--json", "--root", str(project)])
    assert code == 0, err
    return json.loads(out)  # stdout is nothing but the JSON


def _expected(predictor: MultiTaskPredictor, image: str | Path) -> pd.DataFrame:
    with Image.open(image) as im:
        return predictor.predict_images(np.asarray(im.convert("RGB")))


def _check_probabilities(prediction: dict, classes: list[str]) -> np.ndarray:
    assert list(prediction["probabilities"]) == classes
    probs = np.array(list(prediction["probabilities"].values()))
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert prediction["probability"] == pytest.approx(probs.max(), abs=1e-7)
    assert prediction["class"] == classes[int(probs.argmax())]
    return probs


def test_json_from_registered_champion(champion_json, project: Path, test_images, spec: dict, predictor):
    assert [r["image"] for r in champion_json] == [str(project / rel) for rel, _ in test_images]
    for record, (rel, evaluated) in zip(champion_json, test_images, strict=True):
        assert list(record["predictions"]) == list(spec["tasks"])  # every task, in the model's order
        expected = _expected(predictor, project / rel)
        for task, classes in spec["tasks"].items():
            prediction = record["predictions"][task]
            probs = _check_probabilities(prediction, classes)
            assert prediction["class"] == evaluated[task], (rel, task)  # what the evaluate stage predicted
            assert prediction["class"] == expected[task][0]
            np.testing.assert_allclose(probs, expected[[f"{task}_prob_{c}" for c in classes]].to_numpy()[0], atol=1e-5)


def test_local_model_folder_matches_registry_and_takes_any_size_and_mode(
    champion_json, project: Path, test_images, spec: dict, predictor, tmp_path: Path
):
    first = project / test_images[0][0]
    with Image.open(first) as im:  # the same picture, other sizes and modes in the same call
        im.convert("L").resize((101, 67)).save(tmp_path / "gray.png")
        im.convert("RGBA").resize((40, 90)).save(tmp_path / "rgba.png")
    images = [str(project / rel) for rel, _ in test_images] + [str(tmp_path / "gray.png"), str(tmp_path / "rgba.png")]

    code, out, err = _run(["predict", *images, "--model", str(project / "models"), "--json"])
    assert code == 0, err
    records = json.loads(out)
    assert [r["image"] for r in records] == images
    for local, registry in zip(records, champion_json, strict=False):  # the two images both models saw
        assert {t: p["class"] for t, p in local["predictions"].items()} == {
            t: p["class"] for t, p in registry["predictions"].items()
        }
    for record in records[2:]:
        expected = _expected(predictor, record["image"])
        for task, classes in spec["tasks"].items():
            _check_probabilities(record["predictions"][task], classes)
            assert record["predictions"][task]["class"] == expected[task][0]

    # the weights file itself, and the last-epoch training checkpoint, next to model_spec.json
    for weights in ("model.safetensors", "checkpoint.pt"):
        code, out, err = _run(["predict", images[2], "--model", str(project / "models" / weights), "--json"])
        assert code == 0, err
        (record,) = json.loads(out)
        for task, classes in spec["tasks"].items():
            _check_probabilities(record["predictions"][task], classes)


def test_table_names_every_task_and_image(project: Path, test_images, spec: dict, capsys: pytest.CaptureFixture):
    images = [str(project / rel) for rel, _ in test_images]
    assert main(["predict", *images, "--model", str(project / "models")]) == 0
    out = capsys.readouterr().out
    for image in images:
        assert image in out  # whole, not wrapped or cut short although stdout is no terminal
    for task in spec["tasks"]:
        assert task in out
    assert "probability" in out and "model.safetensors" in out


def test_console_script_prints_champion_table(project: Path, test_images, spec: dict):
    """The installed `mtl` entry point, run in the project folder with every default."""
    mtl = Path(sys.executable).with_name("mtl")
    rels = [rel for rel, _ in test_images]
    proc = subprocess.run(
        [str(mtl), "predict", *rels], cwd=project, env=stage_env(project), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "models:/mtl-shapes@champion" in proc.stdout
    for rel, evaluated in test_images:
        assert rel in proc.stdout
        row = proc.stdout[proc.stdout.index(rel) :].splitlines()[0]
        assert evaluated[next(iter(spec["tasks"]))] in row  # the first task's class, on the image's line
    for task in spec["tasks"]:
        assert task in proc.stdout


def test_errors_name_the_culprit(project: Path, test_images, tmp_path: Path):
    image = str(project / test_images[0][0])

    missing = tmp_path / "no_such_image.png"
    code, out, err = _run(["predict", image, str(missing), "--root", str(project)])
    assert code == 2 and out == ""
    assert err.startswith("mtl predict: error:") and str(missing) in err

    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    code, _, err = _run(["predict", str(not_image), "--root", str(project)])
    assert code == 2 and str(not_image) in err and "cannot read image" in err

    code, _, err = _run(["predict", image, "--model", "models:/nope@champion", "--root", str(project)])
    assert code == 2
    assert "models:/nope@champion" in err and str((project / "mlflow.db").resolve()) in err

    code, _, err = _run(["predict", image, "--model", "models:/mtl-shapes@nope", "--root", str(project)])
    assert code == 2 and "models:/mtl-shapes@nope" in err and "alias" in err

    # a folder without the trained model's files, then one with the spec but no weights
    folder = tmp_path / "models"
    folder.mkdir()
    code, _, err = _run(["predict", image, "--model", str(folder)])
    assert code == 2 and str(folder) in err and "model_spec.json" in err
    shutil.copy(project / "models" / "model_spec.json", folder)
    code, _, err = _run(["predict", image, "--model", str(folder)])
    assert code == 2 and str(folder) in err and "model.safetensors" in err

    # a project without a tracking store: say so, and do not leave an empty store behind
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(project / "params.yaml", bare)
    code, _, err = _run(["predict", image, "--root", str(bare)])
    assert code == 2 and "models:/mtl-shapes@champion" in err and str((bare / "mlflow.db").resolve()) in err
    assert not (bare / "mlflow.db").exists()


# ------------------------------------------------------------------------------------- input checks


def test_predictor_resize_and_normalisation_equal_the_preprocessing_to_the_bit():
    """The predictor does without Albumentations (a third of `mtl predict`'s imports): its own resize and
    normalisation must stay those that made the training caches and the evaluate stage's inputs."""
    rng = np.random.default_rng(0)
    cfg = PreprocessConfig(image_size=24, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    lut = normalize_lut(cfg.mean, cfg.std)
    for shape, mode in (((24, 24, 3), "RGB"), ((31, 17, 3), "RGB"), ((40, 40), "L"), ((9, 50, 4), "RGBA")):
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        pixels = resize_rgb(image, cfg.image_size)
        np.testing.assert_array_equal(pixels, preprocessing_resize(image, cfg.image_size))
        expected = eval_transform(cfg)(image=pixels)["image"].numpy()
        ours = np.stack([lut[c][pixels[..., c]] for c in range(3)])
        assert ours.dtype == expected.dtype == np.float32
        np.testing.assert_array_equal(ours, expected)


def test_image_batches_refuse_floats_out_of_range_values_and_other_channels_in_one_line():
    image = np.zeros((8, 6, 3), np.uint8)
    assert [a.shape for a in as_image_batch(np.stack([image, image]))] == [(8, 6, 3)] * 2
    assert [a.shape for a in as_image_batch(image)] == [(8, 6, 3)]
    ints = as_image_batch(np.full((1, 4, 4, 3), 255, np.int64))  # what a JSON request arrives as
    assert ints[0].dtype == np.uint8 and ints[0].max() == 255
    assert [a.shape for a in as_image_batch([image, np.zeros((3, 5, 3), np.uint8)])] == [(8, 6, 3), (3, 5, 3)]

    refused = {
        "uint8 pixel values 0-255, got float32 values 0 to 1: a float image in [0, 1]": np.linspace(0, 1, 144, dtype=np.float32).reshape(1, 8, 6, 3),
        "got int64 values -1 to 0": np.full((1, 2, 2, 3), -1, np.int64) * np.array([1, 0, 0]),
        "got int64 values 0 to 256": np.array([[[[256, 0, 0]]]]),
        "3 channels (RGB) in the last axis, got 2": np.zeros((1, 8, 6, 2), np.uint8),
        "3 channels (RGB) in the last axis, got 4": np.zeros((8, 6, 4), np.uint8),
        "shape (N, H, W, 3) or one image (H, W, 3), got shape (8, 6)": np.zeros((8, 6), np.uint8),
        "got dtype bool": np.zeros((1, 2, 2, 3), bool),
        "not a DataFrame": pd.DataFrame({"a": [1]}),
        "image 1: expected one image of shape (H, W, 3)": [image, np.zeros((2, 2, 2, 3), np.uint8)],
        "no images to predict": [],
    }
    for expected, images in refused.items():
        with pytest.raises(ImageInputError) as err:
            as_image_batch(images)
        assert expected in str(err.value)
        assert len(str(err.value)) < 200 and "\n" not in str(err.value)  # one line, never the data


# ------------------------------------------------------------------------- the fast champion lookup


def test_champion_is_read_from_the_registry_without_mlflow_and_matches_mlflows_pyfunc(project: Path, test_images):
    """`models:/NAME@ALIAS` in the project's SQLite store: the folder read from the registry tables is the
    one MLflow resolves, and the predictions equal those of MLflow's pyfunc loader on the same files."""
    import mlflow
    from mlflow.tracking import MlflowClient

    cfg = load_config(project / "params.yaml")
    db = project / "mlflow.db"
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    client = MlflowClient()
    version = client.get_model_version_by_alias("mtl-shapes", "champion").version
    resolved = Path(client.get_model_version_download_uri("mtl-shapes", version).removeprefix("file://"))
    for uri in ("models:/mtl-shapes@champion", f"models:/mtl-shapes/{version}"):
        assert model_source.registry_model_folder(db, uri) == resolved
    for unknown in ("models:/mtl-shapes@nope", "models:/mtl-shapes/99", "models:/nope@champion", "runs:/x/model"):
        assert model_source.registry_model_folder(db, unknown) is None  # MLflow answers, and explains

    fast = model_source.load_mlflow_model("models:/mtl-shapes@champion", cfg, project)
    slow = model_source._from_pyfunc(mlflow.pyfunc.load_model("models:/mtl-shapes@champion"), "slow")
    assert fast.tasks == json.loads(ProjectPaths(project).model_spec.read_text())["tasks"]
    images = [image_files.read_image(project / rel, fast.image_size) for rel, _ in test_images]
    a, b = fast.probabilities(images), slow.probabilities(images)
    assert list(a) == list(b) == list(fast.tasks)  # the model's task order, on both paths
    for task in fast.tasks:
        np.testing.assert_allclose(a[task], b[task], atol=1e-6)


_IMPORTS_OF_PREDICT = """
import sys
from mtl_core.cli import main
code = main(sys.argv[1:])
heavy = [m for m in ("mlflow", "albumentations", "pandas", "pydantic", "sqlalchemy") if m in sys.modules]
print("HEAVY", heavy)
sys.exit(code)
"""


def test_predict_with_a_local_model_or_the_local_champion_imports_no_mlflow(project: Path, test_images):
    """What keeps `mtl predict` usable in a shell loop: a trained folder and the champion of the project's
    own store load without MLflow, Albumentations, pandas (and, for the folder, pydantic)."""
    image = str(project / test_images[0][0])
    cases = {
        ("--model", "models"): [],
        (): ["pydantic"],  # the champion: params.yaml names the model and the store
    }
    for args, expected in cases.items():
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-c", _IMPORTS_OF_PREDICT, "predict", image, "--json", *args],
            cwd=project, env=stage_env(project), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip().endswith(f"HEAVY {expected}"), (args, proc.stdout[-500:])
        print(f"mtl predict {' '.join(args) or '(champion)'}: {time.monotonic() - started:.1f} s")


# ---------------------------------------------------------------------------------------- serving


def _post(url: str, payload: object) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_served_champion_answers_an_image_and_refuses_wrong_ones_briefly(project: Path, test_images, predictor, tmp_path: Path):
    """`mlflow models serve` of the champion on 127.0.0.1, as the README shows it: a real image (uint8 as
    JSON integers) is answered like the predictor answers it; a float image in [0, 1] and a 2-channel image
    get HTTP 400 with a one-line message, not a confident answer or a dump of the array."""
    port = free_port()
    env = {**stage_env(project), "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    log_path = tmp_path / "serve.log"
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    command = [mlflow_cli, "models", "serve", "-m", "models:/mtl-shapes@champion", "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{url}/ping", server, log_path, "mlflow models serve", timeout=120)

        with Image.open(project / test_images[0][0]) as im:
            image = np.asarray(im.convert("RGB"))
        status, body = _post(f"{url}/invocations", {"inputs": image[None].tolist()})
        assert status == 200, body
        (answer,) = body["predictions"]
        expected = predictor.predict_images(image[None]).iloc[0]
        for task, classes in predictor.spec["tasks"].items():
            assert answer[task] == expected[task]
            np.testing.assert_allclose([answer[f"{task}_prob_{c}"] for c in classes], [expected[f"{task}_prob_{c}"] for c in classes], atol=1e-6)
        # the raw (uncalibrated) probabilities through the signature's parameter `raw`
        status, body = _post(f"{url}/invocations", {"inputs": image[None].tolist(), "params": {"raw": True}})
        assert status == 200, body
        (answer,) = body["predictions"]
        paths = ProjectPaths(project)
        raw = MultiTaskPredictor(paths.model_spec, paths.weights, raw=True).predict_images(image[None]).iloc[0]
        for task, classes in predictor.spec["tasks"].items():
            np.testing.assert_allclose([answer[f"{task}_prob_{c}"] for c in classes], [raw[f"{task}_prob_{c}"] for c in classes], atol=1e-6)

        for wrong, words in (
            ((image[None] / 255.0).tolist(), ("uint8", "float64", "[0, 1]")),
            (image[None, :, :, :2].tolist(), ("3 channels", "got 2")),
        ):
            status, body = _post(f"{url}/invocations", {"inputs": wrong})
            assert status == 400, body
            assert all(w in body["message"] for w in words), body["message"]
            assert len(body["message"]) < 200, body["message"][:500]  # the message, not the array
    finally:
        stop_process(server)
        with contextlib.suppress(ProcessLookupError):  # the uvicorn worker it started, if still there
            os.killpg(server.pid, signal.SIGKILL)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/ping", timeout=2)
