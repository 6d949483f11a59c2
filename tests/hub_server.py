"""A loopback Hugging Face Hub for tests: a FastAPI app answering the routes huggingface_hub's
HfApi.create_repo / create_branch / create_commit (validate-yaml, preupload, commit), model_info /
repo_info, list_repo_tree / list_repo_files and hf_hub_download / snapshot_download use,
with the headers the client reads (ETag, X-Repo-Commit, X-Error-Code). Files are stored
on disk in a folder (blobs by git oid, one JSON state file per repository). Every file is
committed inline ("regular" upload mode): the LFS and Xet upload paths the real Hub uses for
large weights are not served here.

Routes and headers follow huggingface_hub 1.x+ (hf_api.py, _commit_api.py, file_download.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response


def git_oid(data: bytes) -> str:
    """A git blob id, which the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _error(status: int, code: str | None, message: str, **body: Any) -> JSONResponse:
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return JSONResponse({"error": message, **body}, status_code=status, headers=headers)


class HubState:
    """Repositories on disk: root/repos/<owner>/<name>.json, root/blobs/<oid>."""

    def __init__(self, root: Path, token: str | None) -> None:
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        self.token = token
        self.lock = threading.Lock()
        self.seen_auth: list[str | None] = []  # the Authorization header of every request
        self.validated: list[str] = []  # README.md contents validate-yaml accepted

    def _path(self, repo_id: str) -> Path:
        return self.root / "repos" / f"{repo_id}.json"

    def load(self, repo_id: str) -> dict[str, Any] | None:
        path = self._path(repo_id)
        return json.loads(path.read_text()) if path.is_file() else None

    def save(self, repo_id: str, repo: dict[str, Any]) -> None:
        path = self._path(repo_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(repo))

    def put_blob(self, data: bytes) -> str:
        oid = git_oid(data)
        (self.root / "blobs" / oid).write_bytes(data)
        return oid

    def blob(self, oid: str) -> bytes:
        return (self.root / "blobs" / oid).read_bytes()

    def commit(self, repo: dict[str, Any], branch: str, files: dict[str, str], message: str) -> str:
        parent = repo["branches"].get(branch)
        sha = hashlib.sha1(json.dumps([parent, files, message, time.time_ns()]).encode()).hexdigest()
        repo["commits"][sha] = {"parent": parent, "files": files, "message": message}
        repo["branches"][branch] = sha
        return sha

    @staticmethod
    def resolve(repo: dict[str, Any], revision: str) -> str | None:
        if revision in repo["branches"]:
            return repo["branches"][revision]
        return revision if revision in repo["commits"] else None


