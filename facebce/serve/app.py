"""The FastAPI application of `facebce serve` (`create_app`), and `run` which starts uvicorn.

Requests carry images as multipart form field `files` (repeatable) or as JSON
`{"images": [base64, ...]}`, with the other parameters (k, threshold, policy, id) as form fields or
JSON keys. Every refusal is a 4xx with `{"error": {"code": ..., "message": ...}}`; a request that
fails changes nothing in the gallery (images are all decoded and embedded before the one write).

This module is over 450 lines because every route sits here with its scope check and its input
limits, so the whole authorisation surface of the service reads in one file.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from facebce import __version__
from facebce.errors import FacebceError
from facebce.serve.auth import ApiKey, KeyStore, scope_allows
from facebce.serve.config import POLICIES, ServeConfig
from facebce.serve.engine import Engine, ServiceError
from facebce.serve.metrics import Metrics, SharedMetrics, worker_metrics
from facebce.serve.page import PAGE

__all__ = ["CONFIG_ENV", "app_from_env", "create_app", "run"]

CONFIG_ENV = "FACEBCE_SERVE_RESOLVED"  # the resolved config handed to uvicorn's worker processes
METRICS_ENV = "FACEBCE_SERVE_METRICS_DIR"  # where the worker processes leave their counts (metrics.py)
_OPEN = ApiKey("(no keys file)", "admin", "", "")  # loopback-only server without authentication
_MAX_NAME = 128


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class _Guard:
    """Pure ASGI middleware: refuses bodies over the size limit (by Content-Length, and by counting
    bytes for chunked uploads) and records every request's route, status and latency."""

    def __init__(self, app, config: ServeConfig, metrics: Metrics):
        self.app, self.limit, self.metrics = app, config.max_request_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        length = dict(scope["headers"]).get(b"content-length")
        too_big = f"request body over the limit of {self.limit:,} bytes (max_request_bytes)"
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            resp = _error(413, "request_too_large", too_big if length.isdigit() else "bad Content-Length")
            await resp(scope, receive, send)
            self.metrics.observe_request("(refused)", scope["method"], resp.status_code, time.perf_counter() - start)
            return
        seen = [0]

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.limit:
                    raise ServiceError(413, "request_too_large", too_big)
            return message

        async def watched_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "(unmatched)"
            self.metrics.observe_request(route, scope["method"], status[0], time.perf_counter() - start)


