"""The HTTP front of the emulator: Kubernetes core/v1 REST paths over ``http.server``."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ._cluster import Cluster
from ._model import ApiError

__all__ = ["ApiCall", "ApiServer"]

log = logging.getLogger(__name__)

KUBERNETES_VERSION = {
    "major": "1",
    "minor": "33",
    "gitVersion": "v1.33.0-emulator",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "go1.24",
    "compiler": "gc",
    "platform": "linux/amd64",
}
_RESOURCES = ("pods", "secrets", "configmaps", "events")
_PUBLIC_PATHS = ("/healthz", "/livez", "/readyz")
_NS = r"/api/v1/namespaces/(?P<ns>[^/]+)"


class ApiCall(tuple[str, str, dict[str, str]]):
    """One request the emulator served: ``(method, path, query)``."""

    __slots__ = ()

    @property
    def method(self) -> str:
        """HTTP method, e.g. ``POST``."""
        return self[0]

    @property
    def path(self) -> str:
        """URL path, e.g. ``/api/v1/namespaces/hpo-trials/pods``."""
        return self[1]

    @property
    def query(self) -> dict[str, str]:
        """Query parameters (last value wins)."""
        return self[2]


class _Stream:
    def __init__(self, chunks: Iterator[bytes], content_type: str) -> None:
        self.chunks = chunks
        self.content_type = content_type


Route = tuple[str, re.Pattern[str], Callable[["_Handler", dict[str, str], dict[str, str], Any], Any]]


def _flag(query: dict[str, str], name: str) -> bool:
    return query.get(name, "").lower() in ("true", "1")


def _int(query: dict[str, str], name: str) -> int | None:
    if name not in query or query[name] == "":
        return None
    try:
        return int(query[name])
    except ValueError as e:
        raise ApiError.bad_request(f"invalid value for {name}: {query[name]!r}") from e


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ApiServer

    # ------------------------------------------------------------------------------------- plumbing
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("k8s emulator %s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise ApiError.bad_request(f"the request body is not JSON: {e}") from e

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        self.server.record(ApiCall((method, path, query)))
        try:
            body = self._read_body()
            if path not in _PUBLIC_PATHS and not self.server.authorised(self.headers.get("Authorization")):
                raise ApiError(401, "Unauthorized", "Unauthorized")
            for route_method, pattern, action in ROUTES:
                match = pattern.fullmatch(path)
                if match and route_method == method:
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    result = action(self, params, query, body)
                    break
            else:
                if any(p.fullmatch(path) for _, p, _ in ROUTES):
                    raise ApiError(
                        405, "MethodNotAllowed", f"the server does not allow this method on {path}"
                    )
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
        except ApiError as e:
            self._send_json(e.code, e.status())
            return
        if isinstance(result, _Stream):
            self._send_stream(result)
        elif isinstance(result, str):
            self._send_bytes(200, result.encode(), "text/plain")
        else:
            code, obj = result
            self._send_json(code, obj)

    def _send_bytes(self, code: int, data: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_json(self, code: int, obj: Any) -> None:
        self._send_bytes(code, json.dumps(obj).encode(), "application/json")

    def _send_stream(self, stream: _Stream) -> None:
        self.send_response(200)
        self.send_header("Content-Type", stream.content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in stream.chunks:
                if chunk:
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            close = getattr(stream.chunks, "close", None)
            if close is not None:
                close()

    # ---------------------------------------------------------------------------------------- routes
    @property
    def cluster(self) -> Cluster:
        return self.server.cluster

    def version(self, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
        return 200, KUBERNETES_VERSION

    def health(self, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
        return "ok"

    def api_versions(self, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
        host, port = self.server.server_address[:2]
        address = f"{host!s}:{port}"
        return 200, {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}],
        }

    def api_groups(self, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
        return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}

    def api_resources(self, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
        def resource(name: str, kind: str, verbs: list[str], namespaced: bool = True) -> dict[str, Any]:
            return {"name": name, "singularName": "", "namespaced": namespaced, "kind": kind, "verbs": verbs}

        crud = ["create", "delete", "get", "list", "patch", "update", "watch"]
        return 200, {
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": [
                resource("namespaces", "Namespace", ["create", "get", "list", "watch"], namespaced=False),
                resource("pods", "Pod", crud),
                resource("pods/log", "Pod", ["get"]),
                resource("pods/status", "Pod", ["get", "patch"]),
                resource("secrets", "Secret", crud),
                resource("configmaps", "ConfigMap", crud),
                resource("events", "Event", ["create", "delete", "get", "list", "watch"]),
            ],
        }

    def list_or_watch(self, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
        resource, namespace = params["resource"], params.get("ns")
        label_selector, field_selector = query.get("labelSelector"), query.get("fieldSelector")
        if _flag(query, "watch"):
            timeout = float(_int(query, "timeoutSeconds") or 1800)
            events = self.cluster.watch(
                resource,
                namespace,
                label_selector=label_selector,
                field_selector=field_selector,
                resource_version=query.get("resourceVersion"),
                timeout_seconds=timeout,
            )
            return _Stream(events, "application/json")
        if resource == "pods":
            return 200, self.cluster.list_pods(namespace, label_selector, field_selector)
        return 200, self.cluster.list_objects(resource, namespace, label_selector, field_selector)

    def create(self, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
        resource, namespace = params["resource"], params["ns"]
        if resource == "pods":
            return 201, self.cluster.create_pod(namespace, body, dry_run="dryRun" in query)
        return 201, self.cluster.create_object(resource, namespace, body or {})

    def get(self, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
        resource, namespace, name = params["resource"], params["ns"], params["name"]
        if resource == "pods":
            return 200, self.cluster.get_pod(namespace, name)
        return 200, self.cluster.get_object(resource, namespace, name)

    def patch(self, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
        resource, namespace, name = params["resource"], params["ns"], params["name"]
        content_type = self.headers.get("Content-Type") or "application/json"
        if resource == "pods":
            status = params.get("sub") == "status"
            return 200, self.cluster.patch_pod(namespace, name, body, content_type, status=status)
        return 200, self.cluster.patch_object(resource, namespace, name, body, content_type)

    def replace(self, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
        resource, namespace, name = params["resource"], params["ns"], params["name"]
        if resource == "pods":
            raise ApiError(405, "MethodNotAllowed", "the emulator supports PATCH, not PUT, for pods")
        return 200, self.cluster.replace_object(resource, namespace, name, body or {})

    def delete(self, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
        resource, namespace, name = params["resource"], params["ns"], params["name"]
        if resource != "pods":
            return 200, self.cluster.delete_object(resource, namespace, name)
        grace = _int(query, "gracePeriodSeconds")
        if grace is None and isinstance(body, dict) and body.get("gracePeriodSeconds") is not None:
            grace = int(body["gracePeriodSeconds"])
        return 200, self.cluster.delete_pod(namespace, name, None if grace is None else float(grace))

    def namespaces(self, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
        return 200, self.cluster.list_objects(
            "namespaces", None, query.get("labelSelector"), query.get("fieldSelector")
        )

    def create_namespace(self, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
        name = ((body or {}).get("metadata") or {}).get("name")
        if not name:
            raise ApiError.invalid("Namespace", "", [("metadata.name", "Required value")])
        return 201, self.cluster.create_namespace(name, ((body or {}).get("metadata") or {}).get("labels"))

    def namespace(self, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
        return 200, self.cluster.get_object("namespaces", "", params["ns"])

    def logs(self, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
        since_time: datetime | None = None
        if query.get("sinceTime"):
            try:
                since_time = datetime.fromisoformat(query["sinceTime"].replace("Z", "+00:00"))
            except ValueError as e:
                raise ApiError.bad_request(f"invalid sinceTime {query['sinceTime']!r}") from e
        chunks = self.cluster.log_stream(
            params["ns"],
            params["name"],
            container=query.get("container") or None,
            follow=_flag(query, "follow"),
            timestamps=_flag(query, "timestamps"),
            since_seconds=_int(query, "sinceSeconds"),
            since_time=since_time,
            tail_lines=_int(query, "tailLines"),
            limit_bytes=_int(query, "limitBytes"),
            previous=_flag(query, "previous"),
        )
        return _Stream(chunks, "text/plain")

    def unsupported_subresource(self, params: dict[str, str], query: dict[str, str], body: Any) -> Any:
        raise ApiError.bad_request(
            f"the k8s emulator does not support pods/{params['sub']} (websocket streams): "
            "run KubernetesPodOperator with do_xcom_push=False"
        )


_R = "(?P<resource>pods|secrets|configmaps|events)"
ROUTES: list[Route] = [
    ("GET", re.compile(r"/version"), _Handler.version),
    ("GET", re.compile(r"/(healthz|livez|readyz)"), _Handler.health),
    ("GET", re.compile(r"/api"), _Handler.api_versions),
    ("GET", re.compile(r"/apis"), _Handler.api_groups),
    ("GET", re.compile(r"/api/v1"), _Handler.api_resources),
    ("GET", re.compile(r"/api/v1/namespaces"), _Handler.namespaces),
    ("POST", re.compile(r"/api/v1/namespaces"), _Handler.create_namespace),
    ("GET", re.compile(_NS), _Handler.namespace),
    ("GET", re.compile(rf"/api/v1/{_R}"), _Handler.list_or_watch),
    ("GET", re.compile(rf"{_NS}/{_R}"), _Handler.list_or_watch),
    ("POST", re.compile(rf"{_NS}/{_R}"), _Handler.create),
    ("GET", re.compile(rf"{_NS}/{_R}/(?P<name>[^/]+)"), _Handler.get),
    ("PATCH", re.compile(rf"{_NS}/{_R}/(?P<name>[^/]+)"), _Handler.patch),
    ("PUT", re.compile(rf"{_NS}/{_R}/(?P<name>[^/]+)"), _Handler.replace),
    ("DELETE", re.compile(rf"{_NS}/{_R}/(?P<name>[^/]+)"), _Handler.delete),
    ("GET", re.compile(rf"{_NS}/(?P<resource>pods)/(?P<name>[^/]+)/(?P<sub>status)"), _Handler.get),
    ("PATCH", re.compile(rf"{_NS}/(?P<resource>pods)/(?P<name>[^/]+)/(?P<sub>status)"), _Handler.patch),
    ("GET", re.compile(rf"{_NS}/pods/(?P<name>[^/]+)/log"), _Handler.logs),
    (
        "GET",
        re.compile(rf"{_NS}/pods/(?P<name>[^/]+)/(?P<sub>exec|attach|portforward)"),
        _Handler.unsupported_subresource,
    ),
    (
        "POST",
        re.compile(rf"{_NS}/pods/(?P<name>[^/]+)/(?P<sub>exec|attach|portforward)"),
        _Handler.unsupported_subresource,
    ),
]


class ApiServer(ThreadingHTTPServer):
    """A threading HTTP server bound to one :class:`Cluster`, with bearer-token auth and a call log."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], cluster: Cluster, token: str | None) -> None:
        super().__init__(address, _Handler)
        self.cluster = cluster
        self.token = token
        self.calls: deque[ApiCall] = deque(maxlen=10_000)
        self._calls_lock = threading.Lock()

    def authorised(self, header: str | None) -> bool:
        """Whether the ``Authorization`` header carries the expected bearer token (if one is set)."""
        return self.token is None or header == f"Bearer {self.token}"

    def record(self, call: ApiCall) -> None:
        """Remember a served request for assertions in tests."""
        with self._calls_lock:
            self.calls.append(call)

    def recorded(self) -> list[ApiCall]:
        """A snapshot of the recorded requests."""
        with self._calls_lock:
            return list(self.calls)

    def clear_recorded(self) -> None:
        """Forget the recorded requests."""
        with self._calls_lock:
            self.calls.clear()
