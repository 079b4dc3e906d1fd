"""Serve the champion: a Ray Serve app that answers with a model store's current version (or one
model file), and switches to a new version when `current.json` moves.

    mnist-serve --store models/store                 # http://127.0.0.1:8000/, Ctrl-C stops it
    mnist-serve --model models/mnist.keras --replicas 2 --port 8080

API (JSON over HTTP, v1; FastAPI, with the OpenAPI schema at /openapi.json, pages at /docs and /redoc;
the body forms are in trainer/serve/inputs.py):
    POST /predict   {"image": ...}, a raw PNG/JPEG body or a form upload of one file
                    -> {"digit", "probabilities", "version"}
                    {"images": [...]} (up to 64), or a form upload of several files
                    -> {"predictions": [{"digit", "probabilities"}, ...], "version"}
    GET  /healthz   {"status": "ok", "version"}
    GET  /version   {"version", "model", "api", "loaded_at", "source"}
    GET  /drift     has the data moved? this replica's last --drift-window answers against the served
                    version's shift reference (trainer/serve/drift.py): {"drift", "p_value", "window", ...}
    GET  /          a page to draw a digit on (trainer/serve/page.html)
Every refusal is a 4xx with {"error": one line}: bad input a 400; a body over 1 MiB, more than 64
images, or pictures of more than 16.8 megapixels in all (read from their headers, before decoding) a
413; an unknown path a 404, a wrong method a 405. A trailing slash is ignored (/healthz/ is /healthz).
Requests are batched inside each replica (@serve.batch). Every replica checks the store's pointer
every --poll-s seconds and loads a new version beside the old one, checks it predicts, then swaps it
in: no request fails or waits for a load. A version that does not load is logged once and the old
one keeps serving. A replica logs one line when its window of answers first drifts from the served
version's training data.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (Request, the
# response models) in the replica, where a class pickled by value (run as `python -m`) keeps only the
# globals its code uses, so an annotation left as a string would not resolve.
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
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from starlette.datastructures import UploadFile  # what request.form() holds (FastAPI's UploadFile subclasses it)
from starlette.exceptions import HTTPException

from trainer.common import errors, quiet
from trainer.common.cli import add_options, bug, fail, option, parse_workers, script_parser
from trainer.common.errors import InputError, UsageError
from trainer.config import Config
from trainer.data import shift
from trainer.serve.drift import WINDOW, Report, Watch, reference_beside
from trainer.serve.inputs import (
    EMPTY_BODY,
    IMAGE_TYPES,
    MAX_BODY_BYTES,
    MAX_IMAGES,
    BadInput,
    PredictRequest,
    form_pictures,
    picture,
)
from trainer.store.model_store import Store, StoreError
from trainer.track.models import load_model
from trainer.train import cluster

API_VERSION = "v1"
BATCH_SIZE, BATCH_WAIT_S = 32, 0.004  # requests a replica runs as one model call, and how long it waits for them
MAX_ONGOING = 2 * BATCH_SIZE  # requests a replica holds; past it Ray Serve's proxy queues them
POLL_S = 0.5
logger = logging.getLogger("ray.serve")


class Answer(BaseModel):
    digit: int = Field(description="the most probable digit, 0..9")
    probabilities: list[float] = Field(description="the ten digits' probabilities, rounded to 6 places")


class Prediction(Answer):
    version: str = Field(description="the model version that answered")


class Predictions(BaseModel):
    predictions: list[Answer]
    version: str = Field(description="the model version that answered")


class Health(BaseModel):
    status: str = "ok"
    version: str


class About(BaseModel):
    version: str = Field(description="the store version, or file:<name> for a model file")
    model: str = Field(description="the model file's path")
    api: str = API_VERSION
    loaded_at: float = Field(description="when this replica loaded it, seconds since the epoch")
    source: str = Field(description="store or file")


class Drift(Report):
    version: str = Field(description="the version whose answers the window holds")


class Refusal(BaseModel):
    error: str = Field(description="what was wrong, in one line")


PICTURE = {"type": "string", "format": "binary"}
# POST /predict takes JSON, a raw picture or a form, so it reads the body itself and documents the
# three here (FastAPI's pattern for a body it does not parse: openapi_extra, then the model's own
# validation in the handler).
PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": PredictRequest.model_json_schema()},
    **{kind: {"schema": PICTURE} for kind in IMAGE_TYPES},
    "multipart/form-data": {"schema": {
        "type": "object", "properties": {"image": PICTURE}, "additionalProperties": PICTURE,
        "description": f"each file field one picture, up to {MAX_IMAGES}; more than one answers as a batch"}},
}}}
REFUSALS = {400: {"model": Refusal, "description": "bad input"},
            413: {"model": Refusal, "description": f"a body over {MAX_BODY_BYTES:,} bytes, more than "
                                                   f"{MAX_IMAGES} images, or an image too large"}}
http = FastAPI(title="mnist-serve", version=API_VERSION, redirect_slashes=False,
               description="Handwritten digits -> the model store's current version's answer.")


class Intake:
    """ASGI middleware in front of the routes: a trailing slash is dropped (/healthz/ is /healthz, where
    FastAPI would redirect), and a body past MAX_BODY_BYTES is refused (413) on its Content-Length or as
    it arrives, whoever reads it. (FastAPI's own max_body_size answers that in plain text, not JSON.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope["path"] = scope["path"].rstrip("/") or "/"
        declared = dict(scope["headers"]).get(b"content-length", b"").strip()
        declared = int(declared) if declared.isdigit() and len(declared) < 19 else 0  # longer: no server passes it
        received = 0

        async def limited():
            nonlocal received
            if declared > MAX_BODY_BYTES:
                raise BadInput(f"body of {declared:,} bytes is over the limit of {MAX_BODY_BYTES:,}", 413)
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                raise BadInput(f"body is over the limit of {MAX_BODY_BYTES:,} bytes", 413)
            return message

        await self.app(scope, limited, send)


async def refused(request: Request, exc: Exception) -> JSONResponse:
    """Every refusal as {"error": one line}: a BadInput with its status, a path no route has (404), or a
    method its route does not take (405)."""
    status, headers = getattr(exc, "status", 400), None
    message = str(exc)
    if isinstance(exc, HTTPException):
        status, headers, message = exc.status_code, exc.headers, str(exc.detail)
        if status == 404:
            message = f"no route {request.url.path}; see GET /"
        elif status == 405:
            allowed = [m for m in (headers or {}).get("Allow", "").split(", ") if m not in ("", "HEAD")]
            message = f"{request.url.path} takes {' or '.join(allowed)}"
    return JSONResponse({"error": errors.first_line(" ".join(message.split()), limit=300)}, status, headers)


http.add_middleware(Intake)
http.add_exception_handler(BadInput, refused)
http.add_exception_handler(HTTPException, refused)


@dataclass(frozen=True)
class Loaded:
    version: str  # the store version, or file:<name> for a model file
    path: str
    model: object
    loaded_at: float
    watch: Watch  # this version's window of answers


def current(store: str | None, model_file: str | None) -> tuple[str, str]:
    """(version, model path) to serve now: the store's current version, or the one file."""
    if model_file:
        return f"file:{os.path.basename(model_file)}", os.path.abspath(model_file)
    models = Store(store)
    vid = models.current_id()
    if vid is None:
        raise StoreError(f"{store} has no current version yet; promote one with mnist-retrain")
    return vid, models.model_path(vid)


def load(version: str, path: str, window: int = WINDOW, alpha: float = shift.ALPHA) -> Loaded:
    """Load a model and check it predicts ten probabilities (an InputError in one line if not), with
    a window watching its answers against the shift reference beside it (none: unwatched)."""
    quiet.import_tensorflow()  # its import-time C++ notices to a log file, not the console
    model = load_model(path)
    probe = np.asarray(model.predict_on_batch(np.zeros((2, 784), np.float32)))
    if probe.shape != (2, 10) or not np.isfinite(probe).all():
        raise InputError(f"{path}: the model's probe prediction is {probe.shape}, not finite (2, 10)")
    return Loaded(version, path, model, time.time(), Watch(reference_beside(path), window, alpha))


async def uploads(request: Request) -> list[tuple[str, bytes]]:
    """A form's files as (name, contents): the parts with a file name (python-multipart parses them)."""
    try:
        async with request.form(max_files=MAX_IMAGES) as form:  # closes the uploads' spooled files after
            files = [value for _, value in form.multi_items() if isinstance(value, UploadFile) and value.filename]
            return [(upload.filename, await upload.read()) for upload in files]
    except HTTPException as exc:  # no boundary, a malformed part, too many files or fields
        if "too many files" in str(exc.detail).lower():
            raise BadInput(f"more than {MAX_IMAGES} images in one request; the limit is {MAX_IMAGES}", 413) from None
        raise BadInput(f"bad multipart body ({str(exc.detail).rstrip('.')}): send the image as a file field "
                       "(curl -F image=@digit.png)") from None


def page() -> str:
    """The page at GET /: trainer/serve/page.html, read once per request (a few KB)."""
    with open(os.path.join(os.path.dirname(__file__), "page.html"), encoding="utf-8") as f:
        return f.read()


# What the routes below use is defined above them: @serve.ingress pickles the app, routes and all, here.
@serve.ingress(http)
class Digits:
    """One replica: the model it serves now, a thread watching the store, and the HTTP routes."""

    def __init__(self, store: str | None, model_file: str | None, poll_s: float = POLL_S,
                 max_batch: int = BATCH_SIZE, drift_window: int = WINDOW, drift_alpha: float = shift.ALPHA):
        self.store, self.model_file = store, model_file
        self._drift_args = (drift_window, drift_alpha)  # each loaded version's Watch
        self.infer.set_max_batch_size(max_batch)  # 1: every request its own model call
        self.loaded = load(*current(store, model_file), *self._drift_args)
        self._failed: set[str] = set()
        threading.Thread(target=self._watch, args=(poll_s,), name="store-watch", daemon=True).start()

    def _watch(self, poll_s: float) -> None:
        """Every poll_s: test the window of answers, and follow the store's pointer (if serving a store)."""
        while True:
            time.sleep(poll_s)
            try:
                self._drift()
            except Exception:  # said once by _drift; the watch goes on
                pass
            if not self.store:
                continue
            try:
                version, path = current(self.store, None)
            except Exception as exc:  # a pointer being repaired: keep serving, say so once
                self._once("pointer", f"cannot read the store's pointer ({errors.first_line(exc, limit=200)}); "
                           f"still serving {self.loaded.version}")
                continue
            if version == self.loaded.version or version in self._failed:
                continue
            try:
                self.loaded = load(version, path, *self._drift_args)  # one swap: a request uses one model or the other
                logger.warning("now serving version %s", version)
            except Exception as exc:
                self._failed.add(version)
                logger.warning("version %s does not load (%s); still serving %s", version,
                               errors.first_line(exc, limit=200), self.loaded.version)

    def _drift(self) -> Drift:
        loaded = self.loaded
        try:
            report, first = loaded.watch.check()
        except Exception as exc:  # a reference of the wrong shape: say so once, keep serving
            self._once(f"drift {loaded.version}", f"cannot test version {loaded.version}'s answers for drift "
                       f"({errors.first_line(exc, limit=200)})")
            raise
        if first:
            logger.warning("drift: the last %d answers moved from version %s's training data: %s", report.window,
                           loaded.version, report.note)
        return Drift(version=loaded.version, **report.model_dump())

    def _once(self, key: str, message: str) -> None:
        if key not in self._failed:
            self._failed.add(key)
            logger.warning(message)

    @http.post("/predict", openapi_extra=PREDICT_BODY, responses=REFUSALS)
    async def predict(self, request: Request) -> Prediction | Predictions:
        """One digit, or a batch of them: JSON, a raw PNG/JPEG, or a form upload (trainer/serve/inputs.py)."""
        body = await request.body()  # Intake refuses one past MAX_BODY_BYTES as it arrives
        if not body:
            raise BadInput(EMPTY_BODY)
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if kind in IMAGE_TYPES:
            images, batch = picture(body)[None], False
        elif kind == "multipart/form-data":
            images, batch = form_pictures(await uploads(request))
        else:  # JSON whatever the type says: curl -d sends application/x-www-form-urlencoded
            images, batch = PredictRequest.parse(body).pixels()
        probs, version = await self.infer(images)
        answers = [Answer(digit=int(p.argmax()), probabilities=[round(float(v), 6) for v in p]) for p in probs]
        if batch:
            return Predictions(predictions=answers, version=version)
        return Prediction(**answers[0].model_dump(), version=version)

    @http.get("/healthz")
    async def healthz(self) -> Health:
        return Health(version=self.loaded.version)

    @http.get("/version")
    async def version(self) -> About:
        loaded = self.loaded
        return About(version=loaded.version, model=loaded.path, loaded_at=loaded.loaded_at,
                     source="store" if self.store else "file")

    @http.get("/drift")
    async def drift(self) -> Drift:
        """Has the data moved? BBSD on this replica's last answers against the served version's reference."""
        return await asyncio.to_thread(self._drift)

    @http.get("/", response_class=HTMLResponse)
    async def drawing(self) -> HTMLResponse:
        """A page to draw a digit on, or drop a picture on, with the answer as bars."""
        return HTMLResponse(page())

    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def infer(self, requests: list[np.ndarray]) -> list[tuple[np.ndarray, str]]:
        """One model call for the requests that arrived together; each gets its rows and the version."""
        loaded = self.loaded
        probs = await asyncio.to_thread(loaded.model.predict_on_batch, np.concatenate(requests))
        probs, ends = np.asarray(probs), np.cumsum([len(r) for r in requests])
        loaded.watch.add(probs)
        return [(probs[end - len(r):end], loaded.version) for r, end in zip(requests, ends)]


def app(store: str | None, model_file: str | None, replicas, poll_s: float = POLL_S, max_batch: int = BATCH_SIZE,
        drift_window: int = WINDOW, drift_alpha: float = shift.ALPHA):
    """The bound Serve application: `replicas` an int, or (min, max) for autoscaling. A replica takes
    up to two full batches of requests at once (MAX_ONGOING), so a batch fills while the one before runs."""
    options = ({"num_replicas": replicas} if isinstance(replicas, int) else
               {"autoscaling_config": {"min_replicas": replicas[0], "max_replicas": replicas[1],
                                       "target_ongoing_requests": BATCH_SIZE}})
    deployment = serve.deployment(Digits, name="mnist", ray_actor_options={"num_cpus": 1},
                                  max_ongoing_requests=MAX_ONGOING, **options)
    return deployment.bind(store and os.path.abspath(store), model_file and os.path.abspath(model_file), poll_s,
                           max_batch, drift_window, drift_alpha)


def build(args: dict):
    """Ray Serve's application builder: `serve run trainer.serve.app:build store=DIR` and the import_path
    of jobs/rayservice.yaml (args: store or model, replicas N or MIN-MAX, poll_s)."""
    unknown = sorted(set(args) - {"store", "model", "replicas", "poll_s"})
    if unknown or bool(args.get("store")) == bool(args.get("model")):
        raise UsageError(f"mnist-serve args: give store or model (one), optional replicas and poll_s; got {sorted(args)}")
    return app(args.get("store"), args.get("model"), parse_workers(args.get("replicas", 1)),
               float(args.get("poll_s", POLL_S)))


@dataclass(frozen=True)
class Options:
    """mnist-serve's flags (trainer/common/cli.py makes them from these fields)."""
    store: str | None = option(None, "a model store (mnist-retrain's): serve its current version, follow promotions",
                               exclusive="source", exclusive_required=True, metavar=None)
    model: str | None = option(None, "one model file (.keras or .h5)", exclusive="source", metavar=None)
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface)", metavar=None)
    port: int = option(8000, "", metavar=None)
    replicas: int | tuple[int, int] = option(1, "replicas, or a range to autoscale in", metavar="N|MIN-MAX")
    poll_s: float = option(POLL_S, "how often each replica checks the store", metavar=None)
    max_batch: int = option(BATCH_SIZE, "requests a replica answers with one model call (1: no batching)",
                            metavar=None)
    address: str | None = option(None, "Ray cluster to deploy to (default: $RAY_ADDRESS, else a local Ray)",
                                 metavar=None)
    drift_window: int = option(WINDOW, "answers each replica keeps to test for drift against the served "
                               "version's training data (GET /drift; 0: off)", metavar="N")
    drift_alpha: float = option(shift.ALPHA, "the drift test's level over the ten digits", metavar=None)
    verbose: bool = option(False, "Ray Serve's own log lines on the console too, an access line per request among them")


