"""The web service (FastAPI TestClient) on the shipped default model: every endpoint, the page, the limits,
the token, overload, and every kind of bad upload (built here with Pillow)."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from geoswc.core.errors import InputError
from geoswc.core.sphere import haversine_km
from geoswc.geo.places import Place
from geoswc.prediction.geolocator import Geolocator
from geoswc.prediction.results import CellProbability, ExifPosition, Neighbor, Prediction

from .conftest import KAUAI, gps_exif, kauai_jpeg

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from geoswc.service import app as service_app  # noqa: E402
from geoswc.service.app import create_app  # noqa: E402
from geoswc.service.schemas import (  # noqa: E402
    CellModel,
    ExifModel,
    NeighborModel,
    PlaceModel,
    PredictionModel,
)
from geoswc.service.settings import ServiceSettings  # noqa: E402

ERROR_KEYS = {"error", "kind", "status", "image"}


# -- images built for the tests -------------------------------------------------------------------------


def _kauai() -> Image.Image:
    return Image.open(KAUAI).convert("RGB")


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header (with a correct CRC) claims ``width x height``: a decompression bomb."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def exif_rotated_png() -> tuple[bytes, bytes]:
    """(Kauai stored sideways with EXIF orientation 6 = "rotate 90° clockwise to view", Kauai upright)."""
    upright = _kauai()
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise; orientation 6 undoes it
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(sideways, "PNG", exif=exif.tobytes()), encode(upright, "PNG")


def animated_gif() -> bytes:
    frames = [_kauai().resize((128, 126)), Image.new("RGB", (128, 126), (200, 30, 30))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def palette_png_with_transparency() -> bytes:
    img = _kauai().convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return encode(img, "PNG", transparency=0)


def rgba_png() -> bytes:
    img = _kauai().convert("RGBA")
    alpha = np.full((img.height, img.width), 255, np.uint8)
    alpha[:, : img.width // 3] = 0
    img.putalpha(Image.fromarray(alpha))
    return encode(img, "PNG")


def png16() -> bytes:
    grey = np.asarray(_kauai().convert("L"), np.uint16) * 257
    img = Image.fromarray(grey.astype(np.uint16))
    assert img.mode.startswith("I;16")
    return encode(img, "PNG")


def noise_png(side: int) -> bytes:
    rng = np.random.default_rng(1)
    return encode(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)), "PNG")


# -- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def geo() -> Geolocator:
    return Geolocator.load()


@pytest.fixture(scope="module")
def client(geo: Geolocator) -> Iterator[TestClient]:
    with TestClient(create_app(geo, ServiceSettings(warmup=True))) as c:  # lifespan: gate + warm-up
        yield c


def post(client: TestClient, *files: tuple[str, bytes], **kw: Any):
    return client.post(
        "/api/locate", files=[("files", (name, data, "application/octet-stream")) for name, data in files], **kw
    )


def assert_error(r, status: int, kind: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == ERROR_KEYS and body["status"] == status and body["error"]
    if kind is not None:
        assert body["kind"] == kind, body
    return body


def close(a: Any, b: Any, tol: float = 1e-6) -> bool:
    """Nested JSON equality with a float tolerance."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(a)))
    return a == b


# -- endpoints -------------------------------------------------------------------------------------------


def test_health(client: TestClient, geo: Geolocator) -> None:
    r = client.get("/api/health")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["model_fingerprint"] == geo.fingerprint
    assert h["gallery_size"] == len(geo.gallery) > 0
    assert h["cells"] == len(geo.model.cells) and "swc" in h["methods"]


