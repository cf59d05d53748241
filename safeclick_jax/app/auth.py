"""The API key of a shared server (--api-key-file): every /api request carries it as a bearer
token (`Authorization: Bearer KEY`, as nnInteractive's server takes it), compared in constant
time; without it the answer is 401 and one sentence. The page itself (/, /static, /vendor) holds
no data and is served without a key; it asks for the key once."""

from __future__ import annotations

import hmac
from pathlib import Path

from fastapi.responses import JSONResponse

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def read_key(path: str | Path) -> str:
    """The key in a file (surrounding whitespace dropped); ValueError naming the file when it is
    missing, unreadable or empty, or the key is too short to be one."""
    try:
        key = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--api-key-file {path}: cannot read it ({type(e).__name__})") from None
    if len(key) < 16 or any(c.isspace() for c in key):
        raise ValueError(f"--api-key-file {path}: the key must be one word of at least 16 characters")
    return key


def refusal(header: str | None, key: str) -> str | None:
    """Why a request with this Authorization header is refused (None: it has the key)."""
    if not header:
        return "this server needs an API key: send the header 'Authorization: Bearer KEY'"
    scheme, _, given = header.partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer":
        return f"Authorization scheme {scheme!r}: 'Bearer KEY' is needed"
    if not given:
        return "the API key is empty: send 'Authorization: Bearer KEY'"
    if not hmac.compare_digest(given.encode(), key.encode()):
        return "wrong API key"
    return None


class ApiKey:
    """ASGI middleware: /api/... answers 401 unless the request has the key."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/api"):
            header = dict(scope.get("headers") or []).get(b"authorization")
            why = refusal(None if header is None else header.decode("latin-1"), self.key)
            if why is not None:
                headers = {"WWW-Authenticate": "Bearer"}
                return await JSONResponse({"detail": why}, status_code=401, headers=headers)(scope, receive, send)
        return await self.app(scope, receive, send)
