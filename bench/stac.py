"""STAC benchmark: the inference stage reading Sentinel-2 L2A COGs in place from a STAC catalog on
an S3 server, against the same pixels read from one local multi-band COG.

Generates one chunk (default 512 x 512 px, 12 dates, the ``sentinel-2-l2a`` profile's 10 bands,
all at 10 m, uint16 digital numbers; ZSTD, 256 x 256 blocks) twice:

* **stac**: one item a date (tile ``T0``, processing baseline 03.00: no offset), one single-band
  COG per band asset plus the ``SCL`` mask asset (all clear), a static catalog, all uploaded to a
  moto S3 server on 127.0.0.1 started by the bench in a process of its own (the object store is
  another machine in real life); the stage reads them through GDAL's ``/vsis3/``;
* **local**: the same digital numbers as one pixel-interleaved multi-band COG on local disk, read
  by the ``dated_raster`` sensor (dates from the band descriptions, the same scale, no mask).

Both configurations give the same features (checked on the chunk before timing) and the same
random-weight network (bench/inference.py's ``install_model``), with local outputs. The stage
(``sitsflow.inference.run``, one chunk) is timed ``--repeat`` times on each, each run in a fresh
process (GDAL's caches empty, as in a pod; the local file stays in the OS page cache); the figure
is ``ratio = local time / stac time`` (1: STAC costs nothing more; the aim is >= 0.6).

HTTP requests are counted by the S3 server (a WSGI wrapper around moto's application): per
stage run, by method, split into the catalog's JSON (read once, when the stage builds its
sensors) and the COGs' requests (GETs with a ``Range`` header: GDAL's header and block reads).

    python bench/stac.py [--size 512] [--dates 12] [--repeat 2] [--network MLPClassifier]
                         [--compress ZSTD] [--readers N] [--block 256] [--pod-memory-gib G]

Prints a table and one JSON line; record the figures in docs/benchmarks.md with the machine
(``os.getloadavg()`` is printed: the machine is shared).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


# --- the S3 server: moto, counting the requests it answers ------------------------------------
class Counting:
    """WSGI middleware: counts each request (method, ``Range`` or not, ``.json`` or not);
    ``GET /_bench/requests`` answers the counts as JSON, ``POST /_bench/reset`` zeroes them."""

    def __init__(self, app) -> None:
        self.app = app
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path.startswith("/_bench/"):
            with self.lock:
                body = json.dumps(self.counts).encode()
                if path == "/_bench/reset":
                    self.counts = {}
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        kind = "json" if path.endswith(".json") else "cog" if path.endswith(".tif") else "other"
        ranged = "range" if environ.get("HTTP_RANGE") else "whole"
        key = f"{environ.get('REQUEST_METHOD', '?')} {kind} {ranged}"
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1
        return self.app(environ, start_response)


def serve(port: int) -> None:
    """Run moto's S3 server with :class:`Counting` on 127.0.0.1:``port`` until killed."""
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class CountingServer(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = Counting(DomainDispatcherApplication(create_backend_app))
            self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    server = CountingServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    threading.Event().wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server() -> tuple[subprocess.Popen, str]:
    """The counting S3 server in a process of its own; ``(process, endpoint)``."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/_bench/requests", timeout=1).read()
            return proc, endpoint
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("the S3 server did not start") from None
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the S3 server did not answer in 30 s")


def requests(endpoint: str, reset: bool = False) -> dict[str, int]:
    """The counts of the S3 server (zeroed afterwards with ``reset``)."""
    url = f"{endpoint}/_bench/{'reset' if reset else 'requests'}"
    req = urllib.request.Request(url, data=b"" if reset else None, method="POST" if reset else "GET")
    return dict(json.loads(urllib.request.urlopen(req, timeout=10).read()))


# --- the data ---------------------------------------------------------------------------------
def make_data(work: Path, size: int, nb_dates: int, compress: str, block: int = 256):
    """Digital numbers (dates, bands, size, size) uint16, the items' COGs and catalog under
    ``work/stac``, the local multi-band COG ``work/local.tif``; returns the dates."""
    import numpy as np
    import pystac
    import rasterio
    import rasterio.shutil
    from rasterio.transform import from_origin

    from sitsflow.sensors.catalogue import STAC_PROFILES

    bands = STAC_PROFILES["sentinel-2-l2a"].assets
    rng = np.random.default_rng(0)
    dates = [dt.date(2021, 1, 3) + dt.timedelta(days=10 * i) for i in range(nb_dates)]
    yy, xx = np.mgrid[0:size, 0:size]
    field = (np.sin(xx / 37.0) + np.cos(yy / 23.0)) * 1000
    transform = from_origin(300000, 5000000, 10, 10)
    common = {"crs": "EPSG:32631", "transform": transform, "width": size, "height": size}
    catalog = pystac.Catalog("bench", "sitsflow STAC bench")
    local_bands = []
    for t, day in enumerate(dates):
        season = np.sin(2 * np.pi * t / nb_dates)
        name = f"S2_T0_{day:%Y%m%d}"
        item_dir = work / "stac" / "items" / name
        item_dir.mkdir(parents=True, exist_ok=True)
        item = pystac.Item(name, None, None, dt.datetime(day.year, day.month, day.day, 10, tzinfo=dt.UTC),
                           {"s2:mgrs_tile": "T0", "s2:processing_baseline": "03.00", "eo:cloud_cover": 0.0},
                           collection="sentinel-2-l2a")
        for b, band in enumerate(bands):
            dn = np.clip(1500 + 300 * b + field * season + rng.normal(0, 50, (size, size)), 1, 65535).astype(np.uint16)
            local_bands.append(dn)
            with rasterio.open(item_dir / f"{band}.tif", "w", driver="COG", dtype="uint16", count=1, nodata=0,
                               compress=compress, blocksize=block, overviews="NONE", **common) as dst:
                dst.write(dn, 1)
            item.add_asset(band, pystac.Asset(str(item_dir / f"{band}.tif"), media_type=pystac.MediaType.COG))
        scl = np.full((size, size), 4, np.uint8)  # vegetation: clear
        with rasterio.open(item_dir / "SCL.tif", "w", driver="COG", dtype="uint8", count=1, nodata=0,
                           compress=compress, blocksize=block, overviews="NONE", **common) as dst:
            dst.write(scl, 1)
        item.add_asset("SCL", pystac.Asset(str(item_dir / "SCL.tif"), media_type=pystac.MediaType.COG))
        catalog.add_item(item)
    catalog.normalize_hrefs(str(work / "stac"))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    plain = work / "local.plain.tif"
    with rasterio.open(plain, "w", driver="GTiff", dtype="uint16", count=len(local_bands), nodata=0, tiled=True,
                       blockxsize=block, blockysize=block, interleave="pixel", **common) as dst:
        for i, dn in enumerate(local_bands):
            dst.write(dn, i + 1)
            dst.set_band_description(i + 1, dates[i // len(bands)].isoformat())
    rasterio.shutil.copy(plain, work / "local.tif", driver="COG", compress=compress, blocksize=block, overviews="NONE")
    plain.unlink()
    return dates


def upload(work: Path, endpoint: str, bucket: str = "bench") -> str:
    """Every file under ``work/stac`` to ``s3://bucket/stac/``; the catalog's URI."""
    import boto3

    client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                            aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=bucket)
    for path in sorted((work / "stac").rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"stac/{path.relative_to(work / 'stac').as_posix()}")
    return f"s3://{bucket}/stac/catalog.json"