def test_locate_kauai_matches_cli_json(client: TestClient, capsys: pytest.CaptureFixture[str]) -> None:
    r = post(client, ("kauai.png", KAUAI.read_bytes()))
    assert r.status_code == 200, r.text
    (p,) = r.json()
    assert p["image"] == "kauai.png" and p["method"] == "swc"
    assert -90 <= p["lat"] <= 90 and -180 <= p["lon"] <= 180 and 0 <= p["confidence"] <= 1
    assert len(p["top_cells"]) == 5 and all(len(c["polygon"]) >= 4 for c in p["top_cells"])
    probs = [c["probability"] for c in p["top_cells"]]
    assert probs == sorted(probs, reverse=True)
    assert p["neighbors"] and {"image", "lat", "lon", "similarity", "cluster", "row", "thumbnail"} == set(
        p["neighbors"][0]
    )
    assert not any(n["thumbnail"] for n in p["neighbors"]), "the embedded default ships no thumbnails"
    assert p["place"]["name"] and p["place"]["country"] and p["exif"] is None
    # the embedded model ships a calibrator: calibrated chances, monotone, and the localizable mark
    assert list(p["within_km"]) == ["1", "25", "200", "750", "2500"] and isinstance(p["localizable"], bool)
    assert list(p["within_km"].values()) == sorted(p["within_km"].values())
    rule = client.get("/config.json").json()["localizable_rule"]
    assert p["localizable"] == (p["within_km"][str(int(rule["within_km"]))] >= rule["p"])

    from geoswc.cli import main

    assert main(["locate", "--format", "jsonl", str(KAUAI)]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli["image"] == str(KAUAI)
    cli["image"] = p["image"]
    assert close(cli, p), "the API must return the JSON of `geoswc locate --format jsonl`"


def test_exif_gps_and_several_photos_in_order(client: TestClient) -> None:
    lat, lon = 22.0964, -159.5261
    r = post(
        client,
        ("a.png", KAUAI.read_bytes()),
        ("notes.txt", b"not a photo\n" * 20),
        ("gps.jpg", kauai_jpeg(exif=gps_exif(lat, lon))),
    )
    assert r.status_code == 200, r.text
    a, bad, g = r.json()
    assert a["image"] == "a.png" and a["exif"] is None
    assert bad == {"image": "notes.txt", "error": bad["error"], "kind": "unsupported", "status": 415}
    assert "notes.txt" in bad["error"]
    assert g["exif"]["lat"] == pytest.approx(lat, abs=1e-5) and g["exif"]["lon"] == pytest.approx(lon, abs=1e-5)
    assert g["exif"]["distance_km"] == pytest.approx(float(haversine_km(g["lat"], g["lon"], lat, lon)), rel=1e-6)


def test_methods(client: TestClient) -> None:
    r = client.post("/api/locate?method=classification", files={"files": ("k.png", KAUAI.read_bytes())})
    assert r.status_code == 200
    (p,) = r.json()
    assert p["method"] == "classification" and p["neighbors"] == [] and p["cluster"] == -1
    assert client.post("/api/locate?method=nope", files={"files": ("k.png", b"x")}).status_code == 422


def test_openapi_schema_is_typed(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name in (
        "PredictionModel",
        "FailureModel",
        "CellModel",
        "NeighborModel",
        "PlaceModel",
        "ExifModel",
        "ErrorModel",
        "HealthModel",
        "PageConfigModel",
    ):
        assert name in schemas, name
    loc = spec["paths"]["/api/locate"]["post"]
    body = loc["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["files"]["items"]["format"] == "binary"
    ok = json.dumps(loc["responses"]["200"])
    assert "#/components/schemas/PredictionModel" in ok and "#/components/schemas/FailureModel" in ok
    for code in ("401", "413", "415", "422", "503"):
        assert "ErrorModel" in json.dumps(loc["responses"][code]), code
    health = json.dumps(spec["paths"]["/api/health"]["get"]["responses"]["200"])
    assert "#/components/schemas/HealthModel" in health
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


@pytest.mark.parametrize(
    ("model", "dc"),
    [
        (PredictionModel, Prediction),
        (CellModel, CellProbability),
        (NeighborModel, Neighbor),
        (PlaceModel, Place),
        (ExifModel, ExifPosition),
    ],
)
def test_response_models_mirror_the_dataclasses(model: Any, dc: Any) -> None:
    assert list(model.model_fields) == [f.name for f in dataclasses.fields(dc)]


def test_page_and_static_assets_are_local(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    assert 'id="file"' in html and 'id="map"' in html
    assert 'src="http' not in html and 'href="http' not in html, "the page must not load anything from the internet"
    for path in (
        "static/app.js",
        "static/style.css",
        "static/vendor/leaflet/leaflet.js",
        "static/vendor/leaflet/leaflet.css",
        "static/vendor/leaflet/images/marker-icon.png",
        "static/vendor/topojson-client/topojson-client.min.js",
        "static/vendor/world-atlas/countries-50m.json",
        "static/vendor/leaflet/LICENSE",
        "static/vendor/world-atlas/LICENSE",
        "static/vendor/topojson-client/LICENSE",
    ):
        assert client.get("/" + path).status_code == 200, path
    cfg = client.get("/config.json").json()
    assert cfg["auth_required"] is False and cfg["tiles"] is None
    assert cfg["limits"]["max_files"] == ServiceSettings().max_files


# -- bad and odd inputs ----------------------------------------------------------------------------------

_JPEG = kauai_jpeg()
_rng = np.random.default_rng(0)
BAD_INPUTS: dict[str, tuple[bytes, int, str]] = {
    "empty": (b"", 422, "empty"),
    "text": (b"just some text, not a picture\n" * 30, 415, "unsupported"),
    "html": (b"<!doctype html><html><body>hi</body></html>", 415, "unsupported"),
    "truncated_jpeg": (_JPEG[: len(_JPEG) // 2], 422, "corrupt"),
    "truncated_jpeg_header": (_JPEG[:300], 422, "corrupt"),
    "corrupt_jpeg": (
        _JPEG[: len(_JPEG) // 3] + _rng.bytes(len(_JPEG) // 3) + _JPEG[2 * len(_JPEG) // 3 :],
        422,
        "corrupt",
    ),
    "bomb_header_30000x30000": (png_claiming_size(30_000, 30_000), 413, "too_large"),
    "bomb_header_8000x8000": (png_claiming_size(8_000, 8_000), 413, "too_large"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_clear_4xx(client: TestClient, case: str) -> None:
    data, status, kind = BAD_INPUTS[case]
    body = assert_error(post(client, (f"{case}.jpg", data)), status, kind)
    assert body["image"] == f"{case}.jpg" and f"{case}.jpg" in body["error"]
    assert client.get("/api/health").status_code == 200


ODD_IMAGES = {
    "cmyk.jpg": lambda: encode(_kauai().convert("CMYK"), "JPEG", quality=90),
    "gray16.png": png16,
    "palette_transparent.png": palette_png_with_transparency,
    "alpha.png": rgba_png,
    "grey.jpg": lambda: encode(_kauai().convert("L"), "JPEG"),
    "animated.gif": animated_gif,
    "photo.webp": lambda: encode(_kauai(), "WEBP"),
    "photo.tiff": lambda: encode(_kauai(), "TIFF"),
    "photo.bmp": lambda: encode(_kauai(), "BMP"),
}


def test_odd_but_valid_images_are_located(client: TestClient) -> None:
    r = post(client, *[(name, make()) for name, make in ODD_IMAGES.items()])
    assert r.status_code == 200, r.text
    results = r.json()
    assert [p["image"] for p in results] == list(ODD_IMAGES)
    for p in results:
        assert "error" not in p, p
        assert -90 <= p["lat"] <= 90 and p["top_cells"]


def test_heic_is_accepted(client: TestClient) -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    r = post(client, ("photo.heic", encode(_kauai(), "HEIF")))
    assert r.status_code == 200, r.text


def test_exif_rotation_is_applied(client: TestClient) -> None:
    rotated, upright = exif_rotated_png()
    r = post(
        client,
        ("rotated.png", rotated),
        ("upright.png", upright),
        ("sideways.png", encode(_kauai().transpose(Image.Transpose.ROTATE_90), "PNG")),
    )
    assert r.status_code == 200, r.text
    rot, up, side = r.json()
    rot["image"] = up["image"]
    assert close(rot, up), "an EXIF-rotated photo must be located as if upright"
    assert [c["probability"] for c in side["top_cells"]] != pytest.approx([c["probability"] for c in up["top_cells"]])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, len(_JPEG)), junk=st.binary(max_size=64), raw=st.booleans())
def test_mangled_uploads_never_500(client: TestClient, cut: int, junk: bytes, raw: bool) -> None:
    data = junk if raw else _JPEG[:cut] + junk + _JPEG[cut + len(junk) :]
    r = post(client, ("fuzz.jpg", data))
    assert r.status_code in (200, 413, 415, 422), r.text
    if r.status_code != 200:
        assert_error(r, r.status_code)


# -- request-level errors and limits -------------------------------------------------------------------


def test_request_errors(client: TestClient) -> None:
    assert_error(client.post("/api/locate", json={"files": []}), 415, "unsupported")
    assert_error(client.post("/api/locate", data={"other": "x"}, files={"x": ("a.txt", b"a")}), 422, "no_files")
    assert_error(
        client.post(
            "/api/locate", content=b"--b\r\nnot multipart", headers={"content-type": "multipart/form-data; boundary=b"}
        ),
        400,
    )
    too_many = [(f"{i}.jpg", b"x") for i in range(ServiceSettings().max_files + 1)]
    assert_error(post(client, *too_many), 413, "too_many_files")


def test_limits_flags(geo: Geolocator) -> None:
    s = ServiceSettings(max_upload_mb=300_000 / 2**20, max_pixels=200_000, max_files=2, warmup=False)
    c = TestClient(create_app(geo, s))
    body = assert_error(post(c, ("big.png", noise_png(400))), 413, "too_large")  # ~480 kB > 300 kB
    assert "big.png" in body["error"]
    assert_error(post(c, ("kauai.png", KAUAI.read_bytes())), 413, "too_large")  # 512 x 504 > 200k pixels
    assert_error(post(c, *[("a.jpg", b"a")] * 3), 413, "too_many_files")
    assert post(c, ("small.png", encode(_kauai().resize((300, 300)), "PNG"))).status_code == 200
    assert geo.limits.max_pixels != 200_000, "create_app must not change the caller's Geolocator"


def test_settings_from_env_and_flags() -> None:
    env = {
        "GEOSWC_MAX_UPLOAD_MB": "5",
        "GEOSWC_MAX_PIXELS": "1000000",
        "GEOSWC_MAX_FILES": "3",
        "GEOSWC_MAX_CONCURRENT": "4",
        "GEOSWC_MAX_QUEUE": "0",
        "GEOSWC_QUEUE_TIMEOUT": "2.5",
        "GEOSWC_TOKEN": "t0k",
        "GEOSWC_TILES": "https://{s}.tiles.example.org/{z}/{x}/{y}.png",
    }
    s = ServiceSettings.from_env(env, max_files=7, token=None)
    assert (s.max_upload_bytes, s.max_pixels, s.max_files, s.max_concurrent, s.max_queue, s.queue_timeout_s) == (
        5 * 2**20,
        1_000_000,
        7,
        4,
        0,
        2.5,
    )
    assert s.token == "t0k" and s.tiles and s.image_limits.max_bytes == 5 * 2**20
    with pytest.raises(InputError, match="GEOSWC_MAX_FILES"):
        ServiceSettings.from_env({"GEOSWC_MAX_FILES": "many"})
    with pytest.raises(InputError):
        ServiceSettings(max_concurrent=0)
    with pytest.raises(InputError):
        ServiceSettings(tiles="file:///etc/passwd")


def test_every_setting_but_warmup_has_its_environment_variable() -> None:
    """The variables come from the settings' own declaration: each field (but ``warmup``) is read from one."""
    from geoswc.service.settings import ENV_VARS

    names = {f.name for f in dataclasses.fields(ServiceSettings)} - {"warmup"}
    assert sorted(name for name, _ in ENV_VARS.values()) == sorted(names)
    for var, (name, parse) in ENV_VARS.items():
        default = getattr(ServiceSettings(), name)
        value = "https://a.example.org/{z}/{x}/{y}.png" if name == "tiles" else str(parse(default or 1) * 2)
        assert getattr(ServiceSettings.from_env({var: value}), name) == parse(value), var


def test_serve_command_wiring(
    monkeypatch: pytest.MonkeyPatch, geo: Geolocator, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvicorn

    from geoswc.cli import main

    seen: dict[str, Any] = {}
    monkeypatch.setattr(Geolocator, "load", classmethod(lambda cls, *a, **k: geo))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setenv("GEOSWC_MAX_FILES", "5")
    monkeypatch.setenv("GEOSWC_TOKEN", "env-token")
    assert main(["serve", "--port", "8123", "--service.max_upload_mb", "2", "--service.max_concurrent", "3"]) == 0
    s = seen["app"].state.settings
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    assert (s.max_files, s.max_upload_bytes, s.max_concurrent, s.token) == (5, 2 * 2**20, 3, "env-token")
    capsys.readouterr()
    with pytest.raises(SystemExit):  # the defaults: localhost, port 8000
        main(["serve", "--print_config"])
    defaults = yaml.safe_load(capsys.readouterr().out)
    assert (defaults["host"], defaults["port"], defaults["model"]) == ("127.0.0.1", 8000, None)


def test_bearer_token(geo: Geolocator) -> None:
    c = TestClient(create_app(geo, ServiceSettings(token="s3cret", warmup=False)))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        r = c.get("/api/health", headers=headers)
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error(post(c, ("k.png", KAUAI.read_bytes()), headers=headers), 401)
    ok = {"Authorization": "Bearer s3cret"}
    assert c.get("/api/health", headers=ok).status_code == 200
    assert post(c, ("k.png", KAUAI.read_bytes()), headers=ok).status_code == 200
    assert c.get("/").status_code == 200 and c.get("/config.json").json()["auth_required"] is True


def test_overload_gets_503_with_retry_after(geo: Geolocator, monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release = threading.Event(), threading.Event()
    real = service_app.locate_uploads

    def slow_locate(*args: Any) -> Any:
        entered.set()
        assert release.wait(30)
        return real(*args)

    monkeypatch.setattr(service_app, "locate_uploads", slow_locate)
    s = ServiceSettings(max_concurrent=1, max_queue=1, queue_timeout_s=0.3, warmup=False)
    with TestClient(create_app(geo, s)) as c:
        first: list[Any] = []
        t = threading.Thread(target=lambda: first.append(post(c, ("k.png", KAUAI.read_bytes()))))
        t.start()
        try:
            assert entered.wait(30)
            t0 = time.monotonic()
            queued = post(c, ("k.png", KAUAI.read_bytes()))  # admitted to the queue, no slot within 0.3 s
            assert time.monotonic() - t0 >= 0.25
            assert_error(queued, 503, "busy")
            assert int(queued.headers["retry-after"]) >= 1
            gate = c.app.state.gate  # type: ignore[attr-defined]
            gate.admitted += 1  # a second request waiting in the queue: the next one is refused at once
            try:
                refused = post(c, ("k.png", KAUAI.read_bytes()))
            finally:
                gate.admitted -= 1
            assert_error(refused, 503, "busy")
            assert int(refused.headers["retry-after"]) >= 1
        finally:
            release.set()
            t.join(30)
        assert first and first[0].status_code == 200
        assert post(c, ("k.png", KAUAI.read_bytes())).status_code == 200, "the server must keep serving"


def test_still_serving_after_everything(client: TestClient) -> None:
    assert client.get("/api/health").status_code == 200
    assert post(client, ("kauai.png", KAUAI.read_bytes())).status_code == 200


def test_optional_tile_url_reaches_page_and_csp(geo: Geolocator) -> None:
    tiles = "https://{s}.tile.example.org/{z}/{x}/{y}.png"
    c = TestClient(create_app(geo, ServiceSettings(tiles=tiles, tiles_attribution="© Example", warmup=False)))
    cfg = c.get("/config.json").json()
    assert cfg["tiles"] == tiles and cfg["tiles_attribution"] == "© Example"
    assert "img-src 'self' data: blob: https://*.tile.example.org" in c.get("/").headers["content-security-policy"]
