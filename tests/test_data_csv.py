"""CSV realities (mtl_core/data/manifest.py): encodings detected or given, errors naming the line,
Unicode labels normalised, reserved and unnamed columns, malformed rows rejected with their line."""

from __future__ import annotations

import codecs
import json
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mtl_core.config import ConfigError, config_from_dict
from mtl_core.data.manifest import IngestError
from mtl_core.stages.ingest import run_ingest

NFC = unicodedata.normalize("NFC", "café")
NFD = unicodedata.normalize("NFD", "café")


def folder_with_images(root: Path, n: int = 20) -> Path:
    folder = root / "data" / "datasets" / "d"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def write_csv(folder: Path, text: str, encoding: str = "utf-8", bom: bytes = b"") -> Path:
    csv = folder / "labels.csv"
    csv.write_bytes(bom + text.encode(encoding))
    return csv


def rows_text(n: int, label=lambda i: ["café", "thé"][i % 2], header: str = "path,drink") -> str:
    return header + "\n" + "".join(f"{i}.png,{label(i)}\n" for i in range(n))


def cfg_for(csv: Path, **data):
    return config_from_dict({"data": {"source": str(csv), **data}})


def drinks(result) -> list[str]:
    return json.loads(result.report.read_text())["tasks"]["drink"]


def test_latin1_csv_fails_with_the_line_and_asks_for_data_encoding(tmp_path: Path):
    folder = folder_with_images(tmp_path)
    csv = write_csv(folder, rows_text(20), "latin-1")  # line 1 header, line 2 '0.png,café'
    with pytest.raises(IngestError) as err:
        run_ingest(cfg_for(csv), tmp_path)
    msg = str(err.value)
    assert f"{csv} line 2: not valid UTF-8: byte(s) e9 after '0.png,caf'" in msg
    assert "data.encoding" in msg and "latin-1" in msg and "\n" not in msg
    # a latin-1 byte further down is found on its own line
    csv = write_csv(folder, rows_text(20, label=lambda i: "cafe" if i < 7 else ["café", "thé"][i % 2]), "latin-1")
    with pytest.raises(IngestError, match=r"line 9: not valid UTF-8: byte\(s\) e9 after '7.png,th'"):
        run_ingest(cfg_for(csv), tmp_path)


def test_given_encoding_reads_latin1_and_cp1252(tmp_path: Path):
    folder = folder_with_images(tmp_path)
    csv = write_csv(folder, rows_text(20), "latin-1")
    assert drinks(run_ingest(cfg_for(csv, encoding="latin-1"), tmp_path)) == ["café", "thé"]
    csv = write_csv(folder, rows_text(20, label=lambda i: ["€uro", "œuf"][i % 2]), "cp1252")
    result = run_ingest(cfg_for(csv, encoding="cp1252"), tmp_path)
    assert drinks(result) == ["œuf", "€uro"]  # sorted: U+0153 before U+20AC
    assert json.loads(result.report.read_text())["encoding"] == {"codec": "cp1252", "how": "data.encoding"}
    # the wrong codec given: the line, and the key to look at
    with pytest.raises(IngestError, match=r"line 2: not valid ascii: byte\(s\) 80 after '0.png,'; is data.encoding: ascii"):
        run_ingest(cfg_for(csv, encoding="ascii"), tmp_path)
    with pytest.raises(ConfigError, match=r"key 'data.encoding': unknown encoding 'latin-9x'"):
        cfg_for(csv, encoding="latin-9x")


@pytest.mark.parametrize(
    "encoding, bom, how",
    [
        ("utf-8", codecs.BOM_UTF8, "byte-order mark"),  # Excel's "CSV UTF-8"
        ("utf-16-le", codecs.BOM_UTF16_LE, "byte-order mark"),
        ("utf-16-be", codecs.BOM_UTF16_BE, "byte-order mark"),
        ("utf-16-le", b"", "UTF-16 without byte-order mark (NUL bytes)"),
        ("utf-32-le", codecs.BOM_UTF32_LE, "byte-order mark"),
    ],
)
def test_unicode_encodings_are_detected(tmp_path: Path, encoding: str, bom: bytes, how: str):
    folder = folder_with_images(tmp_path)
    csv = write_csv(folder, rows_text(20).replace("\n", "\r\n"), encoding, bom)
    result = run_ingest(cfg_for(csv), tmp_path)
    assert drinks(result) == ["café", "thé"] and result.rows_kept == 20
    assert json.loads(result.report.read_text())["encoding"]["how"] == how


def test_labels_are_nfc_normalised_and_stripped(tmp_path: Path):
    folder = folder_with_images(tmp_path)
    # café typed on a Mac (NFD) and on Windows (NFC), with stray spaces; the header too
    labels = [NFC, f" {NFD}", f"{NFC} ", "thé", unicodedata.normalize("NFD", "thé ")]
    csv = write_csv(folder, rows_text(20, label=lambda i: labels[i % 5], header=f"path, drink "))
    assert NFC != NFD
    result = run_ingest(cfg_for(csv), tmp_path)
    assert drinks(result) == [NFC, "thé"]
    manifest = pd.read_csv(result.manifest, dtype=str)
    assert manifest["drink"].tolist() == [[NFC, NFC, NFC, "thé", "thé"][i % 5] for i in range(20)]
    assert json.loads(result.report.read_text())["class_counts"]["drink"]["train"].keys() <= {NFC, "thé"}


