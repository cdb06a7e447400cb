"""``stac.sign``: Planetary Computer's SAS tokens appended to the asset hrefs, against a fake
token endpoint (a tiny http.server in this file, :class:`FakeTokenEndpoint`, answering as
``/api/sas/v1/token/{collection}`` does) and the catalog's COGs served over http by the moto S3
server (which ignores the query string: the signed reads give the unsigned values, and no test
here can show Azure refusing an unsigned request). Shown: the URLs GDAL opens carry the token,
one token request per collection while it is valid and another once it is about to expire
(datasets kept open are then reopened with the new token), the retry contract of the endpoint
(5xx retried then 75, 4xx exit 2 naming ``stac.sign``), and no token in fingerprints,
descriptions or messages."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from rasterio.windows import Window

from sitsflow import sampling, storage
from sitsflow.config import load_config
from sitsflow.errors import BadInputError, ConfigError, TransientError
from sitsflow.features import FeaturePipeline
from sitsflow.sensors import signing
from stac_catalog import upload, write_catalog, write_config

pytestmark = pytest.mark.s3
TILE = "T31TCJ"
WINDOW = Window(7, 3, 20, 15)


class FakeTokenEndpoint:
    """A fake of Planetary Computer's token endpoint on 127.0.0.1: ``GET /{collection}`` answers
    ``{"token": ..., "msft:expiry": now + lifetime}`` with a new token each call (``sig=<n>``),
    or the statuses queued in ``fail`` first; ``calls`` counts the requests per collection."""

    def __init__(self, lifetime: dt.timedelta = dt.timedelta(hours=1)) -> None:
        self.lifetime = lifetime
        self.calls: dict[str, int] = {}
        self.fail: list[int] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                collection = self.path.rstrip("/").rsplit("/", 1)[-1]
                fake.calls[collection] = fake.calls.get(collection, 0) + 1
                if fake.fail:
                    self.send_response(fake.fail.pop(0))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                n = sum(fake.calls.values())
                expiry = (dt.datetime.now(dt.UTC) + fake.lifetime).strftime("%Y-%m-%dT%H:%M:%SZ")
                body = json.dumps({"token": f"st=2023&se=2099&sp=rl&sr=c&sig=fake{n}x", "msft:expiry": expiry})
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/sas/v1/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def _fresh_signers(monkeypatch):
    """Each test's registrations and tokens are its own."""
    monkeypatch.setattr(storage, "_SIGNERS", {})
    monkeypatch.setattr(storage, "_SECRETS", set())
    monkeypatch.setattr(signing, "_tokens", {})


@pytest.fixture
def endpoint():
    fake = FakeTokenEndpoint()
    yield fake
    fake.close()


@pytest.fixture
def http_catalog(tmp_path, s3_server, s3_bucket):
    """A local catalog whose asset hrefs are http URLs of the moto server (public COGs)."""
    url = upload(write_and_return(tmp_path / "up"), s3_bucket, public=s3_server)
    folder = tmp_path / "abs"
    info = write_catalog(folder, href_base=url.rsplit("/stac/", 1)[0])
    return folder, info


def write_and_return(folder: Path) -> Path:
    write_catalog(folder)
    return folder


def _pipe(folder: Path, sign: str = "", name: str = "stac.cfg") -> FeaturePipeline:
    path = write_config(folder, str(folder / "stac" / "catalog.json"), stac_extra=sign, name=name)
    return FeaturePipeline(load_config(str(path), []), TILE)


def _signed(url: str) -> str:
    return f"sign : 'planetary-computer'\n  sign_url : '{url}'"


def test_signed_urls_are_opened_and_read_the_unsigned_values(http_catalog, endpoint, monkeypatch):
    folder, _ = http_catalog
    plain = _pipe(folder)
    expected = plain.sensors[0].read(WINDOW, plain.grid)
    opened: list[str] = []
    real = storage.rasterio_path
    monkeypatch.setattr(storage, "rasterio_path", lambda uri: opened.append(real(uri)) or opened[-1])
    pipe = _pipe(folder, _signed(endpoint.url), "signed.cfg")
    sensor = pipe.sensors[0]
    got = sensor.read(WINDOW, pipe.grid)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)  # moto ignores the query: the same values
    assert opened and all(
        p.startswith("/vsicurl/http") and p.endswith("?st=2023&se=2099&sp=rl&sr=c&sig=fake1x") for p in opened
    )
    assert endpoint.calls == {"sentinel-2-l2a": 1}  # one token for the collection while valid
    # hrefs stay unsigned: items, input files (fingerprints), description
    files = sensor.input_files()
    assert all("?" not in f and "sig=" not in f for f in files)
    assert "sig=" not in json.dumps(pipe.description(), default=str)
    # an href that already has a query string gets '&'
    assert signing.signed("http://h/a.tif?x=1", "t=2") == "http://h/a.tif?x=1&t=2"


