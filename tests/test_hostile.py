"""Hostile files and careless flags, class by class: files made to break a reader, not the ones a careful user
makes. Each class runs on the embedded default model and files built here, so it needs no ``../shared``.

1. shard lists never run commands or fetch; 2. archives cannot expand in memory; 3. one bad photo never ends a
batch; 4. corrupt images are refused, not located; 5. slow clients cannot hold the service; 6. every numeric
flag of every command refuses hostile values in one line; 7. no command writes into another's artifact;
8. rows skipped from a list fail the run; 9. Python API inputs; 10. the smaller things (offline /docs, kept
outputs, symlinks, stale temporaries, paths outside the image folder, line numbers, leaking warnings, pixels
per request). The property-based fuzz of image and EXIF bytes is in test_fuzz_images.py.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from geoswc.cli import main
from geoswc.core.config import SearchConfig
from geoswc.core.errors import ArtifactError, ImageError, SettingError
from geoswc.data.images import load_image, read_gps
from geoswc.data.records import LoadReport
from geoswc.data.shards import iter_samples, iter_shard
from geoswc.prediction.geolocator import Geolocator, LocateFailure, Prediction, default_model_dir
from geoswc.prediction.results import Neighbor
from geoswc.service.settings import ServiceSettings

from .conftest import KAUAI, free_port, gps_exif_raw, jpeg_bytes, kauai_jpeg
from .test_bad_input import run_cli

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


@pytest.fixture(scope="module")
def geo() -> Geolocator:
    return Geolocator.load()


def one_error_line(rc: int, err: str, command: str, *needles: str) -> str:
    """Exit status 2 and exactly one ``geoswc COMMAND: error:`` line on stderr, holding the needles."""
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"geoswc {command}: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def jpeg_claiming_more_rows(progressive: bool = False) -> bytes:
    """A complete JPEG (end marker and all) whose frame header declares three times the rows its scans hold:
    libjpeg decodes it without an error and fills the missing rows with grey."""
    data = bytearray(kauai_jpeg(progressive=progressive))
    at = data.find(b"\xff\xc2" if progressive else b"\xff\xc0")
    (height,) = struct.unpack(">H", data[at + 5 : at + 7])
    data[at + 5 : at + 7] = struct.pack(">H", 3 * height)
    return bytes(data)


MALFORMED_GPS = {
    "hundreds_of_components": (tuple((i, 1) for i in range(300)), ((10, 1), (0, 1), (0, 1))),
    "zero_denominators": (((10, 0), (5, 0), (1, 0)), ((0, 0), (0, 0), (0, 0))),
    "huge_values": (((2**32 - 1, 1), (2**32 - 1, 1), (2**32 - 1, 1)), ((1, 2**32 - 1),) * 3),
}


# -- 1. shard lists never run commands or fetch ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec",
    [
        "pipe:touch {tmp}/ran",
        "pipe:sh -c 'touch {tmp}/ran'",
        "http://127.0.0.1:9/shard-{{000..001}}.tar",
        "s3://bucket/shard.tar",
        "gs://bucket/shard.tar",
    ],
)
@pytest.mark.parametrize("command", ["locate", "features", "index"])
def test_shard_specs_from_the_command_line_never_run_or_fetch(
    spec: str, command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = {
        "locate": ["locate"],
        "features": ["features", "--out", tmp_path / "f"],
        "index": ["index", "--model", tmp_path / "nope", "--out", tmp_path / "i"],
    }[command]
    rc, _, err = run_cli([*argv, "--data.shards", spec.format(tmp=tmp_path)], capsys)
    one_error_line(rc, err, command, "local files")
    assert not (tmp_path / "ran").exists()


def test_a_listed_command_is_only_ever_a_file_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "shards.json").write_text(
        json.dumps({"shardlist": [{"url": f"pipe:touch {tmp_path}/ran", "nsamples": 1}]})
    )
    rc, _, err = run_cli(["locate", "--data.shards", folder], capsys)
    one_error_line(rc, err, "locate", "not a file name inside")
    assert not (tmp_path / "ran").exists()


# -- 2. archives that would expand in memory -----------------------------------------------------------------


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _member(name: str, data: bytes) -> bytes:
    return _header(name, len(data)) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def _sample(key: str, image: bytes, meta: bytes | None = None) -> bytes:
    meta = meta if meta is not None else json.dumps({"lat": 21.9, "lon": -159.5, "author": "a"}).encode()
    return _member(f"{key}.jpg", image) + _member(f"{key}.json", meta)


END = b"\0" * (2 * tarfile.BLOCKSIZE)
GIB = 2**30

HOSTILE_SHARDS = {  # name: (shard bytes after one good sample, what the report must say)
    "member_declares_4_gib": (_header("b.jpg", 4 * GIB) + b"\xff" * 9000, "declares"),
    "sparse_member": (_header("b.jpg", 3 * GIB, tarfile.GNUTYPE_SPARSE) + b"\0" * 9000, "sparse file"),
    "long_name_declares_4_gib": (
        _header("././@LongLink", 4 * GIB, tarfile.GNUTYPE_LONGNAME) + b"a" * 9000,
        "extended tar header",
    ),
    "pax_header_declares_4_gib": (_header("pax", 4 * GIB, tarfile.XHDTYPE) + b"1 a\n" * 2000, "extended tar header"),
    "json_nested_100k_deep": (_sample("b", jpeg_bytes(), b'{"a":' * 100_000 + b"1" + b"}" * 100_000), "bad .json"),
    "json_above_1_mib": (
        _sample("b", jpeg_bytes(), b'{"lat": 1, "lon": 2, "x": "' + b"a" * (2 * 2**20) + b'"}'),
        "declares",
    ),
    "json_number_of_a_million_digits": (
        _sample("b", jpeg_bytes(), b'{"lat": ' + b"1" * 900_000 + b', "lon": 2}'),
        "bad .json",
    ),
}


@pytest.mark.parametrize("kind", list(HOSTILE_SHARDS))
def test_hostile_archives_are_reported_in_bounded_memory(kind: str, tmp_path: Path) -> None:
    """Each hostile shard follows one good sample, and a good shard follows it: the good samples come back,
    the hostile one is reported, and reading never holds more than a few MiB beyond the members it keeps."""
    tail, reason = HOSTILE_SHARDS[kind]
    (tmp_path / "shard-000000.tar").write_bytes(_sample("a", jpeg_bytes()) + tail + END)
    (tmp_path / "shard-000001.tar").write_bytes(_sample("c", jpeg_bytes(color=(10, 200, 30))) + END)
    report = LoadReport("hostile")
    tracemalloc.start()
    try:
        samples = list(iter_samples(tmp_path, report))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [s.key for s in samples] == ["a", "c"]
    reasons = [why for _, why in report.skipped]  # the sample, and the shard when the member runs past its end
    assert 1 <= len(reasons) <= 2 and reason in reasons[0], reasons
    assert peak < 16 * 2**20 + (4 * 2**20 if "json" in kind else 0), f"{peak / 2**20:.0f} MiB"


def test_an_oversized_member_is_skipped_and_the_shard_goes_on(tmp_path: Path) -> None:
    """A member above the photo size limit that really is that long is stepped over, not read: the samples
    after it in the same shard are still read."""
    from geoswc.data.images import ImageLimits

    big = _member("b.jpg", b"\xff" * 300_000) + _member("b.json", b'{"lat": 1, "lon": 2}')
    (tmp_path / "shard-000000.tar").write_bytes(_sample("a", jpeg_bytes()) + big + _sample("c", jpeg_bytes()) + END)
    out = list(iter_shard(str(tmp_path / "shard-000000.tar"), 0, ImageLimits(max_bytes=100_000)))
    assert [getattr(s, "key", None) for s in out] == ["a", None, "c"]
    assert "declares 300000 bytes" in out[1].reason


def test_locate_over_hostile_shards_reports_and_finishes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "shard-000000.tar").write_bytes(
        _sample("a", kauai_jpeg()) + HOSTILE_SHARDS["member_declares_4_gib"][0] + END
    )
    (tmp_path / "shard-000001.tar").write_bytes(
        _sample("n", kauai_jpeg(), HOSTILE_SHARDS["json_nested_100k_deep"][0][-400_010:])
        + _sample("c", kauai_jpeg())
        + END
    )
    out = tmp_path / "pred.jsonl"
    rc, stdout, err = run_cli(["locate", "--data.shards", tmp_path, "--output", out], capsys)
    assert rc == 1 and "Traceback" not in err, err
    assert "2 photos located, 3 failed" in stdout  # b, the rest of its shard, and n
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["image"] for r in rows if "lat" in r and r.get("lat") is not None) == ["a.jpg", "c.jpg"]


# -- 3. one bad photo never ends a batch ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(MALFORMED_GPS))
def test_malformed_gps_exif_is_no_position_and_the_photo_is_still_located(kind: str, geo: Geolocator) -> None:
    lat, lon = MALFORMED_GPS[kind]
    data = kauai_jpeg(exif=gps_exif_raw(lat, lon))
    assert read_gps(data) is None
    pred = geo.locate(data, name="bad-exif.jpg")
    assert pred.exif is None and -90 <= pred.lat <= 90


def test_a_folder_with_malformed_exif_and_broken_photos_finishes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for kind, (lat, lon) in MALFORMED_GPS.items():
        (folder / f"{kind}.jpg").write_bytes(kauai_jpeg(exif=gps_exif_raw(lat, lon)))
    (folder / "grey_filled.jpg").write_bytes(jpeg_claiming_more_rows())
    out = tmp_path / "pred.csv"
    rc, stdout, err = run_cli(["locate", folder, "--output", out], capsys)
    assert rc == 1 and "Traceback" not in err
    assert f"{len(MALFORMED_GPS)} photos located, 1 failed" in stdout
    table = {Path(r["image"]).name: r for r in csv.DictReader(out.open())}
    assert "truncated" in table["grey_filled.jpg"]["error"] and not table["grey_filled.jpg"]["lat"]
    assert all(table[f"{k}.jpg"]["lat"] and not table[f"{k}.jpg"]["error"] for k in MALFORMED_GPS)


def test_the_service_answers_malformed_exif_and_corrupt_photos_per_photo(geo: Geolocator) -> None:
    from fastapi.testclient import TestClient

    from geoswc.service.app import create_app

    client = TestClient(create_app(geo, ServiceSettings(warmup=False)))
    files = [("files", (f"{k}.jpg", kauai_jpeg(exif=gps_exif_raw(*v)), "image/jpeg")) for k, v in MALFORMED_GPS.items()]
    many = client.post("/api/locate", files=[*files, ("files", ("grey.jpg", jpeg_claiming_more_rows(), "image/jpeg"))])
    assert many.status_code == 200
    body = many.json()
    assert [r.get("exif") for r in body[:-1]] == [None] * len(MALFORMED_GPS) and all("lat" in r for r in body[:-1])
    assert body[-1]["status"] == 422 and "truncated" in body[-1]["error"]
    one = client.post("/api/locate", files=[("files", ("grey.jpg", jpeg_claiming_more_rows(), "image/jpeg"))])
    assert one.status_code == 422 and one.json()["kind"] == "corrupt"


# -- 4. corrupt images are refused, not located ---------------------------------------------------------------


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("draft", [None, 64])
def test_a_jpeg_whose_header_claims_rows_its_data_lacks_is_refused(progressive: bool, draft: int | None) -> None:
    with pytest.raises(ImageError, match="truncated") as e:
        load_image(jpeg_claiming_more_rows(progressive), draft_size=draft)
    assert e.value.kind == "corrupt"


def test_genuine_photos_with_grey_are_not_refused() -> None:
    """Only the decoder's exact fill, all the last rows at 128 in every channel, is refused: a photo whose
    bottom is a grey only close to it (as any real grey surface is) decodes."""
    rng = np.random.default_rng(0)
    a = np.full((64, 64, 3), 128, np.uint8)
    a[:, :, 0] = np.clip(128 + rng.normal(0, 3, (64, 64)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=95)
    assert load_image(buf.getvalue()).size == (64, 64)


# -- 5. slow clients cannot hold the service ----------------------------------------------------------------


def _trickle(port: int, seconds: float, result: list[str]) -> None:
    """Send a multipart request's headers, then its body one byte every 0.2 s; record the status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(
            b"POST /api/locate HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b'Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name="files"; '
            b'filename="slow.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        )
        s.settimeout(0.2)
        answer, end = b"", time.monotonic() + seconds
        while time.monotonic() < end and b"\r\n" not in answer:
            with contextlib.suppress(OSError):
                s.send(b"\xff")
            try:
                chunk = s.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
    result.append(answer.split(b"\r\n", 1)[0].decode("latin-1"))


