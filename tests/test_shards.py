"""WebDataset shards: CSV + photos -> shards -> the same records, bytes and features; bad members are
reported and skipped."""

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from geoswc.cli import main
from geoswc.core.errors import InputError
from geoswc.data.records import LoadReport, read_photo_csv
from geoswc.data.shards import SHARD_NAME, iter_samples, resolve_shards, write_shards
from geoswc.models.backbone import default_config
from geoswc.training.features import Extraction, Extractor, FeatureSet, extract_features, extract_shard_features

from .conftest import DEV_IMAGES, dev_rows, jpeg_bytes, write_csv


@pytest.fixture(scope="module")
def dev_records(tmp_path_factory):
    """Seven real dev photos (read in place, never copied) and their CSV."""
    w = tmp_path_factory.mktemp("shards")
    csv_path = write_csv(w / "dev.csv", dev_rows(7, step=97))
    records, _ = read_photo_csv(csv_path, DEV_IMAGES)
    assert len(records) == 7
    return w, csv_path, records


@pytest.mark.shared_data
def test_round_trip_records_and_bytes(dev_records, tmp_path):
    _, _, records = dev_records
    paths, report = write_shards(records, tmp_path / "s", samples_per_shard=3, progress=False)
    assert [p.name for p in paths] == [SHARD_NAME % i for i in range(3)] and not report.skipped
    index = json.loads((tmp_path / "s" / "shards.json").read_text())
    assert [s["nsamples"] for s in index["shardlist"]] == [3, 3, 1]
    assert not list((tmp_path / "s").glob(".*.tmp"))  # temp files renamed away
    with tarfile.open(paths[0]) as tf:  # standard WebDataset naming: KEY.ext, one .json per sample
        assert tf.getnames()[:2] == ["000000000.jpg", "000000000.json"]
        members = tf.getmembers()
    assert not any(m.pax_headers for m in members)  # one 512-byte header per member, nothing more
    data_blocks = sum(512 + -(-m.size // 512) * 512 for m in members)
    assert data_blocks + 1024 <= paths[0].stat().st_size < data_blocks + 1024 + tarfile.RECORDSIZE
    back = list(iter_samples(tmp_path / "s"))
    assert [(s.image, s.lat, s.lon, s.author) for s in back] == [(r.image, r.lat, r.lon, r.author) for r in records]
    assert all(s.data == r.path.read_bytes() for s, r in zip(back, records, strict=True))
    # the same shard list through a folder, a glob and a brace pattern
    s = tmp_path / "s"
    braces = f"{s}/shard-{{000000..000002}}.tar"
    assert resolve_shards(s) == resolve_shards(f"{s}/shard-*.tar") == resolve_shards(braces)
    with pytest.raises(InputError, match="already holds shards"):
        write_shards(records, s, progress=False)


def test_shard_lists_never_run_commands_or_fetch(tmp_path):
    """Shards are local files: a URL or a ``pipe:`` command in a spec or in shards.json is refused."""
    for spec in ("pipe:touch /tmp/geoswc-pwned", "http://example.org/shard-{000..009}.tar", "s3://bucket/x.tar"):
        with pytest.raises(InputError, match="local files"):
            resolve_shards(spec)
    for url in ("../outside.tar", "/etc/passwd"):
        (tmp_path / "shards.json").write_text(json.dumps({"shardlist": [{"url": url, "nsamples": 1}]}))
        with pytest.raises(InputError, match="not a file name inside"):
            resolve_shards(tmp_path)
    # a listed name that looks like a command is only ever a file name inside the folder: opened, never run
    (tmp_path / "shards.json").write_text(json.dumps({"shardlist": [{"url": "pipe:touch ran", "nsamples": 1}]}))
    (url,) = resolve_shards(tmp_path)
    assert url == str(tmp_path / "pipe:touch ran")
    report = LoadReport("t")
    assert list(iter_samples(tmp_path, report)) == [] and "unreadable" in report.skipped[0][1]
    assert not (tmp_path / "ran").exists() and not Path("ran").exists()


def test_cli_reports_bad_rows_and_images(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "good.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "img" / "broken.jpg").write_bytes(jpeg_bytes()[:300])  # truncated JPEG
    csv_path = tmp_path / "x.csv"
    csv_path.write_text("image,lat,lon,author\ngood.jpg,10,20,a\nbroken.jpg,1,2,b\nmissing.jpg,1,2,c\nbad.jpg,95,0,d\n")
    assert (
        main(
            [
                "shards",
                "--data.csv",
                str(csv_path),
                "--data.images",
                str(tmp_path / "img"),
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "1 photos in 1 shards" in out and "1 skipped" in out  # the CSV reader skipped the other two
    meta = json.loads((tmp_path / "s" / "shards.json").read_text())["geoswc"]
    assert meta["skipped"][0]["image"] == "broken.jpg" and "truncated" in meta["skipped"][0]["reason"].lower()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def _meta(lat=1.0, lon=2.0, image=None) -> bytes:
    return json.dumps({"lat": lat, "lon": lon, "author": "x", **({"image": image} if image else {})}).encode()


def test_corrupt_members_and_truncated_shard_are_reported_and_skipped(tmp_path):
    with tarfile.open(tmp_path / "shard-000000.tar", "w") as tf:
        _add(tf, "a.jpg", jpeg_bytes())
        _add(tf, "a.json", _meta(image="a.jpg"))
        _add(tf, "b.jpg", b"\xff\xd8\xff\xe0 not a jpeg")  # corrupt image
        _add(tf, "b.json", _meta(image="b.jpg"))
        _add(tf, "c.jpg", jpeg_bytes())
        _add(tf, "c.json", b"{not json")  # corrupt metadata
        _add(tf, "d.jpg", jpeg_bytes())  # no .json at all
        _add(tf, "e.png", jpeg_bytes())
        _add(tf, "e.json", _meta(lat=95))  # latitude out of range
        _add(tf, "f.jpg", jpeg_bytes(color=(10, 200, 30)))
        _add(tf, "f.json", _meta(-33.9, 151.2))  # no image id: KEY.ext
    good = (tmp_path / "shard-000000.tar").read_bytes()
    (tmp_path / "shard-000001.tar").write_bytes(good[:2000])  # truncated mid-member
    report = LoadReport("test")
    samples = list(iter_samples(tmp_path, report))
    assert [s.image for s in samples] == ["a.jpg", "b.jpg", "f.jpg", "a.jpg"][: len(samples)]
    reasons = " | ".join(r for _, r in report.skipped)
    assert "bad .json" in reasons and "no .json member" in reasons and "outside ±90" in reasons
    assert "truncated" in reasons

    ex = Extractor.from_config(default_config("efficientnet-lite0", 64))
    fs, rep = extract_shard_features(ex, tmp_path / "shard-000000.tar", Extraction(progress=False))
    assert fs.names == ["a.jpg", "f.jpg"] and fs.lat.tolist() == [1.0, -33.9]
    text = rep.summary(first=10)
    assert "b.jpg" in text and "corrupt" in text and "c.json" not in text and rep.kept == 2


@pytest.mark.shared_data
def test_features_from_shards_equal_features_from_folder(dev_records, tmp_path, capsys):
    w, csv_path, records = dev_records
    write_shards(records, tmp_path / "s", samples_per_shard=3, progress=False)
    ex = Extractor.from_config(default_config("efficientnet-lite0", 64))
    folder, _ = extract_features(ex, records, Extraction(views=2, batch_size=4, progress=False))
    # two DataLoader workers read the three shards; the features still come out in CSV order
    shards, _ = extract_shard_features(ex, tmp_path / "s", Extraction(views=2, batch_size=4, workers=2, progress=False))
    assert shards.names == folder.names and shards.authors == folder.authors
    assert (shards.lat == folder.lat).all() and (shards.lon == folder.lon).all()
    assert shards.features.shape == (7, 2, 1280)
    assert torch.allclose(shards.features, folder.features, atol=1e-5)  # augmented views included
    # the CLI flag
    assert (
        main(
            [
                "features",
                "--data.shards",
                str(tmp_path / "s"),
                "--out",
                str(tmp_path / "f"),
                "--backbone.image_size",
                "64",
                "--views",
                "2",
                "--run.batch_size",
                "4",
            ]
        )
        == 0
    )
    assert "features of 7 photos (2 view(s), 1280-d)" in capsys.readouterr().out
    cached = FeatureSet.load(tmp_path / "f")
    assert cached.names == folder.names
    assert torch.allclose(cached.features.float(), folder.features.half().float(), rtol=1e-3, atol=1e-4)  # float16


def test_photo_shards_read_files_as_shards_do_and_refuse_pipes_without_blocking(tmp_path: Path) -> None:
    """A photo list read as shards: keys are row numbers; a pipe, a folder or a missing file is one refused sample
    (a pipe is never opened: reading it would block), and the rest are read."""
    import os

    from geoswc.data.records import Record
    from geoswc.data.shards import ShardSample, iter_photos, photo_shards

    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg_bytes((40, 30)))
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "folder.jpg").mkdir()
    names = ["good.jpg", "pipe.jpg", "folder.jpg", "missing.jpg", "good.jpg"]
    records = [Record(n, tmp_path / n, 1.0, 2.0, "") for n in names]
    shards = photo_shards(records, parts=2)
    assert [s.first for s in shards] == [0, 3] and sum(len(s.records) for s in shards) == 5
    got = [x for o, s in enumerate(shards) for x in iter_photos(s, o)]
    assert [isinstance(x, ShardSample) for x in got] == [True, False, False, False, True]
    assert "not a regular file" in got[1].reason and "directory" in got[2].reason
    assert [x.key for x in got if isinstance(x, ShardSample)] == ["000000000", "000000004"]
    assert got[0].data == good.read_bytes() and got[0].path == good
