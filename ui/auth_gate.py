"""Close the one door Gradio leaves ajar when a password is set.

With auth on, Gradio still answers ``GET /`` with 200 and embeds the API description
(``window.gradio_api_info``) in the login page: endpoint names, parameter labels and defaults,
dropdown choices (which are model file paths on this disk). For a visitor without a valid session
this middleware answers ``/`` with HTTP 401 and an empty API description; the login form is
unchanged (browsers render a 401 page as usual). Every other route is already refused by Gradio.
"""

from __future__ import annotations

import re

_API_INFO = re.compile(rb"window\.gradio_api_info\s*=\s*\{.*?\};?\s*</script>", re.S)


class AuthGate:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "") not in ("/", "") or scope.get("method") != "GET":
            return await self.app(scope, receive, send)
        gradio_app = scope.get("app")
        if gradio_app is None or (getattr(gradio_app, "auth", None) is None
                                  and getattr(gradio_app, "auth_dependency", None) is None):
            return await self.app(scope, receive, send)
        if self._logged_in(gradio_app, scope):
            return await self.app(scope, receive, send)
        start, body = {}, []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))
                if not message.get("more_body"):
                    data = _API_INFO.sub(b"window.gradio_api_info = {};</script>", b"".join(body))
                    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                    headers.append((b"content-length", str(len(data)).encode()))
                    await send({"type": "http.response.start", "status": 401, "headers": headers})
                    await send({"type": "http.response.body", "body": data})

        await self.app(scope, receive, capture)

    @staticmethod
    def _logged_in(gradio_app, scope) -> bool:
        cookies = {}
        for k, v in scope.get("headers", []):
            if k == b"cookie":
                for part in v.decode("latin-1").split(";"):
                    name, _, value = part.strip().partition("=")
                    cookies[name] = value
        cid = getattr(gradio_app, "cookie_id", "")
        token = cookies.get(f"access-token-{cid}") or cookies.get(f"access-token-unsecure-{cid}")
        return bool(token) and token in getattr(gradio_app, "tokens", {})