@pytest.mark.slow
def test_trickling_clients_get_408_and_normal_uploads_are_served(tmp_path: Path) -> None:
    """`geoswc serve` with room for 2 requests; 3 clients trickle an upload a byte at a time (as one would to
    hold the service). Each is cut off with 408 within seconds, and a normal upload that retries on 503 (as
    Retry-After asks) is served while they are still connected and trickling."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("load_test", ROOT / "benchmarks" / "load_test.py")
    assert spec is not None and spec.loader is not None
    lt = sys.modules["load_test"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lt)
    flags = [
        "--service.max_concurrent",
        "1",
        "--service.max_queue",
        "1",
        "--service.upload_idle_s",
        "1",
        "--service.upload_min_kbs",
        "16",
        "--service.upload_timeout_s",
        "30",
    ]
    body, ctype = lt.multipart([("k.jpg", kauai_jpeg())])
    with lt.serve(flags, tmp_path / "serve.log", None, timeout_s=180) as server:
        statuses: list[str] = []
        tricklers = [threading.Thread(target=_trickle, args=(server.port, 20, statuses)) for _ in range(3)]
        for t in tricklers:
            t.start()
        time.sleep(0.3)
        start, answers = time.monotonic(), []
        while time.monotonic() - start < 15:
            status, headers, _ = lt.request(server.port, "POST", "/api/locate", body, ctype, timeout=30)
            answers.append(status)
            if status != 503:
                break
            time.sleep(min(float(headers.get("retry-after", 1)), 0.5))
        served_after = time.monotonic() - start
        for t in tricklers:
            t.join(30)
    assert answers[-1] == 200 and served_after < 10, (answers, served_after)
    assert sorted(statuses) == ["HTTP/1.1 408 Request Timeout"] * 2 + ["HTTP/1.1 503 Service Unavailable"], statuses


# -- 6. every numeric flag of every command ------------------------------------------------------------------

BASE_ARGS = {  # inputs that do not exist: a value the flag accepts ends in a "not found" line, never in work
    "cells": ["--coords", "{tmp}/nope.csv", "--out", "{tmp}/c.csv"],
    "features": ["--data.csv", "{tmp}/nope.csv", "--data.images", "{tmp}", "--out", "{tmp}/f"],
    "train": ["--features", "{tmp}/nope", "--cells", "{tmp}/nope.csv", "--out", "{tmp}/m"],
    "index": ["--model", "{tmp}/nope", "--features", "{tmp}/nope"],
    "evaluate": ["--data.csv", "{tmp}/nope.csv", "--data.images", "{tmp}", "--out", "{tmp}/e", "--model", "{tmp}/n"],
    "locate": ["{tmp}/nope.jpg", "--model", "{tmp}/nope"],
    "shards": ["--data.csv", "{tmp}/nope.csv", "--data.images", "{tmp}", "--out", "{tmp}/s"],
    "serve": ["--model", "{tmp}/nope", "--port", "0"],
}
HOSTILE_VALUES = ["-1", ".nan", ".inf", "-.inf", "1e400", str(2**64), "abc", "[1]"]
ACCEPTED_AT_2_64 = {"train.lr", "train.finetune_lr", "train.weight_decay", "train.temperature"}
"""Values that are only absurd, not invalid: a training run that diverges on them stops with exit 2 then."""


def _numeric_flags(command: str) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main([command, "--print_config"])
    flags: list[str] = []

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                flags.append(prefix + k)

    walk(yaml.safe_load(out.getvalue()), "")
    owners = {
        "locate": ("search", SearchConfig),
        "evaluate": ("search", SearchConfig),
        "serve": ("service", ServiceSettings),
    }
    if command in owners:  # partial changes: {} in --print_config; each field is a flag of its own
        group, cls = owners[command]
        flags += [f"{group}.{f.name}" for f in dataclasses.fields(cls) if f.type in ("int", "float")]
    return flags


CASES = [(c, f) for c in BASE_ARGS for f in _numeric_flags(c)]


@pytest.mark.slow
@pytest.mark.parametrize("command,flag", CASES, ids=[f"{c}--{f}" for c, f in CASES])
def test_every_numeric_flag_refuses_hostile_values_in_one_line(
    command: str, flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [a.format(tmp=tmp_path) for a in BASE_ARGS[command]]
    for value in HOSTILE_VALUES:
        if value == str(2**64) and flag in ACCEPTED_AT_2_64:
            continue
        rc, _, err = run_cli([command, *base, f"--{flag}", value], capsys)
        line = one_error_line(rc, err, command)
        assert f"--{flag}" in line or f"--{flag.split('.')[0]}" in line, (value, line)
    assert len(CASES) > 60  # the table covers the commands' numeric flags, not a handful


def test_a_diverging_training_stops_with_the_flag_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """lr = 2**64 is a number, so it passes the parser; the first epoch's loss is not, and nothing is saved."""
    import torch

    from geoswc.core import distributed
    from geoswc.training.checkpoint import Checkpointer, Phase, run_phase

    net = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=2.0**64)
    x = torch.randn(32, 4)
    loss = lambda b: (net(b) ** 2).mean()  # noqa: E731
    phase = Phase("mvmf", 2, 4, lambda rng: [x] * 4, loss, opt, [2.0**64], [net], distributed.engine())
    ckpt = Checkpointer(tmp_path / "ckpt", "run", {"net": net})
    with pytest.raises(SettingError, match="diverged") as e:
        run_phase(phase, ckpt, 0, {}, progress=False)
    assert e.value.field == "lr" and not list((tmp_path / "ckpt").glob("*.safetensors"))


