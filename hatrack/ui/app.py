"""The dashboard's routes, mounted at /ui: by `hatrack ui` on its own app (registry
only, no model), and by `hatrack serve` beside the API (then with the serving and
try-it pages, fed by the `Serving` callables the server hands in)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, quote, urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from hatrack.errors import HatrackError
from hatrack.registry import Registry
from hatrack.humanize import human_age, human_size
from hatrack.ui import actions, views
from hatrack.ui.access import COOKIE, Access, Viewer

HERE = Path(__file__).parent
PREFIX = "/ui"
# Versions per rack page. Measured with bench/ui_rack.py: a browser takes about a
# millisecond per rack row to build and draw the page on the 2-core test machine, so a
# page of 1,000 rows took 1.2 s to load and one of 200 well under a second.
RACK_PAGE = 200


@dataclass
class Serving:
    """What `hatrack serve` lends the dashboard: a stats snapshot and the model names,
    each narrowed by `visible(label) -> bool`."""
    snapshot: Callable[[Callable[[str], bool]], dict]
    models: Callable[[Callable[[str], bool]], list[str]]


def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    env.filters.update(size=human_size, age=human_age, score=views.fmt_score)
    env.globals["prefix"] = PREFIX
    return env


class Pages:
    def __init__(self, registry: Registry, access: Access, serving: Serving | None, api_url: str | None) -> None:
        self.registry, self.access, self.serving, self.api_url = registry, access, serving, api_url
        self.env = _env()

    def render(self, request: Request, viewer: Viewer | None, template: str, status: int = 200, **ctx) -> HTMLResponse:
        html = self.env.get_template(template).render(
            viewer=viewer, serving=self.serving is not None, msg=request.query_params.get("msg"),
            err=request.query_params.get("err"), **ctx)
        return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})

    def api_url_for(self, request: Request) -> str:
        return self.api_url or str(request.base_url).rstrip("/")


@dataclass(frozen=True)
class RackPage:
    """One page of the rack: rows [first, last) of `total`, and links to its neighbours."""

    first: int
    last: int
    total: int
    prev_url: str | None
    next_url: str | None


def rack_page(query, total: int) -> RackPage:
    """The page `?page=N&per_page=M` asks for (bad or out-of-range values fall back to the
    nearest valid page); the links keep the filters and the sort."""
    def number(key: str, default: int, low: int, high: int) -> int:
        try:
            return min(max(int(query.get(key, default)), low), high)
        except ValueError:
            return default

    per_page = number("per_page", RACK_PAGE, 1, 5000)
    pages = max(1, -(-total // per_page))
    page = number("page", 1, 1, pages)
    keep = [(k, v) for k, v in query.multi_items() if k != "page"]

    def link(n: int) -> str | None:
        return f"{PREFIX}/?{urlencode(keep + [('page', n)])}" if 1 <= n <= pages else None

    first = (page - 1) * per_page
    return RackPage(first, min(first + per_page, total), total, link(page - 1), link(page + 1))


async def read_form(request: Request) -> dict[str, str]:
    """A urlencoded form (every form here is one), last value per field; no multipart parser needed."""
    if len(await request.body()) > 64 * 1024:
        return {}
    return {k: v[-1] for k, v in parse_qs((await request.body()).decode("utf-8", "replace")).items()}


def _redirect(path: str, **query: str) -> RedirectResponse:
    q = urlencode({k: v for k, v in query.items() if v})
    return RedirectResponse(PREFIX + path + (f"?{q}" if q else ""), status_code=303)


def ui_router(registry: Registry, access: Access, serving: Serving | None = None,
              api_url: str | None = None) -> APIRouter:
    pages = Pages(registry, access, serving, api_url)
    router = APIRouter(prefix=PREFIX, include_in_schema=False)

    async def who(request: Request) -> Viewer | None:
        return await run_in_threadpool(access.viewer, request)

    def login_needed() -> RedirectResponse:
        return _redirect("/login")

    @router.get("/login", response_class=HTMLResponse)
    async def login_form(request: Request):
        if access.open:
            return _redirect("/")
        return pages.render(request, None, "login.html", open=access.open)

    @router.post("/login")
    async def login(request: Request):
        form = await read_form(request)
        secret = str(form.get("key") or "").strip()
        key = await run_in_threadpool(access.lookup, secret) if secret else None
        if key is None:
            return pages.render(request, None, "login.html", status=401, open=access.open,
                                error="that key is not valid (unknown or revoked)")
        resp = _redirect("/")
        resp.set_cookie(COOKIE, secret, httponly=True, samesite="strict", path="/")
        return resp

    @router.post("/logout")
    async def logout():
        resp = _redirect("/login")
        resp.delete_cookie(COOKIE, path="/")
        return resp

    @router.get("/", response_class=HTMLResponse)
    async def rack(request: Request):
        viewer = await who(request)
        if viewer is None:
            return login_needed()
        q = request.query_params
        filters = {"name": q.get("name", ""), "tag": q.getlist("tag"), "base": q.get("base", ""),
                   "sort": q.get("sort", "")}
        error, rows = None, []
        try:
            tags = actions.parse_tags([t for t in filters["tag"] if t])
            rows = await run_in_threadpool(views.rack, registry, viewer, name=filters["name"], tags=tags,
                                           base=filters["base"], sort=filters["sort"])
        except HatrackError as exc:
            error = str(exc)
        page = rack_page(q, len(rows))
        return pages.render(request, viewer, "rack.html", rows=rows[page.first:page.last], page=page,
                            filters=filters, error=error, names=sorted({r["name"] for r in rows}))

    @router.get("/v/{ref}", response_class=HTMLResponse)
    async def version(request: Request, ref: str):
        viewer = await who(request)
        if viewer is None:
            return login_needed()
        try:
            page = await run_in_threadpool(views.version_page, registry, viewer, ref, pages.api_url_for(request))
        except HatrackError as exc:
            return pages.render(request, viewer, "error.html", status=404, error=str(exc))
        return pages.render(request, viewer, "version.html", **page)

    @router.get("/compare", response_class=HTMLResponse)
    async def compare(request: Request):
        viewer = await who(request)
        if viewer is None:
            return login_needed()
        refs = [r for r in request.query_params.getlist("v") if r]
        if len(refs) < 2:
            return pages.render(request, viewer, "error.html", status=400,
                                error="pick two or more versions to compare (tick them on the rack)")
        try:
            page = await run_in_threadpool(views.compare_page, registry, viewer, refs)
        except HatrackError as exc:
            return pages.render(request, viewer, "error.html", status=404, error=str(exc))
        return pages.render(request, viewer, "compare.html", **page)

    # ---------------------------------------------------------- actions (admin, CSRF token)

    async def admin_form(request: Request):
        viewer = await who(request)
        form = await read_form(request)
        if viewer is None:
            return None, None, login_needed()
        if not viewer.admin:
            return None, None, pages.render(request, viewer, "error.html", status=403,
                                            error="read-only: changes need an admin key (one allowed '*')")
        if not access.check_token(viewer, form.get("token")):
            return None, None, pages.render(request, viewer, "error.html", status=403,
                                            error="this form expired or came from another page: reload and retry")
        return viewer, form, None

    async def version_action(request: Request, ref: str, action):
        """An admin form posted from a version's page: run it, then back to the page with
        its message or its error."""
        viewer, form, refused = await admin_form(request)
        if refused:
            return refused
        page = f"/v/{quote(ref)}"
        try:
            text = await run_in_threadpool(action, registry, viewer, ref, form)
        except HatrackError as exc:
            return _redirect(page, err=str(exc))
        return _redirect(page, msg=text)

    @router.post("/v/{ref}/alias")
    async def set_alias(request: Request, ref: str):
        return await version_action(request, ref, actions.move_alias)

    @router.post("/v/{ref}/tag")
    async def set_tag(request: Request, ref: str):
        return await version_action(request, ref, actions.tag)

    @router.get("/prune", response_class=HTMLResponse)
    async def prune_plan(request: Request):
        viewer = await who(request)
        if viewer is None:
            return login_needed()
        q = request.query_params
        page = {"criteria": dict(q), "plan": None, "error": None}
        if any(q.get(k) for k in actions.PRUNE_FIELDS):
            try:
                page["plan"] = await run_in_threadpool(actions.prune_plan, registry, viewer, q)
            except HatrackError as exc:
                page["error"] = str(exc)
        return pages.render(request, viewer, "prune.html", fields=actions.PRUNE_FIELDS, **page)

    @router.post("/prune")
    async def prune_do(request: Request):
        viewer, form, refused = await admin_form(request)
        if refused:
            return refused
        try:
            text = await run_in_threadpool(actions.prune_confirmed, registry, viewer, form)
        except HatrackError as exc:
            return _redirect("/prune", err=str(exc), **{k: str(form.get(k) or "") for k in actions.PRUNE_FIELDS})
        return _redirect("/", msg=text)

    # ---------------------------------------------------------- hatrack serve only

    @router.get("/serving", response_class=HTMLResponse)
    async def serving_page(request: Request):
        viewer = await who(request)
        if viewer is None:
            return login_needed()
        if serving is None:
            return pages.render(request, viewer, "error.html", status=404,
                                error="live serving state is shown by `hatrack serve` at /ui/serving")
        snap = await run_in_threadpool(serving.snapshot, viewer.sees)
        return pages.render(request, viewer, "serving.html", snap=snap)

    @router.get("/api/serving")
    async def serving_json(request: Request):
        viewer = await who(request)
        if viewer is None:
            return JSONResponse({"error": "sign in first"}, status_code=401)
        if serving is None:
            return JSONResponse({"error": "not serving"}, status_code=404)
        return JSONResponse(await run_in_threadpool(serving.snapshot, viewer.sees),
                            headers={"Cache-Control": "no-store"})

    @router.get("/try", response_class=HTMLResponse)
    async def try_page(request: Request):
        viewer = await who(request)
        if viewer is None:
            return login_needed()
        if serving is None:
            return pages.render(request, viewer, "error.html", status=404,
                                error="try it needs a model: open /ui/try on `hatrack serve`")
        models = await run_in_threadpool(serving.models, viewer.sees)
        return pages.render(request, viewer, "try.html", models=models)

    return router


def mount_ui(app: FastAPI, registry: Registry, access: Access, serving: Serving | None = None,
             api_url: str | None = None) -> None:
    app.include_router(ui_router(registry, access, serving, api_url))
    app.mount(PREFIX + "/static", StaticFiles(directory=HERE / "static"), name="ui-static")

    @app.get(PREFIX, include_in_schema=False)
    async def _ui_root() -> Response:
        return RedirectResponse(PREFIX + "/", status_code=307)


def create_ui_app(registry: Registry, *, open_access: bool, api_url: str | None = None) -> FastAPI:
    """`hatrack ui`: the registry pages alone; / leads to /ui/."""
    app = FastAPI(title="hatrack ui", docs_url=None, redoc_url=None, openapi_url=None)
    mount_ui(app, registry, Access(registry.authenticate, open_access=open_access), api_url=api_url)

    @app.get("/", include_in_schema=False)
    async def _root() -> Response:
        return RedirectResponse(PREFIX + "/", status_code=307)

    return app
