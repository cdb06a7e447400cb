"""Read-only http(s) storage against a real HTTP server on 127.0.0.1: the moto S3 server of
tests/conftest.py answers unsigned ``GET /<bucket>/<key>`` (with Range) for public objects, as a
public bucket of COGs does. Reads, HEAD and its ranged-GET fallback, streamed downloads, the error
contract (404 and 403 exit 2 naming the URL; resets, 503s and refused connections retried, then
75, through tests/faultproxy.py), refused writes, and GDAL's ``/vsicurl/`` under
:func:`storage.raster_call` (retries, missing, damaged, incomplete results)."""

from __future__ import annotations

import json
import os
import socket
import uuid

import numpy as np
import pytest
import rasterio
from affine import Affine

from faultproxy import FaultyProxy, is_range_get
from sitsflow import storage
from sitsflow.config import load_config
from sitsflow.errors import BadInputError, ConfigError, InputNotFoundError, TransientError
from stac_catalog import publish

pytestmark = pytest.mark.s3


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the backoff delays instead of sleeping."""
    delays: list[float] = []
    monkeypatch.setattr(storage, "_sleep", delays.append)
    return delays


@pytest.fixture
def public(s3_server, s3_bucket) -> tuple[str, str]:
    """``(s3 URI, http URL)`` of a public object of 300 KiB."""
    body = os.urandom(300 * 1024)
    uri = f"{s3_bucket}/pub/data.bin"
    storage.write_bytes(uri, body)
    return uri, publish(s3_server, uri)


def test_http_reads_exists_stat_and_downloads(public, s3_server, tmp_path):
    uri, url = public
    body = storage.read_bytes(uri)
    assert storage.backend(url) is storage._HTTP and storage.is_http(url) and storage.is_remote(url)
    assert storage.read_bytes(url) == body
    assert storage.exists(url) and not storage.exists(url + ".nothing")
    assert storage.stat(url) == storage.stat(uri)  # size and ETag: the object's own
    with storage.local_path(url) as path:
        assert os.path.basename(path) == "data.bin" and open(path, "rb").read() == body
    storage.copy(url, str(tmp_path / "d" / "copy.bin"))  # streamed to a temporary sibling, renamed
    assert (tmp_path / "d" / "copy.bin").read_bytes() == body and os.listdir(tmp_path / "d") == ["copy.bin"]
    storage.copy(url, uri + ".copy")  # http -> S3, through a local file
    assert storage.read_bytes(uri + ".copy") == body
    assert storage.rasterio_path(url) == f"/vsicurl/{url}"


def test_head_refused_falls_back_to_a_one_byte_get(s3_server, s3_bucket):
    """A bucket policy granting s3:GetObject to everyone: moto answers GET but refuses HEAD (403),
    as servers of GET-signed URLs do; exists and stat then ask for the first byte."""
    bucket = s3_bucket.removeprefix("s3://")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": "*",
              "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/*"}]}  # fmt: skip
    import boto3

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
    storage.write_bytes(f"{s3_bucket}/a.bin", b"x" * 1234)
    url = f"{s3_server}/{bucket}/a.bin"
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as head:
        storage._http_open(url, "HEAD")
    assert head.value.code == 403  # the premise: HEAD is refused here
    assert storage.exists(url) and not storage.exists(f"{s3_server}/{bucket}/missing.bin")
    assert storage.stat(url) == {"size": 1234, "version": storage.stat(f"{s3_bucket}/a.bin")["version"]}
    storage.write_bytes(f"{s3_bucket}/empty.bin", b"")  # no first byte to get: 416
    empty = f"{s3_server}/{bucket}/empty.bin"
    assert storage.exists(empty) and storage.stat(empty)["size"] == 0 and storage.read_bytes(empty) == b""


def test_missing_and_denied_exit_2_naming_the_url(s3_server, s3_bucket, sleeps):
    bucket = s3_bucket.removeprefix("s3://")
    missing = f"{s3_server}/{bucket}/no/such.tif"
    for call in (storage.read_bytes, storage.stat, lambda u: storage.copy(u, "/tmp/never-written")):
        with pytest.raises(InputNotFoundError) as info:
            call(missing)
        assert info.value.exit_code == 2 and missing in str(info.value) and "HTTP 404" in str(info.value)
    storage.write_bytes(f"{s3_bucket}/private.bin", b"secret")  # not public: 403
    private = f"{s3_server}/{bucket}/private.bin"
    for call in (storage.read_bytes, storage.exists, storage.stat):
        with pytest.raises(BadInputError, match=r"access denied \(HTTP 403\)") as info:
            call(private)
        assert info.value.exit_code == 2 and private in str(info.value)
    assert sleeps == []  # none of them retried
    with pytest.raises(BadInputError, match=r"malformed URL 'https:///x.tif'"):
        storage.read_bytes("https:///x.tif")
    # a port that is no number, a blank: bad input at once, never retried into a 75 (review finding)
    for bad in ("http://localhost:abc/x.tif", "http://exa mple.com/x.tif"):
        with pytest.raises(BadInputError, match="malformed URL"):
            storage.read_bytes(bad)
    assert sleeps == []
    with pytest.raises(BadInputError, match=r"scheme 'ftp'.*allowed: .*where inputs are read, http\(s\)://"):
        storage.read_bytes("ftp://example.com/x.tif")


def test_transient_trouble_is_retried_then_exit_75(public, sleeps, monkeypatch):
    _uri, url = public
    body = storage.read_bytes(_uri)
    monkeypatch.setenv("SITSFLOW_STORAGE_RETRIES", "4")
    s3_server = url.split("/")[2]
    path = url.split("/", 3)[3]
    with FaultyProxy(f"http://{s3_server}", fail=lambda head: head.startswith(b"GET "), fail_budget=2) as proxy:
        assert storage.read_bytes(f"{proxy.url}/{path}") == body  # two 503s, retried
        assert proxy.stats.failed == 2 and len(sleeps) == 2
        sleeps.clear()
        proxy.fail_budget = None  # every GET answered 503 from now on
        with pytest.raises(TransientError) as info:
            storage.read_bytes(f"{proxy.url}/{path}")
        assert info.value.exit_code == 75 and proxy.url in str(info.value) and "HTTP Error 503" in str(info.value)
        assert len(sleeps) == 3  # four attempts
    sleeps.clear()
    with FaultyProxy(f"http://{s3_server}", reset=0.5, seed=4, one_request_per_connection=True) as proxy:
        for _ in range(6):  # resets before or in the middle of the body: retried, never a short file
            assert storage.read_bytes(f"{proxy.url}/{path}") == body
        assert proxy.stats.resets > 0 and sleeps
    with socket.socket() as sock:  # a port nobody listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/{path}"
    sleeps.clear()
    with pytest.raises(TransientError, match="Connection refused") as info:
        storage.exists(closed)
    assert info.value.exit_code == 75 and closed in str(info.value) and len(sleeps) == 3


def test_http_is_read_only(public, tmp_path):
    uri, url = public
    (tmp_path / "f.txt").write_text("x")
    refused = [
        lambda: storage.write_bytes(url, b"x"),
        lambda: storage.delete(url),
        lambda: storage.list_files(url.rsplit("/", 1)[0]),
        lambda: storage.copy(str(tmp_path / "f.txt"), url),
        lambda: storage.copy(url, url + ".2"),
        lambda: storage.upload_tree(str(tmp_path), url.rsplit("/", 1)[0]),
    ]
    for call in refused:
        with pytest.raises(BadInputError, match=r"(read-only|cannot be listed)") as info:
            call()
        assert info.value.exit_code == 2 and url.rsplit("/", 1)[0] in str(info.value)
    with pytest.raises(BadInputError, match="read-only"), storage.output_path(url + ".tif"):
        pass
    assert storage.read_bytes(url) == storage.read_bytes(uri)  # untouched
    config = tmp_path / "c.cfg"
    config.write_text(
        "chain: { output_path: 'out', list_tile: 'T31TCJ', ground_truth: 'p.geojson',"
        " data_field: 'code', s2_path: 's2' }\n"
    )
    with pytest.raises(
        ConfigError, match=r"chain\.output_path: expected a local path or an s3:// URI .*got .http://"
    ) as info:
        load_config(str(config), [f"chain.output_path={url.rsplit('/', 1)[0]}"])
    assert info.value.exit_code == 2


# --------------------------------------------------------------------------------------------
# GDAL: /vsicurl/ under raster_call
# --------------------------------------------------------------------------------------------
def _write_raster(path, data: np.ndarray, **extra) -> None:
    profile = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": str(data.dtype),
        "crs": "EPSG:32631",
        "transform": Affine(10, 0, 300000, 0, -10, 5000000),
    }
    with rasterio.open(path, "w", **(profile | extra)) as dst:
        dst.write(data)


def _read_all(uri: str) -> np.ndarray:
    def read() -> np.ndarray:
        with storage.rasterio_env(), rasterio.open(storage.rasterio_path(uri)) as src:
            return src.read()

    return storage.raster_call("read", uri, read, culprit="the test raster")


@pytest.fixture
def http_raster(s3_server, s3_bucket, tmp_path) -> tuple[str, str, np.ndarray]:
    data = np.random.default_rng(1).integers(0, 10000, (2, 64, 64), dtype=np.uint16)
    _write_raster(tmp_path / "r.tif", data, tiled=True, blockxsize=16, blockysize=16, compress="deflate")
    uri = f"{s3_bucket}/cog/{uuid.uuid4().hex[:8]}.tif"
    storage.copy(str(tmp_path / "r.tif"), uri)
    return uri, publish(s3_server, uri), data


def test_gdal_reads_over_vsicurl_retry_then_exit_75(http_raster, sleeps, monkeypatch):
    _uri, url, data = http_raster
    np.testing.assert_array_equal(_read_all(url), data)
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "0")  # only sitsflow's retries: count them
    monkeypatch.setenv("SITSFLOW_STORAGE_RETRIES", "4")
    storage.reset_clients()
    host, path = url.split("/")[2], url.split("/", 3)[3]
    with FaultyProxy(f"http://{host}", fail=is_range_get, fail_budget=2) as proxy:
        via = f"{proxy.url}/{path}"
        np.testing.assert_array_equal(_read_all(via), data)
        assert proxy.stats.failed == 2 and len(sleeps) == 2  # two 503s, two retries (cache cleared)
        sleeps.clear()
        proxy.fail_budget = None
        storage._clear_gdal_cache([via])
        with pytest.raises(TransientError) as info:
            _read_all(via)
        assert info.value.exit_code == 75 and via in str(info.value) and len(sleeps) == 3


def test_gdal_missing_or_damaged_over_http_exits_2(s3_server, s3_bucket, http_raster, tmp_path, sleeps):
    _uri, url, _data = http_raster
    gone = url.rsplit("/", 1)[0] + "/gone.tif"
    with pytest.raises(InputNotFoundError, match="no such file or object") as info:
        _read_all(gone)
    assert info.value.exit_code == 2 and gone in str(info.value)
    # a truncated raster: GDAL fails on a block; the file is downloaded and decoded: damaged -> 2
    whole = (tmp_path / "r.tif").read_bytes()
    cut = f"{s3_bucket}/cog/cut.tif"
    storage.write_bytes(cut, whole[: len(whole) * 2 // 3])
    cut_url = publish(s3_server, cut)
    with pytest.raises(BadInputError, match=r"damaged or unreadable raster") as info:
        _read_all(cut_url)
    assert info.value.exit_code == 2 and cut_url in str(info.value) and "the test raster" in str(info.value)
    assert len(sleeps) >= 1  # remotely, damage looks like a reset first: retried, then verified


def test_an_incomplete_result_over_http_is_reread_then_judged_on_a_local_copy(http_raster, sleeps, monkeypatch):
    """``incomplete`` (e.g. band descriptions a reset lost): over http the raster is read again from a
    cleared cache, then from a downloaded copy, whose answer stands (this raster has none)."""
    _uri, url, _data = http_raster
    monkeypatch.setenv("SITSFLOW_STORAGE_RETRIES", "3")
    paths: list[str] = []

    def descriptions() -> tuple:
        paths.append(storage.rasterio_path(url))
        with storage.rasterio_env(), rasterio.open(paths[-1]) as src:
            return src.descriptions

    found = storage.raster_call("open", url, descriptions, incomplete=lambda d: not any(d))
    assert found == (None, None) and len(sleeps) == 2  # three reads over http, then the copy
    assert paths[:3] == [f"/vsicurl/{url}"] * 3 and not paths[3].startswith("/vsicurl/") and len(paths) == 4
    assert not os.path.exists(paths[3])  # the copy is removed afterwards
