"""The outermost layer of every HTTP request (plain ASGI, so streams and disconnects pass through):

- a request id (the client's X-Request-Id when it is short printable ASCII, else a new one),
  sent back as X-Request-Id and named in the log and in 500 answers;
- a JSON body is read up to --max-request-bytes (413 beyond, without reading the rest), then
  checked before any route sees it: valid UTF-8 and JSON (else the route's own 400 says so),
  nesting no deeper than --max-json-depth, and every string (keys too) valid Unicode — JSON may
  escape a lone surrogate (`"\\ud800"`), which no tokenizer, file system or log can take; the 400
  names where it is (`messages[0].content`);
- any exception a route did not turn into an answer is a JSON 500 for that request alone,
  logged with its traceback and request id; the connection stays open for the next request.
"""

from __future__ import annotations

import json
import logging
import re
import uuid

from uora_rt.server.errors import error_response

log = logging.getLogger("uora_rt.server")

_SURROGATE = re.compile("[\ud800-\udfff]")
_GOOD_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


def _where(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _bad_unicode(s: str):
    m = _SURROGATE.search(s)
    return None if m is None else (m.start(), f"\\u{ord(m.group()):04x}")


def check_json(obj, max_depth: int):
    """(message, param) for the first problem of a parsed body, or None. Iterative: a deep body
    cannot exhaust the stack here."""
    stack = [(obj, (), 1)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, (dict, list)) and depth > max_depth:
            return (f"{_where(path)}: nested deeper than {max_depth} levels (--max-json-depth)",
                    path[0] if path else None)
        if isinstance(node, str):
            bad = _bad_unicode(node)
            if bad:
                return (f"{_where(path)}: not valid Unicode (a lone surrogate {bad[1]} at "
                        f"character {bad[0]})", path[0] if path and isinstance(path[0], str)
                        else None)
        elif isinstance(node, dict):
            for k, v in reversed(list(node.items())):
                bad = _bad_unicode(k)
                if bad:
                    return (f"{_where(path)}: a key is not valid Unicode (a lone surrogate "
                            f"{bad[1]} at character {bad[0]})",
                            path[0] if path else None)
                stack.append((v, path + (k,), depth + 1))
        elif isinstance(node, list):
            for i in range(len(node) - 1, -1, -1):
                stack.append((node[i], path + (i,), depth + 1))
    return None


class Guard:
    def __init__(self, app, limits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _GOOD_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                receive = await self._checked_body(scope, receive, send_with_id, headers)
                if receive is None:
                    return
            await self.app(scope, receive, send_with_id)
        except Exception as e:
            log.exception("request %s (%s %s) failed", rid, scope["method"], scope["path"])
            if not started:
                resp = error_response(500, f"internal error ({type(e).__name__}: {e}); request "
                                           f"id {rid}")
                await resp(scope, receive, send_with_id)

    async def _checked_body(self, scope, receive, send, headers):
        """The body read and checked; a receive() that replays it; None if already answered."""
        most = self.limits.max_body_bytes
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > most:
            await self._refuse(scope, receive, send, 413, f"the request body has {int(length)} "
                               f"bytes; this server takes at most {most} (--max-request-bytes)")
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > most:
                await self._refuse(scope, receive, send, 413, f"the request body is larger "
                                   f"than {most} bytes (--max-request-bytes)")
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        problem = None
        try:
            parsed = json.loads(body) if body else None
        except RecursionError:
            problem = (f"the body is nested too deeply (at most {self.limits.max_json_depth} "
                       "levels, --max-json-depth)", None)
        except ValueError:  # not UTF-8 / not JSON: the route's own validation says so
            parsed = None
        else:
            problem = check_json(parsed, self.limits.max_json_depth)
        if problem is not None:
            await self._refuse(scope, receive, send, 400, *problem)
            return None
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    @staticmethod
    async def _refuse(scope, receive, send, status, message, param=None):
        await error_response(status, message, param)(scope, receive, send)
