"""Hub sharing against a small Hub-compatible HTTP server of our own on 127.0.0.1.

``FakeHub`` answers exactly the endpoints huggingface_hub 2.4 calls for ``create_repo``,
``create_branch``, ``upload_folder`` (validate-yaml, preupload, the git-LFS batch API + PUT + verify,
the NDJSON commit) and for ``snapshot_download`` (repo info, tree listing, resolve with HEAD/GET).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import lightning as L
import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants

from nested.adapter import NestedAdapter
from nested.backbone import DiffusionBackbone
from nested.callbacks import HubUpload
from nested.encoder import EncoderSpec
from nested.errors import ConfigError
from nested.hub.model_card import model_card
from nested.hub.push import push_adapter

SECRET = "hf_test_secret_123"
REPO = Path(__file__).resolve().parents[1]
LFS_SUFFIXES = (".safetensors", ".png", ".jpg", ".bin")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """An in-memory Hub: repos with branches and commits, an LFS store, served over HTTP."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.authorizations: set[str] = set()
        self.required_token: str | None = None  # if set, other tokens get 401
        self.unavailable = 0  # answer this many repo creations with 503 (a Hub that is down for a while)
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                hub._dispatch(self, "GET")

            def do_HEAD(self):
                hub._dispatch(self, "HEAD")

            def do_POST(self):
                hub._dispatch(self, "POST")

            def do_PUT(self):
                hub._dispatch(self, "PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FakeHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ----------------------------------------------------------------------------- helpers
    @staticmethod
    def _body(handler) -> bytes:
        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(handler.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    handler.rfile.readline()
                    return data
                data += handler.rfile.read(size)
                handler.rfile.readline()
        return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))

    @staticmethod
    def _send(handler, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None):
        body = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
        handler.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)

    def _commit(self, repo: dict, branch: str, files: dict, message: str) -> str:
        sha = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
        repo["commits"][sha] = {"files": files, "message": message}
        repo["branches"][branch] = sha
        return sha

    def _resolve(self, repo: dict, revision: str) -> str | None:
        revision = unquote(revision)
        if revision in repo["branches"]:
            return repo["branches"][revision]
        return revision if revision in repo["commits"] else None

    def _entry(self, path: str, data: bytes, lfs: bool) -> dict:
        return {
            "data": data,
            "lfs": lfs,
            "sha256": hashlib.sha256(data).hexdigest(),
            "sha1": git_blob_sha1(data),
        }

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return {
            path: e["data"] for path, e in repo["commits"][self._resolve(repo, revision)]["files"].items()
        }

    def commit_messages(self, repo_id: str) -> list[str]:
        return [commit["message"] for commit in self.repos[repo_id]["commits"].values()]

    # ----------------------------------------------------------------------------- routes
    def _dispatch(self, handler, method: str) -> None:
        path = urlsplit(handler.path).path
        with self.lock:
            self.requests.append((method, path))
            if handler.headers.get("Authorization"):
                self.authorizations.add(handler.headers["Authorization"])
        body = self._body(handler) if method in ("POST", "PUT") else b""
        if path == "/api/repos/create" and self.unavailable > 0:
            self.unavailable -= 1
            self._send(handler, 503, {"error": "Service Unavailable"})
            return
        if self.required_token and handler.headers.get("Authorization") != f"Bearer {self.required_token}":
            self._send(handler, 401, {"error": "Invalid credentials in Authorization header"})
            return
        routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>[^/]+)", self._create_branch),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", r"/__lfs/(?P<oid>[0-9a-f]{64})", self._lfs_put),
            ("POST", r"/__lfs/verify", self._lfs_verify),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self._commit_route),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", self._repo_info),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", self._tree),
            ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve_file),
            ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve_file),
        ]
        for route_method, pattern, handle in routes:
            match = re.fullmatch(pattern, path)
            if route_method == method and match:
                with self.lock:
                    handle(handler, body, **{k: v for k, v in match.groupdict().items() if v is not None})
                return
        self._send(handler, 404, {"error": f"no route {method} {path}"})

    def _repo_or_404(self, handler, repo_id: str) -> dict | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._send(handler, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        return repo

    def _create_repo(self, handler, body):
        payload = json.loads(body)
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.repos:
            self._send(
                handler, 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            )
            return
        repo = {"private": payload.get("visibility") == "private", "branches": {}, "commits": {}}
        attributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        self._commit(
            repo,
            "main",
            {".gitattributes": self._entry(".gitattributes", attributes, False)},
            "initial commit",
        )
        self.repos[repo_id] = repo
        self._send(handler, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, handler, body):
        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---", content, re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError as error:
            self._send(handler, 400, {"errors": [{"message": str(error)}]})
            return
        warnings = [] if metadata else [{"message": "empty or missing yaml metadata"}]
        self._send(handler, 200, {"errors": [], "warnings": warnings})

    def _create_branch(self, handler, body, repo, rev):
        state = self._repo_or_404(handler, repo)
        if state is None:
            return
        if unquote(rev) in state["branches"]:
            self._send(handler, 409, {"error": "Reference already exists"})
            return
        start = json.loads(body or b"{}").get("startingPoint", "main")
        state["branches"][unquote(rev)] = self._resolve(state, start)
        self._send(handler, 200, {})

    def _preupload(self, handler, body, repo, rev):
        state = self._repo_or_404(handler, repo)
        if state is None:
            return
        commit = self._resolve(state, rev)
        existing = state["commits"][commit]["files"] if commit else {}
        files = []
        for item in json.loads(body)["files"]:
            lfs = item["path"].endswith(LFS_SUFFIXES) or item["size"] > 10_000_000
            old = existing.get(item["path"])
            oid = None if old is None else (old["sha256"] if old["lfs"] else old["sha1"])
            mode = "lfs" if lfs else "regular"
            files.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send(handler, 200, {"files": files, "commitOid": commit})

    def _lfs_batch(self, handler, body, repo):
        if self._repo_or_404(handler, repo) is None:
            return
        payload = json.loads(body)
        objects = []
        for item in payload["objects"]:
            entry = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in self.lfs:
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/__lfs/{item['oid']}"},
                    "verify": {"href": f"{self.url}/__lfs/verify"},
                }
            objects.append(entry)
        self._send(handler, 200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, handler, body, oid):
        if hashlib.sha256(body).hexdigest() != oid:
            self._send(handler, 400, {"error": "sha256 mismatch"})
            return
        self.lfs[oid] = body
        self._send(handler, 200, {})

    def _lfs_verify(self, handler, body):
        payload = json.loads(body)
        ok = payload["oid"] in self.lfs and len(self.lfs[payload["oid"]]) == payload["size"]
        self._send(handler, 200 if ok else 404, {})

    def _commit_route(self, handler, body, repo, rev):
        state = self._repo_or_404(handler, repo)
        if state is None:
            return
        branch = unquote(rev)
        parent = state["branches"].get(branch)
        if parent is None:
            self._send(handler, 404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
            return
        files = dict(state["commits"][parent]["files"])
        message = ""
        for line in body.decode().splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                message = value["summary"]
            elif item["key"] == "file":
                files[value["path"]] = self._entry(value["path"], base64.b64decode(value["content"]), False)
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    self._send(handler, 422, {"error": f"LFS object {value['oid']} was never uploaded"})
                    return
                files[value["path"]] = self._entry(value["path"], self.lfs[value["oid"]], True)
            elif item["key"] == "deletedFile":
                files.pop(value["path"], None)
        sha = self._commit(state, branch, files, message)
        self._send(
            handler, 200, {"commitUrl": f"{self.url}/{repo}/commit/{sha}", "commitOid": sha, "success": True}
        )

    def _repo_info(self, handler, body, repo, rev="main"):
        state = self._repo_or_404(handler, repo)
        if state is None:
            return
        sha = self._resolve(state, rev)
        if sha is None:
            self._send(handler, 404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
            return
        files = state["commits"][sha]["files"]
        info = {
            "id": repo,
            "modelId": repo,
            "sha": sha,
            "private": state["private"],
            "siblings": [{"rfilename": name} for name in sorted(files)],
            "tags": [],
        }
        self._send(handler, 200, info)

    def _tree(self, handler, body, repo, rev, sub=""):
        state = self._repo_or_404(handler, repo)
        if state is None:
            return
        sha = self._resolve(state, rev)
        if sha is None:
            self._send(handler, 404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
            return
        entries = []
        for name, entry in sorted(state["commits"][sha]["files"].items()):
            if sub and not name.startswith(sub.rstrip("/") + "/"):
                continue
            item = {"type": "file", "path": name, "size": len(entry["data"]), "oid": entry["sha1"]}
            if entry["lfs"]:
                item["lfs"] = {"oid": entry["sha256"], "size": len(entry["data"]), "pointerSize": 134}
            entries.append(item)
        self._send(handler, 200, entries)

    def _resolve_file(self, handler, body, repo, rev, file):
        state = self._repo_or_404(handler, repo)
        if state is None:
            return
        sha = self._resolve(state, rev)
        entry = state["commits"][sha]["files"].get(unquote(file)) if sha else None
        if entry is None:
            self._send(
                handler,
                404,
                {"error": "Entry not found"},
                {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha or ""},
            )
            return
        etag = entry["sha256"] if entry["lfs"] else entry["sha1"]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"'}
        if entry["lfs"]:
            headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(entry["data"]))}
        self._send(handler, 200, headers=headers, raw=entry["data"])


class HangingHub:
    """A Hub that accepts connections and reads requests but never answers (a network black hole).

    ``accepted`` counts connections, ``open`` those whose client has not closed them yet.
    """

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.accepted = self.open = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:  # closed
                return
            with self.lock:
                self.accepted += 1
                self.open += 1
            threading.Thread(target=self._drain, args=(connection,), daemon=True).start()

    def _drain(self, connection) -> None:
        with connection:
            while connection.recv(1 << 16):
                pass
        with self.lock:
            self.open -= 1

    def wait_for(self, condition, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if condition(self):
                    return True
            time.sleep(0.1)
        return False


# --------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running FakeHub; huggingface_hub pointed at it with a private cache and a fake token."""
    server = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads these at import time.
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # our server speaks git-LFS, not Xet
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield server
    if server.thread.is_alive():
        server.stop()


@pytest.fixture(scope="module")
def sd_backbone(tiny_sd_path):
    return DiffusionBackbone.from_pretrained(tiny_sd_path)


def make_adapter(backbone, image_encoder, token="<person>", class_word="person", seed=0, **kwargs):
    torch.manual_seed(seed)
    spec = EncoderSpec(backbone=str(image_encoder), num_tokens=6, width=32, depth=1, heads=2)
    adapter = NestedAdapter.for_unet(
        backbone.unet, token=token, class_word=class_word, encoder=spec, **kwargs
    )
    for layer in adapter.layers.values():
        torch.nn.init.normal_(layer.to_k.weight, std=0.5)
        torch.nn.init.normal_(layer.to_v.weight, std=0.5)
    return adapter.eval()


@pytest.fixture
def adapter_dir(sd_backbone, tiny_sd_path, tmp_path):
    adapter = make_adapter(
        sd_backbone,
        tiny_sd_path / "image_encoder",
        domain="faces",
        base_model="stabilityai/stable-diffusion-2-1",
    )
    return adapter.save_pretrained(tmp_path / "faces-adapter")


# --------------------------------------------------------------------------------------- tests
def test_model_card_yaml_parses_and_has_the_metadata(adapter_dir, tmp_path):
    (adapter_dir / "samples").mkdir()
    (adapter_dir / "samples" / "grid.png").write_bytes(b"\x89PNG fake")
    config = {"model": {"learning_rate": 1e-4, "encoder": {"num_tokens": 6}}, "trainer": {"max_steps": 100}}
    config["trainer"]["logger"] = {"init_args": {"api_key": "supersecret"}}
    text = model_card(adapter_dir, repo_id="me/faces", license="openrail++", training_config=config)
    card = ModelCard(text)
    data = card.data.to_dict()
    assert data["base_model"] == "stabilityai/stable-diffusion-2-1"
    assert data["library_name"] == "nested" and data["pipeline_tag"] == "text-to-image"
    assert data["license"] == "openrail++" and "nested-attention" in data["tags"] and "faces" in data["tags"]
    assert data["subject_token"] == "<person>" and data["domain"] == "faces" and data["num_tokens"] == 6
    assert data["encoder"].endswith("image_encoder")
    assert 'NestedPipeline.from_pretrained("stabilityai/stable-diffusion-2-1"' in card.text
    assert "nested generate" in card.text and "learning_rate: 0.0001" in card.text
    assert "![sample](samples/grid.png)" in card.text
    assert "supersecret" not in text and "max_steps: 100" in text  # only trainer scalars kept
    assert "`--align-face '<person>'` (CLI) or `nested.data.faces.aligned_subject_face(photo)`" in card.text

    pets = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**pets, "domain": "pets"}))
    assert "--align-face" not in model_card(adapter_dir)  # a faces domain's card only
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**pets, "domain": "surfaces"}))
    assert "--align-face" not in model_card(adapter_dir)

    # A local base model path is described, but not put in the Hub metadata (it must be a repo id).
    config_path = adapter_dir / "adapter_config.json"
    raw = json.loads(config_path.read_text())
    raw["base_model"] = str(tmp_path)
    config_path.write_text(json.dumps(raw))
    assert "base_model" not in ModelCard(model_card(adapter_dir)).data.to_dict()


