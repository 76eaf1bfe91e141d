"""The console's web app over one PATH: a directory of runs, one run, or a federation directory.

Pages are rendered on the server (Jinja2 templates); the run page's live view and
charts fetch JSON that is read afresh from the run's files on every request. Read-only
unless built with `allow_actions` (revoke a node, stop a deployed run); with a `token`,
every request must carry it (a `?token=` query once, kept in a same-site cookie, or an
`Authorization: Bearer` header).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.middleware.trustedhost import TrustedHostMiddleware

from fedmodel.console.federation import FederationView, is_federation_directory, revoke
from fedmodel.console.privacy import PrivacyView
from fedmodel.console.runs import (
    SERVED_FILES,
    RunsRoot,
    RunView,
    UnknownRunError,
    privacy_utility,
)
from fedmodel.console.stop import stop_deployed_run
from fedmodel.errors import FedModelError

HERE = Path(__file__).parent
TOKEN_COOKIE = "fedmodel_console_token"
LOOPBACK_NAMES = ["127.0.0.1", "localhost"]
"""The Host names a console without a token answers to: it is reached on 127.0.0.1 only."""

templates = Jinja2Templates(directory=HERE / "templates")
READ_ONLY = "read-only console: start it with --allow-actions"


def create_app(path: Path, token: str | None = None, allow_actions: bool = False) -> FastAPI:
    """The console over `path`. Actions need a token: without one, nobody could be told
    apart from any other local account reaching 127.0.0.1."""
    if allow_actions and not token:
        raise ValueError("actions need a token")
    path = path.absolute()
    runs = RunsRoot(path)
    federation = path if is_federation_directory(path) else None
    app = FastAPI(title="FedModel console", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    if token:
        app.middleware("http")(_token_check(token))
    else:  # a page elsewhere could reach 127.0.0.1 through a DNS name rebound to it
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_NAMES)

    def page(request: Request, template: str, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(
            request,
            template,
            {"root": path, "federation": federation, "actions": allow_actions, **context},
        )

    @app.exception_handler(FedModelError)
    async def user_error(request: Request, error: FedModelError) -> Response:
        """An unknown run (404), or a file a run left unreadable (summary.json with an
        unknown key...): its one line, as the CLI would print it."""
        return PlainTextResponse(str(error), 404 if isinstance(error, UnknownRunError) else 500)

    def read_runs(names: list[str]) -> list[tuple[str, RunView | None, str | None]]:
        """(name, run, None) per run, or (name, None, why) for one whose files are broken."""
        read: list[tuple[str, RunView | None, str | None]] = []
        for name in names:
            try:
                read.append((name, runs.run(name), None))
            except UnknownRunError:
                raise
            except FedModelError as error:
                read.append((name, None, str(error)))
        return read

    @app.get("/", response_class=HTMLResponse)
    def runs_list(request: Request) -> HTMLResponse:
        return page(request, "runs.html", runs=read_runs(runs.names()))

    @app.get("/runs/{name}", response_class=HTMLResponse)
    def run_page(request: Request, name: str) -> HTMLResponse:
        return page(request, "run.html", run=runs.run(name))

    @app.get("/runs/{name}/results", response_class=HTMLResponse)
    def run_results(request: Request, name: str) -> HTMLResponse:
        """The baselines and heterogeneity part alone: the live view swaps it in once the
        harness has written them (after the last round)."""
        return page(request, "run_results.html", run=runs.run(name))

    @app.get("/api/runs/{name}/progress")
    def run_progress(name: str) -> JSONResponse:
        return JSONResponse(runs.run(name).progress())

    @app.get("/runs/{name}/files/{file}")
    def run_file(name: str, file: str) -> Response:
        if file not in SERVED_FILES:
            return PlainTextResponse(f"'{file}' is not a file the console serves", 404)
        target = runs.directory(name) / file
        if not target.is_file():
            return PlainTextResponse(f"run '{name}' has no {file} (yet)", 404)
        kind = "application/json" if file.endswith(".json") else "text/plain; charset=utf-8"
        return FileResponse(target, media_type=kind)

    @app.get("/runs/{name}/privacy", response_class=HTMLResponse)
    def privacy_page(request: Request, name: str) -> HTMLResponse:
        run = runs.run(name)
        return page(request, "privacy.html", run=run, privacy=PrivacyView.of_run(run))

    @app.get("/compare", response_class=HTMLResponse)
    def compare_page(request: Request) -> HTMLResponse:
        read = read_runs(request.query_params.getlist("run") or runs.names())
        chosen = [run for _, run, _ in read if run is not None]
        broken = [(name, error) for name, run, error in read if run is None]
        return page(
            request, "compare.html", runs=chosen, broken=broken, points=privacy_utility(chosen)
        )

    @app.get("/federation", response_class=HTMLResponse)
    def federation_page(request: Request) -> Response:
        if federation is None:
            return PlainTextResponse(f"{path} is not a federation directory", 404)
        return page(request, "federation.html", view=FederationView.read(federation))

    @app.post("/api/runs/{name}/stop")
    def stop_run(name: str) -> Response:
        """Ask the SuperLink to stop deployed run `name` (refused, one line, otherwise)."""
        if not allow_actions:
            return PlainTextResponse(READ_ONLY, 403)
        directory = runs.directory(name)
        try:
            run_id = stop_deployed_run(directory)
        except FedModelError as error:
            return PlainTextResponse(str(error), 409)
        return JSONResponse(
            {"run": name, "superlink_run_id": run_id,
             "message": f"asked the SuperLink to stop run {run_id}; the page shows when it ends"}
        )  # fmt: skip

    @app.post("/federation/nodes/{name}/revoke", response_class=HTMLResponse)
    async def revoke_page(request: Request, name: str) -> Response:
        if not allow_actions:
            return PlainTextResponse(READ_ONLY, 403)
        if federation is None:
            return PlainTextResponse(f"{path} is not a federation directory", 404)
        form = parse_qs((await request.body()).decode(errors="replace"))
        if form.get("confirm") != [name]:
            return PlainTextResponse(f"type the node's name ('{name}') to confirm", 400)
        try:
            entry = revoke(federation, name)
        except FedModelError as error:
            return PlainTextResponse(str(error), 409)
        return page(request, "revoked.html", entry=entry)

    return app


Handler = Callable[[Request], Awaitable[Response]]


def _token_check(token: str) -> Callable[[Request, Handler], Awaitable[Response]]:
    """Middleware refusing (401) any request without `token`; a correct `?token=` sets
    a same-site, HTTP-only cookie so that links and the page's fetches carry it."""

    async def check(request: Request, call_next: Handler) -> Response:
        offered = request.query_params.get("token")
        header = request.headers.get("authorization", "")
        candidates = [
            offered,
            request.cookies.get(TOKEN_COOKIE),
            header.removeprefix("Bearer ") if header.startswith("Bearer ") else None,
        ]
        if not any(c is not None and hmac.compare_digest(c, token) for c in candidates):
            return PlainTextResponse(
                "401: this console needs its token (open it with ?token=TOKEN)", 401
            )
        response = await call_next(request)
        if offered is not None:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    return check