def test_workers_beyond_the_cores_are_capped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    from geoswc.data.records import worker_count

    with caplog.at_level("WARNING"):
        n = worker_count(10_000)
    assert 0 <= n <= (os.cpu_count() or 1) and "workers" in caplog.text


def test_a_device_that_is_not_there_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for device in ("cuda:7", "mps", "tpu"):
        rc, _, err = run_cli(["locate", KAUAI, "--run.device", device], capsys)
        if rc == 0:  # a machine that has it
            continue
        one_error_line(rc, err, "locate", "--run.device")


def test_serve_on_a_busy_port_or_a_foreign_address_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, _, err = run_cli(["serve", "--port", port], capsys)
        one_error_line(rc, err, "serve", f"127.0.0.1:{port}")
    rc, _, err = run_cli(["serve", "--host", "192.0.2.1", "--port", free_port()], capsys)  # TEST-NET-1
    one_error_line(rc, err, "serve", "192.0.2.1")


# -- 7. no command writes into another command's artifact -------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A copy of the embedded model with its index, and a small feature cache of two photos."""
    w = tmp_path_factory.mktemp("kinds")
    shutil.copytree(default_model_dir(), w / "model")
    photos = w / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(kauai_jpeg())
    (photos / "b.jpg").write_bytes(jpeg_bytes())
    (w / "photos.csv").write_text("image,lat,lon\na.jpg,21.9,-159.5\nb.jpg,48.8,2.3\n")
    assert (
        main(
            [
                "features",
                "--data.csv",
                str(w / "photos.csv"),
                "--data.images",
                str(photos),
                "--out",
                str(w / "features"),
            ]
        )
        == 0
    )
    return {
        "model": w / "model",
        "index": w / "model" / "index",
        "features": w / "features",
        "csv": w / "photos.csv",
        "photos": photos,
    }


