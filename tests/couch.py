"""A small synchronous CouchDB client for tests: admin calls and reading back what was stored."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit


class CouchDB:
    """Talks to the server behind `url` (admin credentials in the URL)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.base = urlunsplit((parts.scheme, f"{parts.hostname}:{parts.port}", parts.path.rstrip("/"),
                                "", ""))
        self.url = url.rstrip("/")
        token = f"{parts.username or ''}:{parts.password or ''}".encode()
        self.headers = {"Authorization": "Basic " + base64.b64encode(token).decode()} \
            if parts.username else {}

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = dict(self.headers)
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def create_db(self, name: str) -> None:
        status, body = self.request("PUT", "/" + quote(name, safe=""))
        assert status in (201, 202, 412), (status, body)

    def delete_db(self, name: str) -> None:
        self.request("DELETE", "/" + quote(name, safe=""))

    def docs(self, name: str) -> list[dict[str, Any]]:
        status, body = self.request("GET", f"/{quote(name, safe='')}/_all_docs?include_docs=true")
        if status == 404:
            return []
        assert status == 200, (status, body)
        return [row["doc"] for row in body["rows"] if not row["id"].startswith("_design/")]

    def count(self, name: str) -> int:
        """Documents in the database, design documents not counted (`doc_count` counts them)."""
        status, body = self.request("GET", "/" + quote(name, safe=""))
        if status != 200:
            return 0
        _, design = self.request("GET", f"/{quote(name, safe='')}/_all_docs?startkey=%22_design%2F%22"
                                        "&endkey=%22_design0%22")
        return int(body["doc_count"]) - len(design["rows"])