def build_parser() -> argparse.ArgumentParser:
    return add_options(script_parser(__doc__), Options)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        version, path = current(args.store, args.model)  # a missing store or file: before Ray starts
        if not os.path.isfile(path):
            raise InputError(f"model file {path} not found")
        if args.max_batch < 1 or args.poll_s <= 0 or args.drift_window < 0:
            raise UsageError("--max-batch must be at least 1, --poll-s positive and --drift-window at least 0")
        if not 0 < args.drift_alpha < 1:
            raise UsageError(f"--drift-alpha must lie strictly between 0 and 1, got {args.drift_alpha}")
        cfg = Config(address=args.address, num_workers=1, verbose=args.verbose)
    except errors.JobError as exc:
        return fail(errors.first_line(exc, limit=300))
    except Exception as exc:
        return bug(exc)
    import ray

    with cluster.environment(cfg):
        cluster.connect(ray, cfg)
        try:
            if not args.verbose:  # warnings and errors still reach the console, a replica's included
                logger.setLevel(logging.WARNING)
            logs = {"log_level": "INFO" if args.verbose else "WARNING", "enable_access_log": args.verbose}
            serve.start(http_options={"host": args.host, "port": args.port}, logging_config=logs)
            serve.run(app(args.store, args.model, args.replicas, args.poll_s, args.max_batch, args.drift_window,
                          args.drift_alpha), name="mnist",
                      route_prefix="/", logging_config=logs)
            print(f"serving {version} at http://{args.host}:{args.port}/ (POST /predict, GET /healthz, /version, "
                  "/drift)",
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