KIND_CLASHES = {
    "index_into_a_feature_cache": (
        ["index", "--model", "{model}", "--features", "{features}", "--out", "{features}"],
        "feature cache",
    ),
    "features_into_a_model": (
        ["features", "--data.csv", "{csv}", "--data.images", "{photos}", "--out", "{model}"],
        "model",
    ),
    "features_into_an_index": (
        ["features", "--data.csv", "{csv}", "--data.images", "{photos}", "--out", "{index}"],
        "index",
    ),
    "evaluate_into_a_model": (
        ["evaluate", "--data.csv", "{csv}", "--data.images", "{photos}", "--out", "{model}"],
        "model",
    ),
    "shards_into_a_feature_cache": (
        ["shards", "--data.csv", "{csv}", "--data.images", "{photos}", "--out", "{features}"],
        "feature cache",
    ),
    "train_into_an_index": (
        ["train", "--features", "{features}", "--cells", "{model}/cells.csv", "--out", "{index}"],
        "index",
    ),
    "cells_over_a_models_table": (["cells", "--coords", "{csv}", "--out", "{model}/cells.csv"], "model"),
    "cells_named_json": (["cells", "--coords", "{csv}", "--out", "{tmp}/cells.json"], ".csv"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KIND_CLASHES))
def test_no_command_writes_into_another_kind_of_artifact(
    kind: str, artifacts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, other = KIND_CLASHES[kind]
    subs = {k: str(v) for k, v in artifacts.items()} | {"tmp": str(tmp_path)}
    before = {p: p.read_bytes() for p in artifacts["model"].rglob("*") if p.is_file()}
    before |= {p: p.read_bytes() for p in artifacts["features"].rglob("*") if p.is_file()}
    rc, _, err = run_cli([a.format(**subs) for a in argv], capsys)
    one_error_line(rc, err, argv[0], other)
    after = {
        p: p.read_bytes() for p in [*artifacts["model"].rglob("*"), *artifacts["features"].rglob("*")] if p.is_file()
    }
    assert after == before


# -- 8. rows skipped from a list fail the run -----------------------------------------------------------------


def test_locate_csv_rows_that_name_no_photo_fail_the_run(
    artifacts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listing = tmp_path / "list.csv"
    rows = ["a.jpg", "", '"two\nlines.jpg"', "missing.jpg", "../photos/b.jpg", str(artifacts["photos"] / "b.jpg")]
    listing.write_text("image\n" + "\n".join(rows) + "\n")
    out = tmp_path / "pred.jsonl"
    rc, stdout, err = run_cli(
        ["locate", "--data.csv", listing, "--data.images", artifacts["photos"], "--output", out], capsys
    )
    assert rc == 1, err
    assert "1 photo located, 5 failed" in stdout
    assert "line 3: empty image name" in err and "lines.jpg (line 4): image file not found" in err
    assert "missing.jpg (line 6): image file not found" in err  # the file's line: the quoted name spans two
    assert "../photos/b.jpg (line 7): outside the image folder" in err and "(line 8): outside" in err
    assert [json.loads(line)["image"] for line in out.read_text().splitlines()] == ["a.jpg"]


# -- 9. Python API inputs -----------------------------------------------------------------------------------


def test_api_inputs_that_are_not_photos(geo: Geolocator, tmp_path: Path) -> None:
    assert [type(r) for r in geo.locate_batch(p for p in [KAUAI, KAUAI])] == [Prediction, Prediction]
    assert [r.image for r in geo.locate_batch(str(KAUAI))] == [str(KAUAI)]  # one path, not its characters
    closed_file = open(KAUAI, "rb")  # noqa: SIM115
    closed_file.close()
    closed_image = Image.open(KAUAI)
    closed_image.close()
    with open(KAUAI, encoding="latin-1") as text_file:
        cases = {
            "closed file": (closed_file, "cannot be read"),
            "closed image": (closed_image, "closed"),
            "text-mode file": (text_file, "mode 'rb'"),
            "a number": (42, "not a path"),
        }
        for what, (source, needle) in cases.items():
            with pytest.raises(ImageError, match=needle):
                geo.locate(source)
            (failure,) = list(geo.locate_batch([source]))
            assert isinstance(failure, LocateFailure) and needle in failure.error, what


CONFIG_DAMAGE = {
    "a_string_for_a_number": lambda c: c["config"]["heads"].update(mvmf_dropout="abc"),
    "a_list_for_a_section": lambda c: c["config"].update(search=[1, 2]),
    "a_negative_width": lambda c: c["config"]["backbone"].update(feature_dim=-1),
    "a_width_beyond_64_bits": lambda c: c["config"]["backbone"].update(feature_dim=2**70),
    "an_unknown_backbone": lambda c: c["config"]["backbone"].update(name="resnet-9000"),
    "a_weights_path": lambda c: c["config"]["backbone"].update(weights="/etc/hostname"),
    "nan_radius": lambda c: c["config"]["search"].update(r_km=float("nan")),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", [*CONFIG_DAMAGE, "nested_100k_deep"])
def test_a_damaged_model_config_is_exit_2_not_a_bug(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    shutil.copytree(default_model_dir(), model, ignore=shutil.ignore_patterns("index"))
    if kind == "nested_100k_deep":
        (model / "config.json").write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    else:
        config = json.loads((model / "config.json").read_text())
        CONFIG_DAMAGE[kind](config)
        (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError):
        Geolocator.load(model)
    rc, _, err = run_cli(["locate", KAUAI, "--model", model], capsys)
    one_error_line(rc, err, "locate", "model")


# -- 10. the smaller things ------------------------------------------------------------------------------------


def test_docs_page_works_offline(geo: Geolocator) -> None:
    from fastapi.testclient import TestClient

    from geoswc.service.app import create_app

    client = TestClient(create_app(geo, ServiceSettings(warmup=False)))
    page = client.get("/docs")
    assert page.status_code == 200 and "swagger" in page.text.lower()
    assert "http://" not in page.text and "https://" not in page.text, "the page must load nothing from the web"
    assets = [a for a in page.text.replace("'", '"').split('"') if a.startswith("/static/")]
    assert len(assets) >= 2 and all(client.get(a).status_code == 200 for a in assets), assets
    assert client.get("/openapi.json").json()["paths"]


def test_a_request_of_too_many_pixels_is_413(geo: Geolocator) -> None:
    from fastapi.testclient import TestClient

    from geoswc.service.app import create_app

    client = TestClient(create_app(geo, ServiceSettings(warmup=False, max_pixels=300_000, max_request_pixels=400_000)))
    photo = kauai_jpeg()  # 512 x 504 = 258k pixels: one fits, two do not
    one = client.post("/api/locate", files=[("files", ("a.jpg", photo, "image/jpeg"))])
    two = client.post("/api/locate", files=[("files", (f"{i}.jpg", photo, "image/jpeg")) for i in range(2)])
    assert one.status_code == 200 and two.status_code == 413 and "MP" in two.json()["error"]


def test_a_run_where_every_photo_fails_keeps_the_earlier_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pred.jsonl"
    out.write_text("earlier results\n")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    rc, _, err = run_cli(["locate", tmp_path / "broken.jpg", "--output", out], capsys)
    assert rc == 1 and "left as it was" in err
    assert out.read_text() == "earlier results\n"


def test_an_output_that_is_a_symlink_stays_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target, link = tmp_path / "real.csv", tmp_path / "link.csv"
    target.write_text("old\n")
    link.symlink_to(target)
    rc, _, _ = run_cli(["locate", KAUAI, "--output", link], capsys)
    assert rc == 0 and link.is_symlink() and "kauai.png" in target.read_text()


def test_what_a_killed_run_left_is_cleaned_by_the_next(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale_file = tmp_path / f".pred.csv.{pid}.abc.tmp"
    stale_file.write_bytes(b"x" * 1000)
    alive = tmp_path / f".pred.csv.{os.getpid()}.abc.tmp"  # a running process's: kept
    alive.write_bytes(b"y")
    rc, _, _ = run_cli(["locate", KAUAI, "--output", tmp_path / "pred.csv"], capsys)
    assert rc == 0 and not stale_file.exists() and alive.exists()

    from geoswc.gallery.files import GalleryWriter

    index = tmp_path / "index"
    index.mkdir()
    staging = index / f".staging.{pid}.xyz"
    staging.mkdir()
    (staging / "embeddings.bin").write_bytes(b"\0" * 10_000)
    model = Geolocator.load().model
    GalleryWriter(index, 8, model.gallery_identity).abort()
    assert not staging.exists()


@pytest.mark.slow
def test_warnings_do_not_leak_around_the_one_line(tmp_path: Path) -> None:
    """A photo whose EXIF block points past its end makes Pillow warn ("Tag data larger than file"); stderr
    holds geoswc's own lines only: one per failed photo and the summary, no library warning, no progress bar."""
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    exif = bytearray(gps_exif_raw(((1, 1),) * 3, ((1, 1),) * 3))
    del exif[20:40]
    (tmp_path / "odd_exif.jpg").write_bytes(kauai_jpeg(exif=bytes(exif)))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "geoswc",
            "locate",
            str(tmp_path / "odd_exif.jpg"),
            str(tmp_path / "bad.jpg"),
            "--format",
            "jsonl",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 2 and "bad.jpg" in lines[0] and "1 of 2 photos could not be located" in lines[1], lines
    assert all(ln.startswith("WARNING geoswc.workflow: ") for ln in lines), lines
    assert len(proc.stdout.splitlines()) == 2


def test_evidence_never_counts_noise(geo: Geolocator) -> None:
    """With min_samples above 1, DBSCAN calls scattered neighbours noise (-1): they agree with nothing."""
    pred = geo.locate(KAUAI)
    noisy = dataclasses.replace(
        pred, cluster=-1, neighbors=[dataclasses.replace(n, cluster=-1) for n in pred.neighbors]
    )
    assert noisy.agreeing == [] and pred.agreeing
    assert all(n.cluster == pred.cluster for n in pred.agreeing)
    assert isinstance(pred.neighbors[0], Neighbor) and not math.isnan(pred.confidence)


def test_no_hostile_test_left_files_in_the_repository() -> None:
    assert not list(ROOT.glob("ran")) and not (ROOT / "pipe:touch ran").exists()


@pytest.fixture(autouse=True)
def _no_cwd_side_effects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)  # a command that ran a shell would leave "ran" here
    yield
    assert not (tmp_path / "ran").exists()