def write_config(work: Path, name: str, sensor: str, out: Path) -> Path:
    """A configuration of the sensor block ``sensor`` (no spectral index: the same features)."""
    cfg = work / f"{name}.cfg"
    cfg.write_text(f"""
chain : {{
  output_path : '{out}'
  list_tile : 'T0'
  ground_truth : 'none.gpkg'
  data_field : 'code'
}}
{sensor}
arg_train : {{ features : [], deep_learning_parameters : {{ dl_name : 'MLPClassifier' }} }}
python_data_managing : {{
  chunk_size_mode : 'split_number'
  number_of_chunks : 1
}}
""")
    return cfg


def stage(config: str) -> int:
    """Time the stage on the chunk of ``config`` once, in this fresh process (GDAL's caches
    empty); print ``{"seconds": ..., "timings": ...}``."""
    sys.path.insert(0, str(BENCH))
    from inference import time_stage  # bench/inference.py (tunes the process for inference)

    from sitsflow.config import load_config
    from sitsflow.log import setup_logging

    setup_logging("WARNING")
    pod = os.environ.get("BENCH_POD_MEMORY")
    if pod:  # a pod with this memory limit (--pod-memory-gib), emulated: see main()
        import rasterio.env

        from sitsflow import process

        limit = Path(tempfile.mkdtemp()) / "memory.max"
        limit.write_text(pod)
        process.CGROUP_MEMORY_MAX = str(limit)
        rasterio.env.set_gdal_config("GDAL_CACHEMAX", int(0.05 * int(pod)))  # GDAL's default: 5 % of it
    seconds, timings = time_stage(load_config(config), 1)
    print(json.dumps({"seconds": round(seconds, 3), "timings": timings}))
    return 0


