"""Adapters to and from the Hugging Face Hub, through huggingface_hub.

A push uploads one registry version as a PEFT repository: adapter_config.json naming the
base by its Hub id, adapter_model.safetensors, a model card (README.md) and hatrack's
lineage record (hatrack.json), in one commit. A pull downloads only those files of one
resolved commit; registering them is the caller's job (the same path as `register`).
The endpoint is huggingface_hub's: HF_ENDPOINT, else huggingface.co; the token is HF_TOKEN
(or a saved login). Every failure is a HubError naming the endpoint and the repository.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from hatrack import adapter_format
from hatrack.adapter_format import CONFIG, WEIGHTS
from hatrack.errors import HatrackError

CARD = "README.md"
LINEAGE = "hatrack.json"
# everything a pull downloads: never pickle weights, never anything else in the repository
PULLED_FILES = (CONFIG, WEIGHTS, CARD, LINEAGE)
SCHEME = "hf://"
# owner/name as the Hub spells repository ids (huggingface_hub checks the finer rules)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class HubError(HatrackError):
    """A push or pull the Hub (or the way to it) refused: names the endpoint and the repository."""


@dataclass(frozen=True)
class HubRef:
    """`owner/name` or `owner/name@revision` (a branch, tag or commit), with or without hf://."""

    repo_id: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> "HubRef":
        body = text[len(SCHEME):] if text.startswith(SCHEME) else text
        repo_id, _, revision = body.partition("@")
        check_repo_id(repo_id, text)
        if "@" in body and not revision:
            raise HubError(f"{text!r}: nothing after '@' (expected REPO_ID@REVISION, e.g. {repo_id}@main)")
        return cls(repo_id, revision or None)

    def __str__(self) -> str:
        return f"{SCHEME}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def check_repo_id(repo_id: str, given: str | None = None) -> str:
    if not _REPO_ID.match(repo_id or "") or ".." in repo_id or len(repo_id) > 96:
        raise HubError(f"{given or repo_id!r}: not a Hub repository id (expected OWNER/NAME, e.g. acme/support-lora)")
    return repo_id


def endpoint() -> str:
    """The Hub this process talks to: HF_ENDPOINT, else huggingface_hub's default."""
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def _where() -> str:
    import os

    return endpoint() + (" (HF_ENDPOINT)" if os.environ.get("HF_ENDPOINT") else "")


# ---------------------------------------------------------------- errors


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _first_line(text: str) -> str:
    return (str(text).strip().splitlines() or [""])[0]