def _open_datasets(sensor) -> dict:
    """The datasets the acquisition threads keep open (remote files are read there, each date on
    its own thread: see sitsflow.sensors.base.per_acquisition)."""
    from sitsflow.sensors import base

    found: dict = {}

    def collect(t: int) -> None:
        files = getattr(sensor._open_files, "files", None)
        if files is not None:
            found.update(files.datasets)

    base.per_acquisition(len(sensor.groups), collect, True)
    return found


def test_a_token_about_to_expire_is_renewed_and_open_files_reopened(http_catalog, monkeypatch):
    folder, _ = http_catalog
    fake = FakeTokenEndpoint(lifetime=dt.timedelta(minutes=2))  # within the 5-minute margin: renewed at each use
    try:
        pipe = _pipe(folder, _signed(fake.url))
        sensor = pipe.sensors[0]
        first = sensor.read(WINDOW, pipe.grid)
        after_first = fake.calls["sentinel-2-l2a"]
        kept = _open_datasets(sensor)
        second = sensor.read(WINDOW, pipe.grid)
        assert fake.calls["sentinel-2-l2a"] > after_first  # a new token per use
        reopened = _open_datasets(sensor)
        last = f"sig=fake{fake.calls['sentinel-2-l2a']}x"
        assert any(d.name.endswith(last) for d in reopened.values())
        assert all(d.closed for u, d in kept.items() if reopened.get(u) is not d)
        for a, b in zip(first, second):
            np.testing.assert_array_equal(a, b)
        # renewal leaves the fingerprint alone: it is made of unsigned hrefs
        cfg = load_config(str(folder / "stac.cfg"), [])
        assert sampling.fingerprint(cfg) == sampling.fingerprint(cfg)
    finally:
        fake.close()
    # a long-lived token: one request however many uses
    fake = FakeTokenEndpoint()
    try:
        assert {signing.token(fake.url, "c") for _ in range(5)} == {"st=2023&se=2099&sp=rl&sr=c&sig=fake1x"}
        assert fake.calls == {"c": 1}
        signing.token(fake.url, "other")
        assert fake.calls == {"c": 1, "other": 1}  # per collection
    finally:
        fake.close()


def test_token_endpoint_errors(endpoint, monkeypatch):
    delays: list[float] = []
    monkeypatch.setattr(storage, "_sleep", delays.append)
    monkeypatch.setenv("SITSFLOW_STORAGE_RETRIES", "3")
    endpoint.fail = [503, 500]
    assert signing.token(endpoint.url, "s2", "stac[1]").endswith("sig=fake3x")  # retried
    assert len(delays) == 2
    endpoint.fail = [503, 503, 503]
    with pytest.raises(TransientError) as err:
        signing.token(endpoint.url, "s1", "stac")
    assert err.value.exit_code == 75
    endpoint.fail = [403]
    with pytest.raises(BadInputError, match=r"^stac\[1\]\.sign: the token endpoint refused collection 'l8'") as err:
        signing.token(endpoint.url, "l8", "stac[1]")
    assert err.value.exit_code == 2
    with pytest.raises(BadInputError, match=r"^stac\.sign: the asset http://h/a\.tif belongs to an item without"):
        signing.register({"http://h/a.tif": None}, endpoint.url)
    signing.register({"s3://b/a.tif": None, "/local/a.tif": None}, endpoint.url)  # only http(s) is signed
    assert storage._SIGNERS == {}
    endpoint.fail = [404]
    with pytest.raises(BadInputError, match=r"^stac\.sign: .*'nope'"):
        signing.token(endpoint.url, "nope")


def test_messages_show_the_href_without_its_token(http_catalog, endpoint):
    folder, _ = http_catalog
    item_json = next((folder / "stac").rglob("S2_d4_31TCJ.json"))
    doc = json.loads(item_json.read_text())
    doc["assets"]["B03"]["href"] = gone = doc["assets"]["B03"]["href"].replace("B03.tif", "gone.tif")
    item_json.write_text(json.dumps(doc))
    pipe = _pipe(folder, _signed(endpoint.url))
    with pytest.raises(BadInputError, match=r"no such file or object") as err:
        pipe.sensors[0].read(WINDOW, pipe.grid)
    assert gone in str(err.value) and "sig=" not in str(err.value) and err.value.exit_code == 2
    # GDAL's own texts (which name the path it opened) have the token replaced
    secret = signing.token(endpoint.url, "sentinel-2-l2a")
    failure = RuntimeError(f"'/vsicurl/http://h/B03.tif?{secret}' not recognized as a supported file format")
    assert (
        storage._gdal_text(failure) == "'/vsicurl/http://h/B03.tif?<token>' not recognized as a supported file format"
    )


def test_sign_keys_are_checked(tmp_path):
    for extra, key in (("sign : 'azure'", "stac.sign"), ("sign_url : 'ftp://x'", "stac.sign_url")):
        path = write_config(tmp_path, "catalog.json", stac_extra=extra)
        with pytest.raises(ConfigError, match=key) as err:
            load_config(str(path), [])
        assert err.value.exit_code == 2
