"""`mtl predict`: the registered champion and a local models/ folder, table and JSON output, errors."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mtl_core.cli import main
from mtl_core.config import load_config
from mtl_core.paths import ProjectPaths
from mtl_core.registry.predictor import MultiTaskPredictor
from mtl_core.registry.register import run_register
from tests.conftest import stage_env


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