def test_push_then_load_by_repo_id_gives_identical_outputs(hub, adapter_dir, sd_backbone, tiny_sd_path):
    info = push_adapter(adapter_dir, "me/faces", commit_message="first upload")
    assert info.oid in hub.repos["me/faces"]["commits"]
    files = hub.files("me/faces")
    assert {"adapter.safetensors", "adapter_config.json", "README.md"} <= set(files)
    assert hub.repos["me/faces"]["commits"][info.oid]["files"]["adapter.safetensors"][
        "lfs"
    ]  # via the LFS API
    assert any(path.endswith("/info/lfs/objects/batch") for _, path in hub.requests)
    assert hub.authorizations == {f"Bearer {SECRET}"}  # the token came from the environment
    assert SECRET not in files["README.md"].decode()
    ModelCard(files["README.md"].decode())  # parses

    # A second push of unchanged files makes no new commit; a branch push pins a revision.
    push_adapter(adapter_dir, "me/faces")
    assert hub.commit_messages("me/faces") == ["initial commit", "first upload"]
    push_adapter(adapter_dir, "me/faces", revision="v1")
    assert hub.repos["me/faces"]["branches"]["v1"] == hub.repos["me/faces"]["branches"]["main"]

    local = NestedAdapter.from_pretrained(adapter_dir)
    remote = NestedAdapter.from_pretrained("me/faces", revision="v1")
    assert remote.config == local.config
    images = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        tokens_local, tokens_remote = local.encode(images), remote.encode(images)
    assert torch.equal(tokens_local, tokens_remote)
    for key, layer in local.layers.items():
        assert torch.equal(layer.to_v.weight, remote.layers[key].to_v.weight)
    # End to end through the UNet, loaded by repo id.
    from test_pipeline import generate, tiny_pipeline

    from nested.inference.pipeline import NestedPipeline

    pipe = tiny_pipeline(tiny_sd_path)
    subjects = {"<person>": images[:1]}
    with NestedPipeline(pipe, {"<person>": adapter_dir}) as nested:
        expected = generate(nested, "a <person> on the beach", subjects=subjects)
    with NestedPipeline(pipe, {"<person>": "me/faces@v1"}) as nested:
        assert torch.equal(generate(nested, "a <person> on the beach", subjects=subjects), expected)

    # Offline (HF_HUB_OFFLINE=1), a cached repo still loads; the server is not asked again.
    asked = len(hub.requests)
    hub.stop()
    constants.HF_HUB_OFFLINE = True  # restored by the fixture's monkeypatch
    offline = NestedAdapter.from_pretrained("me/faces", revision="v1")
    assert offline.config == local.config and len(hub.requests) == asked