def describe(exc: BaseException, action: str, repo_id: str, revision: str | None = None) -> str:
    """A huggingface_hub or transport failure as one line a user can act on."""
    import httpx2
    from huggingface_hub import errors as hf

    where = _where()
    for cause in _chain(exc):
        if isinstance(cause, hf.OfflineModeIsEnabled):
            return f"cannot {action} {repo_id}: HF_HUB_OFFLINE is set, so the Hub at {where} is not contacted"
        if isinstance(cause, (httpx2.TransportError, ConnectionError, TimeoutError)):
            reason = _first_line(cause) or type(cause).__name__
            return f"cannot reach the Hugging Face Hub at {where} to {action} {repo_id}: {reason}"
    if isinstance(exc, hf.HFValidationError):
        return f"{repo_id!r}: not a valid Hub repository id ({_first_line(exc)})"
    if isinstance(exc, hf.RevisionNotFoundError):
        return f"{repo_id} at {where} has no revision {revision or 'main'!r}"
    if isinstance(exc, (hf.RepositoryNotFoundError, hf.GatedRepoError)):
        return (f"{repo_id}: no such model repository at {where}, or it is private or gated and HF_TOKEN "
                f"does not grant access")
    if isinstance(exc, hf.HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            need = "write" if action == "push to" else "read"
            return (f"{where} refused to let this token {action} {repo_id} (HTTP {status}): set HF_TOKEN "
                    f"to a token with {need} access")
        detail = exc.server_message or _first_line(exc)
        return f"{where}: cannot {action} {repo_id}: HTTP {status} {_first_line(detail)}"
    return f"cannot {action} {repo_id} at {where}: {type(exc).__name__}: {_first_line(exc)}"


@contextmanager
def hub_errors(action: str, repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub's and the transport's exceptions into one HubError line."""
    from huggingface_hub import errors as hf

    try:
        yield
    except HatrackError:
        raise
    except (hf.HfHubHTTPError, hf.HFValidationError, hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError,
            OSError, ValueError, RuntimeError) as exc:
        raise HubError(describe(exc, action, repo_id, revision)) from None
    except Exception as exc:  # the transport's own errors (httpx2) are not OSErrors
        import httpx2

        if isinstance(exc, httpx2.HTTPError):
            raise HubError(describe(exc, action, repo_id, revision)) from None
        raise


def _api():
    from huggingface_hub import HfApi
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # adapter files are small; a bar per file is noise in a CLI's output
    return HfApi(endpoint=endpoint(), library_name="hatrack")


# ---------------------------------------------------------------- push


@dataclass(frozen=True)
class Pushed:
    repo_id: str
    revision: str
    commit: str
    commit_url: str
    endpoint: str
    files: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit,
                "commit_url": self.commit_url, "endpoint": self.endpoint, "files": list(self.files)}


def upload(files: dict[str, Path | bytes], repo_id: str, *, private: bool = False, revision: str | None = None,
           commit_message: str) -> Pushed:
    """Create the repository (if needed) and the branch (if named and missing), then commit
    `files` (path in repo -> local file or bytes) in one commit."""
    from huggingface_hub import CommitOperationAdd

    check_repo_id(repo_id)
    api = _api()
    branch = revision or "main"
    with hub_errors("push to", repo_id, branch):
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(src) if isinstance(src, Path) else src)
                      for name, src in sorted(files.items())]
        info = api.create_commit(repo_id, operations=operations, commit_message=commit_message,
                                 revision=branch)
    return Pushed(repo_id, branch, info.oid, info.commit_url, endpoint(), tuple(sorted(files)))


# ---------------------------------------------------------------- pull


@dataclass
class Fetched:
    """An adapter repository's files at one commit, downloaded to a temporary folder."""

    ref: HubRef
    commit: str
    folder: Path
    lineage: dict[str, Any] | None = None  # hatrack.json, when the repository has a readable one
    files: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{SCHEME}{self.ref.repo_id}@{self.commit[:12]}"

    def origin(self) -> dict[str, Any]:
        """What the registry records as the version's origin."""
        origin = {"kind": "hub", "endpoint": endpoint(), "repo_id": self.ref.repo_id,
                  "revision": self.ref.revision or "main", "commit": self.commit}
        pushed = (self.lineage or {}).get("version")
        if isinstance(pushed, dict) and isinstance(pushed.get("label"), str):
            origin["pushed_from"] = {"label": pushed["label"], "sha256": pushed.get("sha256")}
        return origin


@contextmanager
def fetch(ref: HubRef) -> Iterator[Fetched]:
    """Resolve the revision to a commit, refuse a repository whose weights are pickles only
    (register's rule, applied to the listing so they are never downloaded), then download
    just the adapter files of that commit. The folder is removed on exit."""
    from huggingface_hub import snapshot_download

    api = _api()
    with hub_errors("pull", ref.repo_id, ref.revision):
        info = api.model_info(ref.repo_id, revision=ref.revision)
    commit = info.sha
    if not commit:
        raise HubError(f"{endpoint()}: {ref.repo_id} answered without a commit sha for {ref.revision or 'main'}")
    names = [s.rfilename for s in info.siblings or []]
    label = f"{SCHEME}{ref.repo_id}@{commit[:12]}"
    try:
        adapter_format.refuse_pickle_listing(label, [n for n in names if "/" not in n])
    except adapter_format.AdapterFormatError as exc:
        from hatrack.registry.errors import ArtifactError

        raise ArtifactError(str(exc)) from None
    tmp = Path(tempfile.mkdtemp(prefix="hatrack-pull-"))
    try:
        with hub_errors("pull", ref.repo_id, ref.revision):
            folder = Path(snapshot_download(ref.repo_id, revision=commit, allow_patterns=list(PULLED_FILES),
                                            cache_dir=tmp / "cache", endpoint=endpoint()))
        present = sorted(n for n in PULLED_FILES if (folder / n).is_file())
        yield Fetched(ref, commit, folder, _read_lineage(folder / LINEAGE), present)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_lineage(path: Path) -> dict[str, Any] | None:
    """hatrack.json as pushed by hatrack; None when absent or not a JSON object (a
    repository pushed by other tools has none, and it is only ever informative)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


@contextmanager
def errors_named(folder: Path, label: str) -> Iterator[None]:
    """Register's errors name the temporary download folder: name the repository instead."""
    try:
        yield
    except HatrackError as exc:
        text = str(exc)
        if str(folder) in text:
            exc.args = (text.replace(str(folder), label),)
        raise


# ---------------------------------------------------------------- a registry version, both ways


def push_version(reg, ref: str, repo_id: str, *, base_model: str | None = None, private: bool = False,
                 revision: str | None = None, commit_message: str | None = None) -> tuple[Any, Pushed]:
    """Upload registry version `ref` (NAME, NAME@V, NAME@ALIAS) to `repo_id`: its artifact,
    verified against the recorded sha256, with the config naming the base's Hub id, a
    model card and hatrack.json. Returns (the version's record, what was pushed)."""
    from hatrack.integrations import model_card

    check_repo_id(repo_id)
    record = reg.version_of(ref)
    if base_model is not None and not _REPO_ID.match(base_model):
        raise HubError(f"--base-model {base_model!r}: not a Hub model id (expected OWNER/NAME)")
    base_id = base_model or adapter_format.hub_id(record.base_source)
    if base_id is None:
        raise HubError(
            f"{record.label}: its base {record.base_name!r} has no Hugging Face id (it came from "
            f"{record.base_source}), so the card and adapter_config.json could not name the base model; "
            f"give the Hub id of the same weights with --base-model OWNER/NAME")
    folder = reg.store.open(record.sha256, verify=True)  # the bytes the registry recorded, or an error
    info = reg.version_info(record.name, record.version)
    try:
        config = adapter_format.config_naming_base(folder, base_id)
    except adapter_format.AdapterFormatError as exc:
        raise HubError(str(exc)) from None
    card = model_card.build_card(info, base_id, repo_id)
    files: dict[str, Path | bytes] = {
        CONFIG: config,
        WEIGHTS: folder / WEIGHTS,
        CARD: str(card).encode(),
        LINEAGE: (json.dumps(model_card.lineage(info, base_id), indent=2, default=str) + "\n").encode(),
    }
    pushed = upload(files, repo_id, private=private, revision=revision,
                    commit_message=commit_message or f"Upload {record.label} (hatrack)")
    return record, pushed


def choose_base(reg, fetched: Fetched) -> str | None:
    """The registered base a pulled adapter belongs to: the one whose fingerprint its
    hatrack.json records, else the one added from the Hub id its adapter config names;
    None when neither is registered here (the caller then uses the default base)."""
    bases = reg.list_bases()
    recorded = ((fetched.lineage or {}).get("base") or {}).get("fingerprint")
    for b in bases:
        if recorded and b.fingerprint == recorded:
            return b.name
    try:
        named = adapter_format.read_config_json(fetched.folder).get("base_model_name_or_path")
    except adapter_format.AdapterFormatError:
        return None  # register names the problem
    for b in bases:
        if named and (adapter_format.hub_id(b.source) == named or b.name == named):
            return b.name
    return None


def imported_lineage(lineage: dict[str, Any] | None) -> dict[str, Any]:
    """The parts of a pulled hatrack.json that travel with the adapter (its dataset
    fingerprint, training config, seed, train metrics, quantization), each only when well
    formed. Scores stay behind: they were measured against another registry's base copy;
    `hatrack eval` measures here."""
    from hatrack.registry import DatasetInfo

    lineage = lineage or {}
    out: dict[str, Any] = {}
    dataset = lineage.get("dataset")
    if (isinstance(dataset, dict) and isinstance(dataset.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", dataset["sha256"]) and isinstance(dataset.get("rows"), int)
            and not isinstance(dataset.get("rows"), bool) and isinstance(dataset.get("source"), str)):
        out["dataset"] = DatasetInfo(dataset["sha256"], dataset["rows"], dataset["source"])
    for key in ("train_config", "train_metrics"):
        if isinstance(lineage.get(key), dict):
            out[key] = lineage[key]
    if isinstance(lineage.get("seed"), int) and not isinstance(lineage.get("seed"), bool):
        out["seed"] = lineage["seed"]
    if isinstance(lineage.get("quantization"), str) and 0 < len(lineage["quantization"]) <= 32:
        out["quantization"] = lineage["quantization"]
    return out
