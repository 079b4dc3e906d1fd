"""Serve the champion: a Ray Serve app that answers with a model store's current version (or one
model file), and switches to a new version when `current.json` moves.

    mnist-serve --store models/store                 # http://127.0.0.1:8000/, Ctrl-C stops it
    mnist-serve --model models/mnist.keras --replicas 2 --port 8080

API (JSON over HTTP, v1; the body forms are in trainer/inputs.py):
    POST /predict   {"image": ...} -> {"digit", "probabilities", "version"}
                    {"images": [...]} (up to 64) -> {"predictions": [{"digit", "probabilities"}, ...], "version"}
    GET  /healthz   {"status": "ok", "version"}
    GET  /version   {"version", "model", "loaded_at", "source"}
Bad input gets a 4xx and {"error": one line}; a body over 1 MiB a 413. Requests are batched inside each
replica (@serve.batch). Every replica checks the store's pointer every --poll-s seconds and loads a
new version beside the old one, checks it predicts, then swaps it in: no request fails or waits for
a load. A version that does not load is logged once and the old one keeps serving.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse

from trainer import errors
from trainer.inputs import MAX_BODY_BYTES, BadInput, parse_body

API_VERSION = "v1"
BATCH_SIZE, BATCH_WAIT_S = 32, 0.004  # requests a replica runs as one model call, and how long it waits for them
MAX_ONGOING = 2 * BATCH_SIZE  # requests a replica holds; past it Ray Serve's proxy queues them
POLL_S = 0.5
logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Loaded:
    version: str  # the store version, or file:<name> for a model file
    path: str
    model: object
    loaded_at: float


def current(store: str | None, model_file: str | None) -> tuple[str, str]:
    """(version, model path) to serve now: the store's current version, or the one file."""
    if model_file:
        return f"file:{os.path.basename(model_file)}", os.path.abspath(model_file)
    from trainer.store import Store, StoreError

    models = Store(store)
    vid = models.current_id()
    if vid is None:
        raise StoreError(f"{store} has no current version yet; promote one with mnist-retrain")
    return vid, models.model_path(vid)


def load(version: str, path: str) -> Loaded:
    """Load a model and check it predicts ten probabilities; ValueError in one line if not."""
    from trainer import quiet
    from trainer.predict import load_model

    quiet.import_tensorflow()  # its import-time C++ notices to a log file, not the console
    model = load_model(path)
    probe = np.asarray(model.predict_on_batch(np.zeros((2, 784), np.float32)))
    if probe.shape != (2, 10) or not np.isfinite(probe).all():
        raise ValueError(f"{path}: the model's probe prediction is {probe.shape}, not finite (2, 10)")
    return Loaded(version, path, model, time.time())