def create_app(config: ServeConfig, *, engine: Engine | None = None, log=print) -> FastAPI:
    """The app; its lifespan loads the model, detector and gallery (GET /readyz says when) unless
    `engine` is given (as `run` does, so that load errors are one line before uvicorn starts)."""
    metrics = (engine.metrics if engine is not None and engine.metrics is not None
               else worker_metrics(os.environ.get(METRICS_ENV)))
    keys = KeyStore.load(config.keys) if config.keys else None
    state: dict = {"engine": None, "error": None}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine is not None:
            state["engine"] = engine
        else:
            try:
                state["engine"] = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: Engine(config, log=log, metrics=metrics))
            except FacebceError as e:
                state["error"] = str(e)
                print(f"facebce serve: error: {e}", file=sys.stderr, flush=True)
                raise
        try:
            yield
        finally:
            running, state["engine"] = state["engine"], None
            if running is not None:
                running.close()
            if isinstance(metrics, SharedMetrics):
                metrics.close()

    app = FastAPI(title="facebce serve", version=__version__, lifespan=lifespan,
                  description="Enrol, identify and verify faces at one global cosine threshold.")
    app.add_middleware(_Guard, config=config, metrics=metrics)

    # ---- errors: one JSON shape --------------------------------------------------------------
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, e: ServiceError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return _error(e.status, e.code, e.message, headers)

    @app.exception_handler(FacebceError)
    async def _facebce_error(request: Request, e: FacebceError):
        return _error(422, "invalid", str(e))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, "invalid", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return _error(e.status_code, code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        traceback.print_exc(file=sys.stderr)
        return _error(500, "internal_error", f"{type(e).__name__}: the server failed on this request")

    # ---- helpers -----------------------------------------------------------------------------
    def current() -> Engine:
        e = state["engine"]
        if e is None:
            raise ServiceError(503, "not_ready", "the model and gallery are still loading")
        return e

    def authorize(request: Request, needed: str) -> ApiKey:
        if keys is None:
            return _OPEN
        header = request.headers.get("authorization", "")
        presented = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key")
        if not presented:
            raise ServiceError(401, "unauthorized", "no API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'")
        key = keys.check(presented)
        if key is None:
            raise ServiceError(401, "unauthorized", "API key not recognised")
        if not scope_allows(key.scope, needed):
            raise ServiceError(403, "forbidden", f"key {key.name!r} has scope {key.scope}; this needs {needed}")
        return key

    async def images_and_fields(request: Request) -> tuple[list[tuple[bytes, str]], dict]:
        """The uploaded images (bytes, a name for messages) and the other parameters."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ("multipart/form-data", "application/json"):
            raise ServiceError(415, "unsupported_media_type",
                               f"Content-Type {kind or '(none)'}: send multipart/form-data (field 'files') or "
                               f"application/json ({{\"images\": [base64, ...]}})")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
        if kind == "application/json":
            try:
                data = json.loads(bytes(body))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ServiceError(422, "invalid_json", f"body: not valid JSON ({e})") from None
            if not isinstance(data, dict):
                raise ServiceError(422, "invalid_json", "body: expected a JSON object")
            raw = data.pop("images", [])
            if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
                raise ServiceError(422, "invalid", "images: expected a list of base64 strings")
            _count(raw)
            items = []
            for i, s in enumerate(raw):
                try:
                    items.append((base64.b64decode(s.split(",", 1)[-1] if s.startswith("data:") else s,
                                                   validate=True), f"images[{i}]"))
                except (binascii.Error, ValueError):
                    raise ServiceError(422, "invalid_base64", f"images[{i}]: not valid base64") from None
            return items, data
        request._body = bytes(body)  # Starlette's form parser reads the body we already bounded
        try:
            form = await request.form(max_files=config.max_images + 1, max_fields=32)
        except StarletteHTTPException as e:
            raise ServiceError(413 if "Too many" in str(e.detail) else 422, "bad_multipart",
                               f"multipart body: {e.detail}") from None
        except Exception as e:
            raise ServiceError(422, "bad_multipart", f"multipart body: {type(e).__name__}: {e}") from None
        files, fields = [], {}
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields[name] = value
            elif name in ("files", "file", "image"):
                files.append(value)
        _count(files)
        items = []
        for i, f in enumerate(files):
            items.append((await f.read(), f"files[{i}] ({_clean_name(f.filename) or 'unnamed'})"))
        fields["_filenames"] = [_clean_name(f.filename) for f in files]
        return items, fields

    def _count(items) -> None:
        if not items:
            raise ServiceError(422, "no_images", "no images: add multipart field 'files' or JSON 'images'")
        if len(items) > config.max_images:
            raise ServiceError(413, "too_many_images",
                               f"{len(items)} images, over the limit of {config.max_images} per request (max_images)")

    def int_field(fields: dict, name: str, default: int, lo: int, hi: int) -> int:
        raw = fields.get(name, default)
        try:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            value = int(raw)
        except (TypeError, ValueError):
            raise ServiceError(422, "invalid", f"{name}={raw!r}: expected an integer") from None
        if not lo <= value <= hi:
            raise ServiceError(422, "invalid", f"{name}={value}: expected {lo}..{hi}")
        return value

    def threshold_field(fields: dict, key: ApiKey) -> float | None:
        raw = fields.get("threshold")
        if raw in (None, ""):
            return None
        if not scope_allows(key.scope, "admin"):
            raise ServiceError(403, "forbidden", f"key {key.name!r} (scope {key.scope}) may not override the "
                                                 f"threshold; that needs admin")
        try:
            t = float(raw)
        except (TypeError, ValueError):
            t = math.nan
        if not -1.0 <= t <= 1.0:
            raise ServiceError(422, "invalid", f"threshold={raw!r}: expected a cosine in [-1, 1]")
        return t

    def policy_field(fields: dict) -> str | None:
        p = fields.get("policy")
        if p in (None, ""):
            return None
        if p not in POLICIES:
            raise ServiceError(422, "invalid", f"policy={p!r}: expected one of {', '.join(POLICIES)}")
        if current().aligner is None:
            raise ServiceError(422, "invalid", "policy: this server has no detector (it takes aligned crops only)")
        return p

    def check_identity(identity: str) -> str:
        if not identity or len(identity) > _MAX_NAME or not identity.isprintable() or identity != identity.strip():
            raise ServiceError(422, "invalid_identity", f"identity {identity[:40]!r}: expected 1-{_MAX_NAME} "
                                                        f"printable characters without surrounding spaces")
        return identity

    async def embedded(request: Request, key: ApiKey):
        items, fields = await images_and_fields(request)
        e = current()
        faces = await e.faces(items, policy_field(fields))
        return e, faces, await e.embed(faces), fields

    def decide(matches, t: float) -> dict:
        best = matches[0] if matches else None
        known = best is not None and best.score > t
        return {"identity": best.identity if known else None, "known": known,
                "score": None if best is None else round(best.score, 6),
                "matches": [{"id": m.id, "identity": m.identity, "score": round(m.score, 6)} for m in matches]}

    # ---- endpoints ---------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE)

    @app.get("/healthz", summary="alive")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="model and gallery loaded")
    async def readyz():
        e = state["engine"]
        if e is None or not e.ready:
            return _error(503, "not_ready", state["error"] or "loading the model and gallery")
        return {"status": "ready", "model": os.path.basename(config.model), "dim": e.dim,
                "gallery_entries": len(e.store), "threshold": e.store.threshold,
                "detector": os.path.basename(config.detector) if config.detector else None,
                "auth": keys is not None}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus text")
    async def metrics_text():
        e = state["engine"]
        entries = identities = None
        if e is not None:
            records = await e.read(e.store.entries)
            entries, identities = len(records), len({r["identity"] for r in records})
        return PlainTextResponse(metrics.render(entries, identities),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/embed", summary="images -> L2-normalised embeddings (read)")
    async def embed(request: Request):
        key = authorize(request, "read")
        e, faces, emb, _ = await embedded(request, key)
        return {"dim": int(emb.shape[1]), "results": [{"embedding": [round(float(v), 7) for v in row],
                                                       "face": f.describe()} for row, f in zip(emb, faces)]}

    @app.post("/v1/identify", summary="top-k matches and known/unknown at the threshold (read)")
    async def identify(request: Request):
        key = authorize(request, "read")
        items, fields = await images_and_fields(request)
        k = int_field(fields, "k", 5, 1, config.max_k)
        t_req = threshold_field(fields, key)
        e = current()
        faces = await e.faces(items, policy_field(fields))
        emb = await e.embed(faces)
        found = await e.search(emb, k)
        t = e.store.threshold if t_req is None else t_req
        return {"threshold": t, "threshold_source": "gallery" if t_req is None else "request",
                "results": [{**decide(m or [], t), "face": f.describe()} for m, f in zip(found, faces)]}

    @app.post("/v1/verify", summary="two images, or an image and a stored face id: same person? (read)")
    async def verify(request: Request):
        key = authorize(request, "read")
        items, fields = await images_and_fields(request)
        t_req = threshold_field(fields, key)
        e = current()
        stored = fields.get("id")
        if stored not in (None, ""):
            if len(items) != 1:
                raise ServiceError(422, "invalid", f"verify with id: send one image, got {len(items)}")
            fid = int_field(fields, "id", 0, 0, 2 ** 62)
            try:
                other = (await e.read(e.store.vectors, [fid]))[0]
            except FacebceError:
                raise ServiceError(404, "not_found", f"face id {fid}: not in the gallery") from None
        elif len(items) != 2:
            raise ServiceError(422, "invalid", f"verify: send two images (or one and a face id), got {len(items)}")
        faces = await e.faces(items, policy_field(fields))
        emb = await e.embed(faces)
        b = other if stored not in (None, "") else emb[1]
        cosine = float(emb[0] @ b)
        t = e.store.threshold if t_req is None else t_req
        return {"cosine": round(cosine, 6), "threshold": t, "same": cosine > t,
                "faces": [f.describe() for f in faces]}

    @app.post("/v1/subjects/{identity}/faces", status_code=201, summary="enrol images of one identity (enrol)")
    async def enrol(identity: str, request: Request):
        authorize(request, "enrol")
        check_identity(identity)
        e, faces, emb, fields = await embedded(request, None)
        names = fields.get("_filenames") or [None] * len(faces)
        ids = await e.write(e.store.add, emb, [identity] * len(faces), sources=names)
        return JSONResponse({"identity": identity, "ids": [int(i) for i in ids], "added": len(ids),
                             "faces": [f.describe() for f in faces]}, status_code=201)

    @app.get("/v1/subjects", summary="enrolled identities and their face counts (read)")
    async def subjects(request: Request):
        authorize(request, "read")
        e = current()
        counts: dict[str, int] = {}
        for r in await e.read(e.store.entries):
            counts[r["identity"]] = counts.get(r["identity"], 0) + 1
        return {"count": len(counts), "subjects": [{"identity": n, "faces": c} for n, c in sorted(counts.items())]}

    @app.get("/v1/subjects/{identity}", summary="one identity's faces (read)")
    async def subject(identity: str, request: Request):
        authorize(request, "read")
        e = current()
        faces = [{"id": r["id"], "source": r.get("source")} for r in await e.read(e.store.entries)
                 if r["identity"] == identity]
        if not faces:
            raise ServiceError(404, "not_found", f"identity {identity[:80]!r}: not enrolled")
        return {"identity": identity, "faces": faces}

    @app.delete("/v1/subjects/{identity}", summary="delete every face of an identity (enrol)")
    async def delete_subject(identity: str, request: Request):
        authorize(request, "enrol")
        e = current()
        try:
            n = await e.write(e.store.remove, identity=identity)
        except FacebceError:
            raise ServiceError(404, "not_found", f"identity {identity[:80]!r}: not enrolled") from None
        return {"identity": identity, "removed": n}

    @app.delete("/v1/faces/{face_id}", summary="delete one face by id (enrol)")
    async def delete_face(face_id: int, request: Request):
        authorize(request, "enrol")
        e = current()
        try:
            n = await e.write(e.store.remove, ids=[face_id])
        except FacebceError:
            raise ServiceError(404, "not_found", f"face id {face_id}: not in the gallery") from None
        return {"id": face_id, "removed": n}

    @app.get("/v1/threshold", summary="the gallery's global threshold (read)")
    async def get_threshold(request: Request):
        authorize(request, "read")
        return {"threshold": current().store.threshold}

    @app.put("/v1/threshold", summary="set the gallery's global threshold (admin)")
    async def put_threshold(request: Request):
        authorize(request, "admin")
        try:
            data = json.loads(await request.body())
            t = float(data["threshold"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            raise ServiceError(422, "invalid", 'body: expected {"threshold": <cosine in [-1, 1]>}') from None
        if not -1.0 <= t <= 1.0:
            raise ServiceError(422, "invalid", f"threshold={t}: expected a cosine in [-1, 1]")
        e = current()
        await e.write(e.store.set_threshold, t)
        return {"threshold": e.store.threshold}

    @app.get("/v1/keys", summary="API key names and scopes, never the keys (admin)")
    async def list_keys(request: Request):
        authorize(request, "admin")
        return {"keys": [] if keys is None else [{"name": k.name, "scope": k.scope, "created": k.created}
                                                 for k in keys.keys]}

    return app


def _clean_name(name: str | None) -> str | None:
    """An uploaded file's name as a source label: its last path part, printable, at most 200 chars."""
    if not name:
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c if c.isprintable() else "?" for c in base)[:200]
    return base or None


