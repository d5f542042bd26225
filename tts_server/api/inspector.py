"""The inspector (TTS_INSPECTOR=true): a page that runs a search and draws its tree, and the
JSON of recent traces it reads back by request id. Mounted only when the setting is on.

The page is plain files shipped in the package (tts_server/inspector/: HTML, CSS, JS modules; no
CDN, no build). They hold no data, so they are served without a key; everything with data
(`/inspector/api/...`, and the searches the page runs on `/v1/...`) needs the API key when keys
are set (api/guard.py), and a key reads back only the traces made with it.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from tts_server.api.errors import APIError
from tts_server.api.guard import IDENTITY
from tts_server.api.trace_store import TraceStore

# The page's files, by name, and their types: nothing else is served from the folder.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "inspector.css": "text/css; charset=utf-8",
    "main.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "tree.js": "text/javascript; charset=utf-8",
    "report.js": "text/javascript; charset=utf-8",
}
MAX_ID_CHARS = 128

router = APIRouter(include_in_schema=False)


def _store(request: Request) -> TraceStore:
    store: TraceStore | None = request.app.state.gateway.store
    assert store is not None, "the inspector's routes are mounted only with its store"
    return store


def _file(name: str) -> Response:
    if name not in FILES:
        raise APIError(404, f"no inspector file {name!r}", code="not_found")
    body = resources.files("tts_server.inspector").joinpath(name).read_bytes()
    # The page's own files only, never framed by another site.
    headers = {"Cache-Control": "no-cache", "X-Frame-Options": "DENY"}
    return Response(body, media_type=FILES[name], headers=headers)


@router.get("/inspector")
async def inspector_root() -> RedirectResponse:
    return RedirectResponse("/inspector/", status_code=308)


@router.get("/inspector/")
async def inspector_page() -> Response:
    return _file("index.html")


@router.get("/inspector/static/{name}")
async def inspector_file(name: str) -> Response:
    return _file(name)


@router.get("/inspector/api/traces")
async def recent_traces(request: Request) -> JSONResponse:
    """The caller's recent traces, newest first (summaries; open one by its id)."""
    owner: str = request.scope.get(IDENTITY, "")
    items = _store(request).recent(owner)
    return JSONResponse({"object": "list", "data": [item.summary() for item in items]})


@router.get("/inspector/api/traces/{request_id}")
async def one_trace(request_id: str, request: Request) -> JSONResponse:
    """One answered request's trace by its response id (`chatcmpl-...`, `cmpl-...`)."""
    if len(request_id) > MAX_ID_CHARS or not request_id.replace("-", "").isalnum():
        raise APIError(
            400, "a request id is letters, digits and '-' (a response's `id`)", param="id"
        )
    owner: str = request.scope.get(IDENTITY, "")
    item = _store(request).get(request_id, owner)
    if item is None:
        raise APIError(
            404,
            f"no trace for {request_id!r}: unknown, expired from the store, or made with "
            "another API key",
            param="id",
            code="trace_not_found",
        )
    return JSONResponse(item.body())