def create_app(state: HubState, base_url: str) -> FastAPI:
    app = FastAPI()

    def authorized(request: Request) -> bool:
        return state.token is None or request.headers.get("authorization") == f"Bearer {state.token}"

    def readable(request: Request, repo_id: str) -> dict[str, Any] | JSONResponse:
        repo = state.load(repo_id)
        if repo is None or (repo["private"] and not authorized(request)):
            # the Hub answers the same for a missing repository and a private one
            return _error(404 if authorized(request) else 401, "RepoNotFound", f"Repository Not Found for {repo_id}")
        return repo

    @app.middleware("http")
    async def record_auth(request: Request, call_next):
        state.seen_auth.append(request.headers.get("authorization"))
        return await call_next(request)

    @app.post("/api/validate-yaml")
    async def validate_yaml(request: Request):
        """create_commit sends README.md here first. The Hub's own schema is not available
        offline: this checks what huggingface_hub's parser checks (a YAML mapping, a
        well-formed model-index with complete eval results), strictly."""
        from huggingface_hub import ModelCard

        body = await request.json()
        try:
            card = ModelCard(body["content"], ignore_metadata_errors=False)
            if body.get("repoType", "model") == "model":
                card.data.to_dict()
        except Exception as exc:  # the parser's own words go back as the Hub's error list
            return JSONResponse({"errors": [{"message": f"{type(exc).__name__}: {exc}"}]}, status_code=400)
        state.validated.append(body["content"])
        return {"warnings": []}

    @app.post("/api/repos/create")
    async def create_repo(request: Request):
        if not authorized(request):
            return _error(401, None, "Invalid credentials in Authorization header")
        body = await request.json()
        repo_id = f"{body['organization']}/{body['name']}"
        with state.lock:
            if state.load(repo_id) is not None:
                # the Hub's conflict answer carries the existing repository's url
                return _error(409, None, "You already created this model repo", url=f"{base_url}/{repo_id}")
            repo = {"private": body.get("visibility") == "private" or bool(body.get("private")),
                    "branches": {}, "commits": {}}
            state.commit(repo, "main", {".gitattributes": state.put_blob(b"*.safetensors filter=lfs\n")},
                         "initial commit")
            state.save(repo_id, repo)
        return {"url": f"{base_url}/{repo_id}", "name": repo_id}

    @app.post("/api/models/{owner}/{name}/branch/{branch}")
    async def create_branch(owner: str, name: str, branch: str, request: Request):
        repo_id = f"{owner}/{name}"
        if not authorized(request):
            return _error(401, None, "Invalid credentials in Authorization header")
        with state.lock:
            repo = state.load(repo_id)
            if repo is None:
                return _error(404, "RepoNotFound", f"Repository Not Found for {repo_id}")
            if branch in repo["branches"]:
                return _error(409, None, f"Branch {branch} already exists")
            repo["branches"][branch] = repo["branches"]["main"]
            state.save(repo_id, repo)
        return {}

    @app.post("/api/models/{owner}/{name}/preupload/{revision}")
    async def preupload(owner: str, name: str, revision: str, request: Request):
        repo = readable(request, f"{owner}/{name}")
        if isinstance(repo, JSONResponse):
            return repo
        head = state.resolve(repo, revision)
        current = repo["commits"][head]["files"] if head else {}
        body = await request.json()
        return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                           "oid": current.get(f["path"])} for f in body["files"]]}

    @app.post("/api/models/{owner}/{name}/commit/{revision}")
    async def commit(owner: str, name: str, revision: str, request: Request):
        repo_id = f"{owner}/{name}"
        if not authorized(request):
            return _error(401, None, "Invalid credentials in Authorization header")
        lines = [json.loads(line) for line in (await request.body()).splitlines() if line.strip()]
        with state.lock:
            repo = state.load(repo_id)
            if repo is None:
                return _error(404, "RepoNotFound", f"Repository Not Found for {repo_id}")
            if revision not in repo["branches"]:
                return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            files = dict(repo["commits"][repo["branches"][revision]]["files"])
            message = "commit"
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "header":
                    message = value["summary"]
                elif key == "file":
                    files[value["path"]] = state.put_blob(base64.b64decode(value["content"]))
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                else:  # lfsFile, deletedFolder: never asked for by preupload's answers here
                    return _error(400, None, f"unsupported commit operation {key}")
            sha = state.commit(repo, revision, files, message)
            state.save(repo_id, repo)
        return {"commitUrl": f"{base_url}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True}

    def info(repo_id: str, repo: dict[str, Any], sha: str) -> dict[str, Any]:
        files = repo["commits"][sha]["files"]
        return {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo["private"],
                "siblings": [{"rfilename": path} for path in sorted(files)], "tags": [], "downloads": 0}

    @app.get("/api/models/{owner}/{name}")
    async def model_info(owner: str, name: str, request: Request):
        return await model_info_at(owner, name, "main", request)

    @app.get("/api/models/{owner}/{name}/revision/{revision}")
    async def model_info_at(owner: str, name: str, revision: str, request: Request):
        repo_id = f"{owner}/{name}"
        repo = readable(request, repo_id)
        if isinstance(repo, JSONResponse):
            return repo
        sha = state.resolve(repo, revision)
        if sha is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return info(repo_id, repo, sha)

    @app.get("/api/models/{owner}/{name}/tree/{revision}")
    async def tree(owner: str, name: str, revision: str, request: Request):
        repo = readable(request, f"{owner}/{name}")
        if isinstance(repo, JSONResponse):
            return repo
        sha = state.resolve(repo, revision)
        if sha is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return [{"type": "file", "path": path, "oid": oid, "size": len(state.blob(oid))}
                for path, oid in sorted(repo["commits"][sha]["files"].items())]

    @app.api_route("/{owner}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    async def resolve(owner: str, name: str, revision: str, path: str, request: Request):
        repo = readable(request, f"{owner}/{name}")
        if isinstance(repo, JSONResponse):
            return repo
        sha = state.resolve(repo, revision)
        if sha is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        oid = repo["commits"][sha]["files"].get(path)
        if oid is None:
            return _error(404, "EntryNotFound", f"{path} does not exist at {revision}")
        data = state.blob(oid)
        headers = {"ETag": f'"{oid}"', "X-Repo-Commit": sha, "Content-Length": str(len(data))}
        if request.method == "HEAD":
            return Response(status_code=200, headers=headers)
        return Response(content=data, headers=headers, media_type="application/octet-stream")

    return app


class LoopbackHub:
    """The app on a free loopback port, served by uvicorn in a thread."""

    def __init__(self, root: Path, token: str | None = None) -> None:
        import uvicorn

        from serving import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = HubState(root, token)
        config = uvicorn.Config(create_app(self.state, self.url), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LoopbackHub":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the loopback Hub did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