class Digits:
    """One replica: the model it serves now, a thread watching the store, and the HTTP routes."""

    def __init__(self, store: str | None, model_file: str | None, poll_s: float = POLL_S,
                 max_batch: int = BATCH_SIZE):
        self.store, self.model_file = store, model_file
        self.infer.set_max_batch_size(max_batch)  # 1: every request its own model call
        self.loaded = load(*current(store, model_file))
        self._failed: set[str] = set()
        if store:
            threading.Thread(target=self._watch, args=(poll_s,), name="store-watch", daemon=True).start()

    def _watch(self, poll_s: float) -> None:
        while True:
            time.sleep(poll_s)
            try:
                version, path = current(self.store, None)
            except Exception as exc:  # a pointer being repaired: keep serving, say so once
                self._once("pointer", f"cannot read the store's pointer ({errors.first_line(exc, limit=200)}); "
                           f"still serving {self.loaded.version}")
                continue
            if version == self.loaded.version or version in self._failed:
                continue
            try:
                self.loaded = load(version, path)  # one reference swap: a request uses one model or the other
                logger.warning("now serving version %s", version)
            except Exception as exc:
                self._failed.add(version)
                logger.warning("version %s does not load (%s); still serving %s", version,
                               errors.first_line(exc, limit=200), self.loaded.version)

    def _once(self, key: str, message: str) -> None:
        if key not in self._failed:
            self._failed.add(key)
            logger.warning(message)

    async def __call__(self, request: Request):
        route = (request.method, request.url.path.rstrip("/") or "/")
        try:
            if route == ("POST", "/predict"):
                return JSONResponse(await self._predict(request))
            if route == ("GET", "/healthz"):
                return JSONResponse({"status": "ok", "version": self.loaded.version})
            if route == ("GET", "/version"):
                loaded = self.loaded
                return JSONResponse({"version": loaded.version, "model": loaded.path, "api": API_VERSION,
                                     "loaded_at": loaded.loaded_at, "source": "store" if self.store else "file"})
            if route == ("GET", "/"):
                return HTMLResponse(page())
            known = {"/predict": "POST", "/healthz": "GET", "/version": "GET", "/": "GET"}
            if route[1] in known:
                return JSONResponse({"error": f"{route[1]} takes {known[route[1]]}"}, status_code=405)
            return JSONResponse({"error": f"no route {route[1]}; see GET /"}, status_code=404)
        except BadInput as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)

    async def _predict(self, request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise BadInput(f"body of {int(declared):,} bytes is over the limit of {MAX_BODY_BYTES:,}", 413)
        body = bytearray()
        async for piece in request.stream():  # never more than the limit in memory
            body += piece
            if len(body) > MAX_BODY_BYTES:
                raise BadInput(f"body is over the limit of {MAX_BODY_BYTES:,} bytes", 413)
        images, batch = parse_body(bytes(body), request.headers.get("content-type", "application/json"))
        probs, version = await self.infer(images)
        answers = [{"digit": int(p.argmax()), "probabilities": [round(float(v), 6) for v in p]} for p in probs]
        return {"predictions": answers, "version": version} if batch else {**answers[0], "version": version}

    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def infer(self, requests: list[np.ndarray]) -> list[tuple[np.ndarray, str]]:
        """One model call for the requests that arrived together; each gets its rows and the version."""
        loaded = self.loaded
        probs = await asyncio.to_thread(loaded.model.predict_on_batch, np.concatenate(requests))
        probs, ends = np.asarray(probs), np.cumsum([len(r) for r in requests])
        return [(probs[end - len(r):end], loaded.version) for r, end in zip(requests, ends)]


def page() -> str:
    """The page at GET /: trainer/serve_page.html, read once per request (a few KB)."""
    with open(os.path.join(os.path.dirname(__file__), "serve_page.html"), encoding="utf-8") as f:
        return f.read()


def app(store: str | None, model_file: str | None, replicas, poll_s: float = POLL_S, max_batch: int = BATCH_SIZE):
    """The bound Serve application: `replicas` an int, or (min, max) for autoscaling. A replica takes
    up to two full batches of requests at once (MAX_ONGOING), so a batch fills while the one before runs."""
    options = ({"num_replicas": replicas} if isinstance(replicas, int) else
               {"autoscaling_config": {"min_replicas": replicas[0], "max_replicas": replicas[1],
                                       "target_ongoing_requests": BATCH_SIZE}})
    deployment = serve.deployment(Digits, name="mnist", ray_actor_options={"num_cpus": 1},
                                  max_ongoing_requests=MAX_ONGOING, **options)
    return deployment.bind(store and os.path.abspath(store), model_file and os.path.abspath(model_file), poll_s,
                           max_batch)


def build(args: dict):
    """Ray Serve's application builder: `serve run trainer.serve:build store=DIR` and the import_path
    of jobs/rayservice.yaml (args: store or model, replicas N or MIN-MAX, poll_s)."""
    from trainer.config import parse_workers

    unknown = sorted(set(args) - {"store", "model", "replicas", "poll_s"})
    if unknown or bool(args.get("store")) == bool(args.get("model")):
        raise ValueError(f"mnist-serve args: give store or model (one), optional replicas and poll_s; got {sorted(args)}")
    return app(args.get("store"), args.get("model"), parse_workers(args.get("replicas", 1)),
               float(args.get("poll_s", POLL_S)))


def build_parser() -> argparse.ArgumentParser:
    from trainer.cli import script_parser
    from trainer.config import parse_workers

    parser = script_parser(__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--store", help="a model store (mnist-retrain's): serve its current version, follow promotions")
    source.add_argument("--model", help="one model file (.keras or .h5)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=parse_workers, default=1, metavar="N|MIN-MAX",
                        help="replicas, or a range to autoscale in")
    parser.add_argument("--poll-s", type=float, default=POLL_S, help="how often each replica checks the store")
    parser.add_argument("--max-batch", type=int, default=BATCH_SIZE,
                        help="requests a replica answers with one model call (1: no batching)")
    parser.add_argument("--address", help="Ray cluster to deploy to (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--verbose", action="store_true", help="Ray Serve's own log lines on the console too, "
                        "an access line per request among them")
    return parser


def main(argv: list[str] | None = None) -> int:
    from trainer import cluster
    from trainer.cli import fail
    from trainer.config import Config

    args = build_parser().parse_args(argv)
    try:
        version, path = current(args.store, args.model)  # a missing store or file: before Ray starts
        if not os.path.isfile(path):
            raise ValueError(f"model file {path} not found")
        if args.max_batch < 1 or args.poll_s <= 0:
            raise ValueError("--max-batch must be at least 1 and --poll-s positive")
        cfg = Config(address=args.address, num_workers=1, verbose=args.verbose)
    except Exception as exc:
        return fail(errors.first_line(exc, limit=300))
    import ray

    with cluster.environment(cfg):
        cluster.connect(ray, cfg)
        try:
            if not args.verbose:  # warnings and errors still reach the console, a replica's included
                logger.setLevel(logging.WARNING)
            logs = {"log_level": "INFO" if args.verbose else "WARNING", "enable_access_log": args.verbose}
            serve.start(http_options={"host": args.host, "port": args.port}, logging_config=logs)
            serve.run(app(args.store, args.model, args.replicas, args.poll_s, args.max_batch), name="mnist",
                      route_prefix="/", logging_config=logs)
            print(f"serving {version} at http://{args.host}:{args.port}/ (POST /predict, GET /healthz, /version)",
                  flush=True)
            if cluster.address(cfg):
                print("deployed to the cluster; it keeps serving after this command ends (`serve shutdown` stops it)")
                return 0
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):  # Ray's own SIGINT handling does not end this wait
                signal.signal(sig, lambda *_: stop.set())
            while not stop.wait(0.5):  # a timed wait: the main thread runs the handlers between waits
                pass
            print("stopping: the app goes down with this process's Ray", flush=True)
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