class _WebPage(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"<html><body>a web page</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_an_adapter_the_hub_cannot_give_is_one_line_and_a_bug_keeps_its_traceback(
    hub, adapter_dir, monkeypatch
):
    from nested.errors import HubError, StorageError

    # huggingface_hub retries a download 5 times with backoff: at once here.
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda seconds: None)
    push_adapter(adapter_dir, "me/faces")
    with pytest.raises(HubError) as missing:
        NestedAdapter.from_pretrained("me/no-such-adapter")
    message = str(missing.value)
    assert message.startswith(
        "could not download adapter 'me/no-such-adapter' (revision main) from the Hub: "
    )
    assert "404" in message and "\n" not in message and SECRET not in message
    with pytest.raises(HubError, match="revision nope") as missing:
        NestedAdapter.from_pretrained("me/faces", revision="nope")
    assert ".. " not in str(missing.value)
    # A cache folder that cannot be written is the user's to fix, named.
    blocked = Path(constants.HF_HOME) / "a-file"
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("")
    with monkeypatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(blocked))
        with pytest.raises(StorageError, match=f"into the Hugging Face cache {re.escape(str(blocked))}: "):
            NestedAdapter.from_pretrained("me/faces", revision="main")
    dead = _dead_endpoint(monkeypatch)
    with pytest.raises(HubError, match=f"no answer from the Hub at {re.escape(dead)}"):
        NestedAdapter.from_pretrained("me/faces", revision="main")
    # HF_ENDPOINT naming a server that is not a Hub (here one that answers every request with a web page).
    not_a_hub = ThreadingHTTPServer(("127.0.0.1", 0), _WebPage)
    threading.Thread(target=not_a_hub.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{not_a_hub.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    try:
        with pytest.raises(
            HubError, match=f"the server at {re.escape(url)} .* did not answer as a Hugging Face Hub"
        ):
            NestedAdapter.from_pretrained("me/faces", revision="main")
    finally:
        not_a_hub.shutdown()
        not_a_hub.server_close()

    def broken_download(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'endpoint'")

    monkeypatch.setattr("nested.adapter.snapshot_download", broken_download)
    with pytest.raises(AttributeError, match="no attribute 'endpoint'"):
        NestedAdapter.from_pretrained("me/faces", revision="main")


def test_push_command_line_then_generate_from_the_repo(hub, adapter_dir, tiny_sd_path, tmp_path, capsys):
    from PIL import Image

    from nested.cli.generate import main_generate
    from nested.cli.push import main_push

    argv = [str(adapter_dir), "me/cli", "--private", "--commit-message", "from the CLI"]
    assert main_push([*argv, "--base-model", "stabilityai/sdxl-turbo"]) == 0
    assert hub.repos["me/cli"]["private"] and "from the CLI" in hub.commit_messages("me/cli")
    # Every option reaches the push process: the card names the base model given on the command line.
    assert ModelCard(hub.files("me/cli")["README.md"].decode()).data.base_model == "stabilityai/sdxl-turbo"
    out = capsys.readouterr()
    assert "me/cli" in out.out and SECRET not in out.out + out.err
    assert main_push([str(adapter_dir.parent / "missing"), "me/cli"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nested push: error:") and "does not exist" in err and "\n" not in err

    Image.new("RGB", (40, 48), (200, 120, 40)).save(tmp_path / "me.png")
    argv = [
        "--base",
        str(tiny_sd_path),
        "--adapter",
        "<person>=me/cli@main",
        "--subject",
        f"<person>={tmp_path / 'me.png'}",
    ]
    argv += [
        "--prompt",
        "a <person> on the beach",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    assert main_generate(argv) == 0
    settings = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert (
        settings["adapters"]["<person>"]["source"] == "me/cli"
        and settings["adapters"]["<person>"]["revision"] == "main"
    )
    assert SECRET not in (tmp_path / "out" / "generation.json").read_text()


class _ExportingModule(L.LightningModule):
    """A few optimizer steps on a real (tiny) adapter, exported by the real AdapterExport callback."""

    def __init__(self, adapter):
        super().__init__()
        self.adapter = adapter

    def training_step(self, batch, batch_idx):
        return sum(layer.to_v.weight.square().mean() for layer in self.adapter.layers.values())

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.adapter.parameters(), lr=0.1)


def _fit(root: Path, adapter, upload: HubUpload, export=None, max_steps: int = 4) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from nested.callbacks.export import AdapterExport

    trainer = L.Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(every_n_train_steps=2, save_top_k=-1), export or AdapterExport(), upload],
    )
    trainer.fit(_ExportingModule(adapter))
    return trainer


def _files_containing(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def test_export_keep_deletes_the_oldest_step_exports_while_hub_upload_runs(
    hub, sd_backbone, tiny_sd_path, tmp_path, caplog
):
    """export.keep bounds the exports of a long run; uploads go on from their snapshots. The upload callback
    lists the exports after each checkpoint save, not after every step."""
    from nested.callbacks.export import AdapterExport

    adapter = make_adapter(sd_backbone, tiny_sd_path / "image_encoder", domain="faces")
    exports = tmp_path / "run" / "adapters"
    (exports / "step=1-notes").mkdir(parents=True)  # not an export's name: never deleted
    upload = HubUpload("me/run", backoff=0.05, final_timeout=60, poll_interval=0.2)
    scans = []
    scan = upload._scan
    # Counted in the training loop only: the background thread also scans, every poll_interval.
    upload._scan = lambda: (
        threading.current_thread() is threading.main_thread() and scans.append(1),
        scan(),
    )[1]
    with caplog.at_level(logging.INFO):
        _fit(tmp_path / "run", adapter, upload, export=AdapterExport(keep=2), max_steps=8)
    assert sorted(p.name for p in exports.iterdir()) == ["last", "step=1-notes", "step=6", "step=8"]
    assert upload.uploaded[-1] == "last" and "nested push" not in caplog.text
    assert 4 <= len(scans) <= 4 + 1  # after each of the 4 saves, and at the end (8 steps)
    with pytest.raises(ConfigError, match="export.keep must be at least 1"):
        AdapterExport(keep=0)


def test_export_keep_orders_the_exports_by_step_number_not_by_name(tmp_path):
    """A long run passes step=10: 'step=9' sorts after 'step=10' by name."""
    from nested.callbacks.export import AdapterExport

    for step in (8, 9, 10, 11):
        (tmp_path / f"step={step}").mkdir()
    AdapterExport(keep=2)._delete_older_exports(tmp_path / "step=11")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=10", "step=11"]


def test_export_keep_deletes_nothing_on_a_rank_that_does_not_export(tmp_path):
    """Only global rank 0 exports; the other ranks of a DDP run must not race it to delete the same folders."""
    from nested.callbacks.export import AdapterExport

    for step in (1, 2, 3):
        (tmp_path / "adapters" / f"step={step}").mkdir(parents=True)
    trainer = types.SimpleNamespace(
        global_step=4, is_global_zero=False, default_root_dir=str(tmp_path), callbacks=[]
    )
    AdapterExport(keep=1)._export_step(trainer, pl_module=None)
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["step=1", "step=2", "step=3"]


def test_an_export_that_cannot_be_deleted_is_named_and_training_goes_on(tmp_path, monkeypatch):
    from nested.callbacks import export

    for step in (1, 2, 3):
        (tmp_path / f"step={step}").mkdir()

    def refuse(folder):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(export, "remove_directory", refuse)
    with pytest.warns(
        UserWarning, match=r"export.keep could not delete .*step=1 \(\[Errno 13\] Permission denied"
    ):
        export.AdapterExport(keep=2)._delete_older_exports(tmp_path / "step=3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=1", "step=2", "step=3"]


def test_hub_upload_callback_uploads_the_newest_export_in_the_background(
    hub, sd_backbone, tiny_sd_path, tmp_path, caplog
):
    adapter = make_adapter(sd_backbone, tiny_sd_path / "image_encoder", domain="faces")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"model": {"learning_rate": 0.1}}))
    upload = HubUpload("me/run", backoff=0.05, final_timeout=60, poll_interval=0.2)
    with caplog.at_level(logging.INFO):
        _fit(tmp_path / "run", adapter, upload)
    exports = tmp_path / "run" / "adapters"
    assert upload.uploaded[-1] == "last"
    # Every export was uploaded, or dropped for a newer one (only the newest matters).
    assert set(upload.uploaded) | set(upload.not_uploaded) == {"step=2", "step=4", "last"}
    assert all(why.startswith("superseded by the newer export") for why in upload.not_uploaded.values())
    # The end report offers no push of an older export: it would replace the newer one at the repo root.
    assert "nested push" not in caplog.text
    if upload.not_uploaded:  # how many the uploads skipped depends on their timing
        older = ", ".join(sorted(upload.not_uploaded))
        assert (
            f"older export(s) not uploaded to me/run ({older}): its root holds the newer last." in caplog.text
        )
    else:
        assert "not uploaded" not in caplog.text
    files = hub.files("me/run")
    assert files["adapter.safetensors"] == (exports / "last" / "adapter.safetensors").read_bytes()
    assert "nested: adapter export (last)" in hub.commit_messages("me/run")
    assert "learning_rate: 0.1" in files["training_config.yaml"].decode()
    assert "## Training" in files["README.md"].decode()
    # The export folders are left as the export callback wrote them (no snapshot left); the token is nowhere.
    assert sorted(p.name for p in (exports / "last").iterdir()) == [
        "adapter.safetensors",
        "adapter_config.json",
    ]
    assert sorted(p.name for p in exports.iterdir()) == ["last", "step=2", "step=4"]
    assert _files_containing(tmp_path / "run", SECRET) == []
    assert all(SECRET.encode() not in data for data in files.values())


def _dead_endpoint(monkeypatch) -> str:
    """Point huggingface_hub (here and in child processes) at a port where nothing listens."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    # Derived from ENDPOINT at import (as HF_ENDPOINT does in a fresh process): file downloads use it.
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}"
    )
    return dead


def test_a_base_model_hub_id_with_no_answer_from_the_hub_is_one_line_naming_the_hub(
    adapter_dir, tmp_path, monkeypatch, capsys
):
    from PIL import Image
    from skimage import data

    from nested.cli.main import main

    dead = _dead_endpoint(monkeypatch)
    # huggingface_hub retries a download 5 times with backoff: at once here.
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda seconds: None)
    image = tmp_path / "me.png"
    Image.fromarray(data.astronaut()).save(image)
    argv = ["generate", "--base", "me/no-such-base", "--adapter", f"<person>={adapter_dir}", "--subject",
            f"<person>={image}", "--prompt", "a photo of <person>", "--out", str(tmp_path / "out"), "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(
        f"nested generate: error: cannot download 'me/no-such-base': no answer from the Hub at {dead} (from "
        "HF_ENDPOINT) (ConnectError: [Errno 111] Connection refused)"
    )
    assert line.endswith(
        ", and it is not in the local cache. Check the network, or HF_ENDPOINT; or pass a local folder."
    )
    assert not (tmp_path / "out").exists()
    # Offline by choice, nothing was asked: the advice is the cache's.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no answer" not in line and "Offline, a Hub id must already be in the local cache" in line


def _listed_commands(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("nested push ")]


def test_unreachable_hub_does_not_stop_training(
    hub, sd_backbone, tiny_sd_path, tmp_path, monkeypatch, caplog
):
    dead = _dead_endpoint(monkeypatch)
    adapter = make_adapter(sd_backbone, tiny_sd_path / "image_encoder")
    upload = HubUpload("me/run", max_retries=1, backoff=0.05, final_timeout=60, poll_interval=0.2)
    with caplog.at_level(logging.INFO):
        trainer = _fit(tmp_path / "run", adapter, upload)
    last = tmp_path / "run" / "adapters" / "last"
    assert trainer.global_step == 4 and (last / "adapter.safetensors").is_file()
    assert upload.uploaded == [] and "last" in upload.not_uploaded
    assert f"could not reach the Hub at {dead} (from HF_ENDPOINT)" in upload.not_uploaded["last"]
    retries = [r.getMessage() for r in caplog.records if "retry 1/1" in r.getMessage()]
    assert retries and "Connection refused" in retries[0]
    # The newest export is listed last, with the command that uploads it later.
    commands = _listed_commands(caplog.text)
    assert commands[-1] == f"nested push {last.resolve()} me/run --private"
    assert SECRET not in caplog.text and _files_containing(tmp_path / "run", SECRET) == []


def _export(adapter_dir: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("adapter.safetensors", "adapter_config.json"):
        (folder / name).write_bytes((adapter_dir / name).read_bytes())
    return folder


def test_upload_retries_with_backoff_and_gives_up_at_once_on_auth_errors(hub, adapter_dir, tmp_path, caplog):
    _export(adapter_dir, tmp_path / "adapters" / "step=1")
    upload = HubUpload("me/r", max_retries=3, backoff=0.05, max_backoff=0.08)
    upload._root = tmp_path / "adapters"
    hub.unavailable = 2  # the Hub answers 503 twice, then works
    with caplog.at_level(logging.WARNING, logger="nested.hub"):
        upload._upload_with_retries("step=1")
    assert re.findall(r"retry \d/3 in ([\d.]+) s", caplog.text) == ["0.05", "0.08"]  # doubling, capped
    assert upload.uploaded == ["step=1"] and "adapter.safetensors" in hub.files("me/r")
    assert "503" in caplog.text and "push again later" in caplog.text

    hub.required_token = "hf_the_right_one_456"
    creates = sum(path == "/api/repos/create" for _, path in hub.requests)
    upload._upload_with_retries("step=1")  # 401: retrying cannot help
    assert sum(path == "/api/repos/create" for _, path in hub.requests) == creates + 1
    assert "refused the push to me/r" in upload.not_uploaded["step=1"]
    assert "401" in upload.not_uploaded["step=1"]


@pytest.mark.parametrize("damage", ["pickle", "truncated", "dims"])
def test_an_adapter_that_cannot_be_loaded_is_never_uploaded(hub, adapter_dir, tmp_path, capsys, damage):
    from nested.cli.push import main_push

    weights, config = adapter_dir / "adapter.safetensors", adapter_dir / "adapter_config.json"
    if damage == "pickle":  # a pickle named adapter.safetensors
        torch.save({"a": torch.zeros(2)}, weights)
        expected = f"{weights} is not a valid safetensors file"
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-64])
        expected = f"{weights} is not a valid safetensors file"
    else:
        raw = json.loads(config.read_text())
        raw["encoder"]["num_tokens"] = 9
        config.write_text(json.dumps(raw))
        expected = f"{config} does not match {weights}: encoder.num_tokens is 9 but tensor resampler.latents"

    assert main_push([str(adapter_dir), "me/bad"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nested push: error:") and expected in err and err.count("\n") == 1
    assert hub.requests == []  # not a byte left the machine

    # The training callback checks the same way: reported, not uploaded, not retried.
    _export(adapter_dir, tmp_path / "adapters" / "step=3")
    upload = HubUpload("me/bad", max_retries=3, backoff=0.05)
    upload._root = tmp_path / "adapters"
    upload._upload_with_retries("step=3")
    named = expected.replace(str(adapter_dir), str(tmp_path / "adapters" / "step=3"))
    assert upload.uploaded == [] and upload.not_uploaded["step=3"].startswith(named)
    assert hub.requests == []


def test_push_refuses_a_bad_repo_id_and_an_unreadable_training_config_in_one_line(
    hub, adapter_dir, tmp_path, capsys
):
    from nested.cli.push import main_push

    bad_yaml, text = tmp_path / "config.yaml", tmp_path / "notes.txt"
    bad_yaml.write_text("trainer: [1,\n")
    text.write_text("trained on my photos\n")  # valid YAML: one string
    binary = tmp_path / "photo.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n")
    other, empty = tmp_path / "other.yaml", tmp_path / "empty.yaml"
    other.write_text("a: 1\n")  # a mapping, but no run's
    empty.write_text("")
    for argv, expected in (
        (["me/x", "--training-config", str(other)], f"--training-config {other} holds no run configuration"),
        (["me/x", "--training-config", str(empty)], f"--training-config {empty} holds no run configuration"),
        (["not a repo id!!"], "the repo id 'not a repo id!!' must look like 'user/name'"),
        (
            ["me/x", "--training-config", str(bad_yaml)],
            f"--training-config {bad_yaml} is not readable YAML (",
        ),
        (["me/x", "--training-config", str(text)], f"--training-config {text} holds no run configuration"),
        (
            ["me/x", "--training-config", str(tmp_path)],
            f"--training-config {tmp_path} is a folder; give the run's config.yaml\n",
        ),
        (["me/x", "--training-config", str(binary)], f"--training-config {binary} is not UTF-8 text: "),
    ):
        assert main_push([str(adapter_dir), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"nested push: error: {expected}") and err.count("\n") == 1
        assert "config.yaml" in err or "repo id" in err  # what to give instead
    assert hub.requests == []


def test_push_to_an_unreachable_hub_names_the_endpoint_and_where_it_came_from(
    adapter_dir, tmp_path, monkeypatch
):
    dead = _dead_endpoint(monkeypatch)
    nested = Path(sys.executable).with_name("nested")
    result = subprocess.run(
        [str(nested), "push", str(adapter_dir), "me/x"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith(f"nested push: error: could not reach the Hub at {dead} (from HF_ENDPOINT)")
    assert "Connection refused" in line

    # The default endpoint is named as the default (offline: no request is even tried).
    monkeypatch.delenv("HF_ENDPOINT")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = subprocess.run(
        [str(nested), "push", str(adapter_dir), "me/x"], capture_output=True, text=True, timeout=120
    )
    assert (
        result.returncode == 2 and "Hub at https://huggingface.co (the default; HF_ENDPOINT" in result.stderr
    )


def test_push_to_a_hub_that_never_answers_stops_at_the_timeout(adapter_dir, monkeypatch):
    """huggingface_hub sets no timeout on its requests: without --timeout this command would wait forever.

    The timeout counts from the push process's start, which imports torch: 30 s leave a loaded machine time
    to reach the server before it runs out."""
    hanging = HangingHub()
    monkeypatch.setenv("HF_ENDPOINT", hanging.url)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    nested = Path(sys.executable).with_name("nested")
    started = time.monotonic()
    result = subprocess.run(
        [str(nested), "push", str(adapter_dir), "me/x", "--timeout", "30"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "nested push: error: no result within 30 s (--timeout); stopped"
    assert time.monotonic() - started < 90
    assert hanging.accepted >= 1  # the push did reach the server, and was stopped there
    assert hanging.wait_for(lambda h: h.open == 0, timeout=30), "the push process outlived the command"


def test_a_bug_in_the_push_process_ends_the_command_with_its_traceback(adapter_dir, tmp_path, monkeypatch):
    """An exception that is not a user error, raised in the push's child process, is a bug: the command exits
    1 and shows the child's whole traceback (here 12 frames deep) instead of dressing it up as a one-line
    error."""
    injected = tmp_path / "injected"
    injected.mkdir()
    # Python imports sitecustomize from PYTHONPATH at start-up, in the command and in its push process.
    calls = "".join(f"def call_{n}():\n    call_{n + 1}()\n" for n in range(12))
    (injected / "sitecustomize.py").write_text(
        "import nested.hub.push\n"
        f"{calls}"
        "def call_12():\n"
        "    raise ZeroDivisionError('a bug in the push')\n"
        "def push_adapter(*args, **kwargs):\n"
        "    call_0()\n"
        "nested.hub.push.push_adapter = push_adapter\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(injected))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nested = Path(sys.executable).with_name("nested")
    result = subprocess.run(
        [str(nested), "push", str(adapter_dir), "me/x"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(
        "nested push: the push process exited 1:\nTraceback (most recent call last):"
    )
    assert result.stderr.rstrip().endswith("ZeroDivisionError: a bug in the push")
    assert all(f"in call_{n}\n" in result.stderr for n in range(13))
    assert "error:" not in result.stderr and result.stdout == ""


class _Interrupted(Exception):
    pass


def test_the_wait_at_the_end_of_fit_is_interruptible_and_stops_the_push(
    sd_backbone, tiny_sd_path, tmp_path, monkeypatch, caplog
):
    """A signal handler that raises (as a second stop signal may) ends the wait at once; no push outlives it."""
    hanging = HangingHub()
    monkeypatch.setenv("HF_ENDPOINT", hanging.url)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    upload = HubUpload("me/run", final_timeout=600, poll_interval=0.2)

    def interrupt_during_the_wait():
        if hanging.wait_for(lambda h: h.accepted and upload._closing, timeout=300):
            os.kill(os.getpid(), signal.SIGUSR2)

    def raise_interrupted(signum, frame):
        raise _Interrupted

    previous = signal.signal(signal.SIGUSR2, raise_interrupted)
    threading.Thread(target=interrupt_during_the_wait, daemon=True).start()
    started = time.monotonic()
    try:
        with caplog.at_level(logging.INFO), pytest.raises(_Interrupted):
            _fit(tmp_path / "run", make_adapter(sd_backbone, tiny_sd_path / "image_encoder"), upload)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert time.monotonic() - started < 300  # final_timeout is 600 s: the wait did not run out
    assert upload.not_uploaded["last"] == "still uploading when the run ended"
    last = (tmp_path / "run" / "adapters" / "last").resolve()
    assert _listed_commands(caplog.text)[-1] == f"nested push {last} me/run --private"
    assert hanging.wait_for(lambda h: h.open == 0, timeout=30), "a push process outlived the run"


def test_a_stop_signal_gives_the_uploads_a_bounded_grace_then_lists_the_push_commands(tiny_sd_path, tmp_path):
    """`nested fit` with the Hub unreachable (it never answers) and SIGUSR1, as SLURM's --signal=USR1@90 sends:
    the run exits within the 90 s, and lists the command that uploads each export it could not."""
    hanging = HangingHub()
    root = tmp_path / "run"
    config = tmp_path / "fit.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "seed_everything": 0,
                "trainer": {
                    "accelerator": "cpu",
                    "max_steps": 100000,  # ends by the signal only
                    "logger": False,
                    "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "num_sanity_val_steps": 0,
                    "default_root_dir": str(root),
                    "callbacks": [
                        {
                            "class_path": "nested.callbacks.HubUpload",
                            "init_args": {"repo_id": "me/run", "grace_seconds": 5, "poll_interval": 0.5},
                        }
                    ],
                },
                "model": {
                    "base_model": str(tiny_sd_path),
                    "encoder": {
                        "backbone": str(tiny_sd_path / "image_encoder"),
                        "num_tokens": 4,
                        "width": 32,
                        "depth": 1,
                        "heads": 2,
                    },
                    "subjects": {"<person>": "person"},
                },
                "data": {
                    "domains": [
                        {
                            "name": "faces",
                            "urls": str(REPO / "data/demo/faces/shards.json"),
                            "subject": "<person>",
                        }
                    ],
                    "resolution": 64,
                    "reference_size": 32,
                    "batch_size": 2,
                    "num_workers": 0,
                    "epoch_samples": 8,  # an epoch end (a checkpoint, an export) every 4 steps
                    "shuffle_buffer": 8,
                    "open_shards": 2,
                },
            }
        )
    )
    env = dict(os.environ, HF_ENDPOINT=hanging.url, HF_TOKEN=SECRET, OMP_NUM_THREADS="1")
    log_path = tmp_path / "fit.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("nested")), "fit", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
    try:
        # Signal once an export's upload is in progress (and hanging).
        uploading = hanging.wait_for(lambda h: h.accepted or process.poll() is not None, timeout=600)
        assert uploading and process.poll() is None, log_path.read_text()[-3000:]
        process.send_signal(signal.SIGUSR1)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("nested fit was still running 90 s after SIGUSR1:\n" + log_path.read_text()[-3000:])
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log_path.read_text()
    assert list(root.glob("hpc_ckpt_*.ckpt")), output[-3000:]
    exports = [p for p in (root / "adapters").iterdir() if (p / "adapter.safetensors").is_file()]
    newest = max(exports, key=lambda p: (p / "adapter.safetensors").stat().st_mtime_ns)
    commands = _listed_commands(output)
    config_yaml = (root / "config.yaml").resolve()
    assert commands[-1] == f"nested push {newest.resolve()} me/run --private --training-config {config_yaml}"
    listed = [Path(shlex.split(command)[2]) for command in commands]
    assert all((path / "adapter.safetensors").is_file() for path in listed)
    assert hanging.wait_for(lambda h: h.open == 0, timeout=30), "a push process outlived nested fit"
    assert SECRET not in output


def test_push_of_an_unfinished_run_warns_in_one_line_and_pushes(hub, adapter_dir, capsys):
    from nested.cli.push import main_push

    config = adapter_dir / "adapter_config.json"
    raw = json.loads(config.read_text())
    raw["training"] = {"step": 3, "complete": False}
    config.write_text(json.dumps(raw))
    assert main_push([str(adapter_dir), "me/partial"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        f"nested push: warning: {adapter_dir} is the export of a run that had not finished "
        "(adapter_config.json: training.complete is false); pushing it as it is"
    ]
    assert "me/partial" in hub.repos

    raw["training"]["complete"] = True
    config.write_text(json.dumps(raw))
    assert main_push([str(adapter_dir), "me/complete"]) == 0
    assert "warning" not in capsys.readouterr().err