def run_stage(config: Path) -> tuple[float, dict]:
    """:func:`stage` in a process of its own: ``(seconds, the stage's timings)``."""
    done = subprocess.run([sys.executable, __file__, "--stage", str(config)], capture_output=True, text=True,
                          check=True, env=os.environ)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return float(out["seconds"]), dict(out["timings"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dates", type=int, default=12)
    parser.add_argument("--network", default="MLPClassifier")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--compress", default="ZSTD", help="COG compression: ZSTD (default), DEFLATE, LZW, NONE")
    parser.add_argument("--readers", type=int, default=None, help="reading threads (SITSFLOW_READERS)")
    parser.add_argument("--block", type=int, default=256, help="the COGs' internal block size (px)")
    parser.add_argument("--pod-memory-gib", type=float, default=None,
                        help="emulate a pod with this memory limit: the stage reads it as its cgroup limit, "
                             "GDAL's block cache starts at 5 %% of it (GDAL's default)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve(args.serve)
        return 0
    if args.stage is not None:
        return stage(args.stage)
    # the S3 server's environment, nothing of the host's (as tests/conftest.py does)
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[key]
    os.environ.update({"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                       "AWS_EC2_METADATA_DISABLED": "true", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    if args.readers:
        os.environ["SITSFLOW_READERS"] = str(args.readers)
    if args.pod_memory_gib:
        os.environ["BENCH_POD_MEMORY"] = str(int(args.pod_memory_gib * (1 << 30)))
    sys.path.insert(0, str(BENCH))
    import numpy as np
    from inference import install_model  # bench/inference.py (tunes the process for inference)
    from machine import cpu_name
    from rasterio.windows import Window

    from sitsflow.config import load_config
    from sitsflow.features import FeaturePipeline
    from sitsflow.log import setup_logging

    setup_logging("WARNING")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sitsflow-bench-stac-"))
    work.mkdir(parents=True, exist_ok=True)
    server, endpoint = start_server()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        t0 = time.perf_counter()
        make_data(work, args.size, args.dates, args.compress, args.block)
        catalog = upload(work, endpoint)
        generate_s = round(time.perf_counter() - t0, 1)
        stac_path = write_config(work, "stac", f"""stac : {{
  catalog : '{catalog}'
  profile : 'sentinel-2-l2a'
  temporal_resolution : 10
}}""", work / "out_stac")
        stac_cfg = load_config(str(stac_path))
        local_path = write_config(work, "local", f"""dated_raster : {{
  name : 'local'
  path : '{work / "local.tif"}'
  bands : {json.dumps([b.lower() for b in FeaturePipeline(stac_cfg, "T0").sensors[0].bands])}
  scale : 0.0001
  nodata : 0
  temporal_resolution : 10
}}""", work / "out_local")
        local_cfg = load_config(str(local_path))
        # the same pixels: the same features on the whole chunk
        whole = Window(0, 0, args.size, args.size)
        a = FeaturePipeline(stac_cfg, "T0")
        b = FeaturePipeline(local_cfg, "T0")
        assert a.dates == b.dates and len(a.components) == len(b.components)
        fa, fb = a.features(whole), b.features(whole)
        np.testing.assert_allclose(fa.values, fb.values, rtol=1e-6)
        del a, b, fa, fb
        results: dict = {"size": args.size, "dates": args.dates, "bands": 10, "compress": args.compress,
                         "block": args.block, "pod_memory_gib": args.pod_memory_gib,
                         "network": args.network, "cpu": cpu_name(), "cores": os.cpu_count(),
                         "generate_s": generate_s}
        for cfg in (stac_cfg, local_cfg):
            install_model(cfg, args.network)
        requests(endpoint, reset=True)
        runs = []
        for _ in range(args.repeat):  # each run in a fresh process: GDAL's caches start empty
            stac_s, stac_timings = run_stage(stac_path)
            runs.append({"stac_s": round(stac_s, 2), "requests": requests(endpoint, reset=True),
                         "stac_timings": stac_timings})
            local_s, local_timings = run_stage(local_path)
            runs[-1] |= {"local_s": round(local_s, 2), "local_timings": local_timings}
        results["runs"] = runs
        best_stac = min(r["stac_s"] for r in runs)
        best_local = min(r["local_s"] for r in runs)
        results["stac_s"], results["local_s"] = best_stac, best_local
        results["ratio_local_over_stac"] = round(best_local / best_stac, 3)
        results["loadavg"] = [round(x, 2) for x in os.getloadavg()]
        first = runs[0]["requests"]
        results["requests_per_chunk"] = sum(first.values())
        results["cog_requests_per_chunk"] = sum(v for k, v in first.items() if " cog " in k)
        results["cogs"] = args.dates * 11
        print(f"machine: {results['cpu']} ({results['cores']} cores), load average {results['loadavg']}")
        print(f"chunk: {args.size}x{args.size} px, {args.dates} dates x 10 bands (+ SCL), uint16 COGs "
              f"({args.compress}); network {args.network}")
        for i, r in enumerate(runs):
            print(f"run {i + 1}: stac {r['stac_s']} s, local {r['local_s']} s; requests {r['requests']}")
        print(f"ratio (local time / stac time, best of {args.repeat}): {results['ratio_local_over_stac']}")
        print(f"HTTP requests per chunk (first run): {results['requests_per_chunk']} "
              f"({results['cog_requests_per_chunk']} to the {results['cogs']} COGs)")
        print("stac timings (s): " + ", ".join(f"{k} {v}" for k, v in runs[-1]["stac_timings"].items()))
        print("local timings (s): " + ", ".join(f"{k} {v}" for k, v in runs[-1]["local_timings"].items()))
        print(json.dumps(results))
    finally:
        server.kill()
        server.wait()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "services"))
    raise SystemExit(main())