def app_from_env() -> FastAPI:
    """uvicorn's factory in each worker process when --workers > 1 (the config travels in CONFIG_ENV)."""
    return create_app(ServeConfig.from_json(os.environ[CONFIG_ENV]))


def run(config: ServeConfig, *, out=print) -> None:
    """Print the resolved config and serve until interrupted."""
    import uvicorn

    config.check_ready()
    if config.keys:
        KeyStore.load(config.keys)  # a bad keys file is a one-line error now, not in a worker
    out(f"facebce serve {__version__}: resolved config")
    out(config.describe())
    if config.keys is None:
        out(f"no keys file: authentication is off, so the server binds to loopback only ({config.host})")
    url = f"http://{config.host}:{config.port}/ (web page /, API docs /docs); Ctrl+C stops"
    if config.workers > 1:
        Engine(config, log=out).close()  # bad model/gallery/detector: one line here, not N worker tracebacks
        out(f"serving with {config.workers} worker processes on {url}")
        os.environ[CONFIG_ENV] = config.to_json()
        folder = tempfile.mkdtemp(prefix="facebce-metrics-")  # the workers' counts, summed by GET /metrics
        os.environ[METRICS_ENV] = folder
        try:
            uvicorn.run("facebce.serve.app:app_from_env", factory=True, host=config.host, port=config.port,
                        workers=config.workers, log_level=config.log_level, access_log=False,
                        timeout_worker_healthcheck=600)  # a worker loads the model before it answers: minutes
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    else:
        engine = Engine(config, log=out, metrics=Metrics())
        out(f"serving on {url}")
        uvicorn.run(create_app(config, engine=engine), host=config.host, port=config.port, log_level=config.log_level,
                    access_log=False)