def test_reserved_row_column_is_refused_in_one_line_or_left_out(tmp_path: Path):
    folder = folder_with_images(tmp_path)
    csv = write_csv(folder, "row,path,drink\n" + "".join(f"{100 + i},{i}.png,{['a', 'b'][i % 2]}\n" for i in range(20)))
    with pytest.raises(IngestError) as err:
        run_ingest(cfg_for(csv), tmp_path)  # tasks: [] would make `row` a task
    msg = str(err.value)
    assert "column 'row' is reserved" in msg and "rename it" in msg and "\n" not in msg
    with pytest.raises(IngestError, match="column 'row' is reserved"):
        run_ingest(cfg_for(csv, sample_weight_column="row"), tmp_path)
    # named tasks without it: the user's column is ignored (and reported), `row` is the CSV line
    result = run_ingest(cfg_for(csv, tasks=["drink"]), tmp_path)
    manifest = pd.read_csv(result.manifest)
    assert sorted(manifest["row"]) == list(range(2, 22))
    assert json.loads(result.report.read_text())["ignored_columns"] == ["row"]


def test_split_cannot_be_a_task_and_duplicate_column_names_are_refused(tmp_path: Path):
    folder = folder_with_images(tmp_path)
    csv = write_csv(folder, rows_text(20))
    with pytest.raises(IngestError, match=r"'split' is reserved and cannot be a task column"):
        run_ingest(cfg_for(csv, tasks=["split"]), tmp_path)
    csv = write_csv(folder, "path,drink,drink\n" + "".join(f"{i}.png,a,b\n" for i in range(20)))
    with pytest.raises(IngestError, match=r"column name\(s\) 'drink' appear more than once"):
        run_ingest(cfg_for(csv), tmp_path)


def test_line_numbers_survive_blank_lines_and_quoted_newlines(tmp_path: Path):
    folder = folder_with_images(tmp_path)
    text = (
        "path,drink,note\n"                 # line 1
        "0.png,tea,\"two\nlines\"\n"        # lines 2-3: one record
        "\n"                                # line 4: blank, skipped
        "1.png,coffee,x\n"                  # line 5
        "missing.png,tea,x\n"               # line 6: rejected
        "2.png,coffee,x,surplus\n"          # line 7: one field too many
        ",,\n"                              # line 8: a record of empty cells, not a blank line
        "3.png,tea\n"                       # line 9: the trailing empty cell left out: fine
    ) + "".join(f"{i}.png,{['tea', 'coffee'][i % 2]},x\n" for i in range(4, 20))  # fmt: skip
    csv = write_csv(folder, text)
    result = run_ingest(cfg_for(csv, tasks=["drink"], max_rejected_fraction=0.2), tmp_path)
    rejected = pd.read_csv(result.rejected).set_index("row")["reason"].to_dict()
    assert rejected == {
        6: "file not found",
        7: "malformed row: 4 fields where the header has 3 (a comma in an unquoted cell?)",
        8: "empty path",
    }
    manifest = pd.read_csv(result.manifest).set_index("path")["row"]
    assert manifest["data/datasets/d/0.png"] == 2 and manifest["data/datasets/d/1.png"] == 5
    assert manifest["data/datasets/d/3.png"] == 9 and manifest["data/datasets/d/4.png"] == 10
    assert json.loads(result.report.read_text())["ignored_columns"] == ["note"]


def test_a_parse_error_names_the_line(tmp_path: Path):
    folder = folder_with_images(tmp_path)
    csv = write_csv(folder, rows_text(5) + '5.png,"tea"x\n' + rows_text(20)[len("path,drink\n") :])
    with pytest.raises(IngestError, match=r"labels\.csv line 7: not a readable CSV: ',' expected after '\"'"):
        run_ingest(cfg_for(csv), tmp_path)


def test_a_symlink_out_of_the_dataset_folder_is_not_followed(tmp_path: Path):
    folder = folder_with_images(tmp_path)
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    (folder / "inside.png").symlink_to(secret)  # looks inside, points outside
    (folder / "also.png").symlink_to(folder / "3.png")  # points inside: fine, the same file as 3.png
    csv = write_csv(folder, rows_text(20) + "inside.png,tea\nalso.png,thé\n")
    result = run_ingest(cfg_for(csv, max_rejected_fraction=0.1), tmp_path)
    rejected = pd.read_csv(result.rejected)
    assert rejected[["row", "path"]].values.tolist() == [[22, "inside.png"]]
    assert rejected.loc[0, "reason"].startswith("path escapes the dataset folder")
    manifest = pd.read_csv(result.manifest)
    assert not manifest["path"].str.contains("secret").any() and result.rows_kept == 20
    merged = json.loads(result.report.read_text())["duplicates"]["merged"]
    assert merged == [{"kept_row": 5, "merged_rows": [23], "why": "same path", "paths": ["3.png", "also.png"]}]
