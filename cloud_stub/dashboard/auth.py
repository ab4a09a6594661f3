"""Who may use the dashboard: the login secret, session cookies, CSRF tokens and the check of
every request (pure: a request's method, path and headers in, a session out or a refusal).

The operator logs in once with the secret printed at start (``/login?token=…``), which sets a
session cookie (HttpOnly, SameSite=Strict). Cookies are not scoped by port, so another origin
on the same host (``http://127.0.0.1:OTHER``) is *same-site* and the browser sends the cookie
with its requests: in a browser the cookie alone never allows a change. A change (any method
but GET/HEAD) also needs the dashboard's own ``Origin``, the session's CSRF token in
``X-CSRF-Token`` (only the dashboard's page has it) and a JSON body, which no page of another
origin can send without a CORS preflight that the dashboard refuses. ``Host`` must be one of
the dashboard's names, so a DNS-rebound name cannot reach it either. What the browser cannot
stop: a *process* on the host that receives the cookie (a server on another port the browser
is sent to) can replay it outside a browser, with any headers; so a session ends after
``SESSION_MAX_AGE_S`` (the cookie carries when it was issued, under its MAC), and changing the
secret ends every session at once. Sessions are stateless: the cookie and the CSRF token are
HMACs keyed by the secret, so a dashboard restarted with the same secret keeps them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.errors import AgentError

SAFE_METHODS = frozenset({"GET", "HEAD"})
CSRF_HEADER = "x-csrf-token"
SESSION_MAX_AGE_S = 12 * 3600  # an operator's working day, then the login URL again
CLOCK_SKEW_S = 60  # a cookie issued this far in the future is still taken


class NotLoggedInError(AgentError):
    """No valid session cookie (or a wrong login secret): 401."""


class ForeignRequestError(AgentError):
    """A request that does not come from the dashboard's own page: 403."""


class NotJsonError(AgentError):
    """A state-changing request whose body is not declared as JSON (a form, text/plain): 403."""


@dataclass(frozen=True, slots=True)
class Request:
    """What the checks look at; header names in lower case."""

    method: str
    path: str
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Session:
    """A logged-in browser: its id and the CSRF token its page sends back."""

    sid: str
    csrf: str


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def host_names(bind_host: str, port: int, extra: Iterable[str] = ()) -> frozenset[str]:
    """The ``Host`` header values the dashboard answers: its bound name, the loopback names
    when bound to loopback or to every interface, and the names given (``--allow-host``)."""
    loopback = {"127.0.0.1", "localhost", "::1"}
    names = {bind_host, *extra}
    if bind_host in loopback or bind_host in {"", "0.0.0.0", "::"}:
        names |= loopback
    names -= {"", "0.0.0.0", "::"}
    hosts = set()
    for name in names:
        literal = f"[{name}]" if ":" in name else name
        hosts.add(f"{literal}:{port}".lower())
        if port == 80:
            hosts.add(literal.lower())
    return frozenset(hosts)


def _cookies(header: str) -> dict[str, str]:
    jar = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            jar[name] = value
    return jar


class Guard:
    """Logs in, and checks every request against the secret and the dashboard's names."""

    def __init__(self, secret: str, port: int, hosts: frozenset[str]) -> None:
        if not secret:
            raise ValueError("the dashboard's secret is empty")
        self._key = hashlib.sha256(b"edge-dashboard\0" + secret.encode()).digest()
        self._secret = secret.encode()
        self.hosts = hosts
        # Cookies are shared by every port of a host: the name keeps two dashboards apart.
        self.cookie_name = f"edge_dashboard_{port}"

    def _mac(self, purpose: str, sid: str) -> str:
        return hmac.new(self._key, f"{purpose}:{sid}".encode(), hashlib.sha256).hexdigest()

    def login(self, token: str, now: float | None = None) -> str:
        """The ``Set-Cookie`` value for a browser that presented ``token``.

        Raises:
            NotLoggedInError: the token is not the dashboard's secret.
        """
        if not hmac.compare_digest(token.encode(), self._secret):
            raise NotLoggedInError("wrong login token: use the login URL the dashboard printed")
        sid = f"{secrets.token_urlsafe(16)}.{int(time.time() if now is None else now)}"
        value = f"{sid}.{self._mac('session', sid)}"
        return (
            f"{self.cookie_name}={value}; Path=/; Max-Age={SESSION_MAX_AGE_S}; HttpOnly; "
            "SameSite=Strict"
        )

    def check_host(self, request: Request) -> str:
        """The request's ``Host``, if it is one of the dashboard's names.

        Raises:
            ForeignRequestError: a missing or foreign Host (DNS rebinding, a proxy).
        """
        host = request.headers.get("host", "").lower()
        if host not in self.hosts:
            raise ForeignRequestError(
                f"Host {host!r} is not this dashboard (expected one of {sorted(self.hosts)})"
            )
        return host

    def authorize(self, request: Request, now: float | None = None) -> Session:
        """The session of a request allowed to do what it asks.

        Raises:
            ForeignRequestError: foreign Host, another site's request, wrong Origin or CSRF token.
            NotLoggedInError: no valid session cookie.
            NotJsonError: a change whose body is not application/json.
        """
        host = self.check_host(request)
        site = request.headers.get("sec-fetch-site", "")
        navigation = request.method == "GET" and request.path == "/"
        if site in {"cross-site", "same-site"} and not navigation:
            # A browser says where a request comes from; only the page itself uses the API.
            raise ForeignRequestError(f"a request from another origin (Sec-Fetch-Site: {site})")
        cookie = _cookies(request.headers.get("cookie", "")).get(self.cookie_name, "")
        sid, _, mac = cookie.rpartition(".")
        if not sid or not hmac.compare_digest(mac.encode(), self._mac("session", sid).encode()):
            raise NotLoggedInError(
                "not logged in: open the login URL the dashboard printed at start"
            )
        issued = sid.rpartition(".")[2]
        age = (time.time() if now is None else now) - int(issued) if issued.isdigit() else -1e9
        if not -CLOCK_SKEW_S <= age <= SESSION_MAX_AGE_S:
            raise NotLoggedInError(
                "the session has ended (sessions last "
                f"{SESSION_MAX_AGE_S // 3600} h): open the login URL again"
            )
        session = Session(sid, self._mac("csrf", sid))
        if request.method in SAFE_METHODS:
            return session
        origin = request.headers.get("origin")
        if origin is None:
            raise ForeignRequestError(f"no Origin header: a change needs Origin http://{host}")
        if origin != f"http://{host}":
            raise ForeignRequestError(f"Origin {origin!r} is not this dashboard's (http://{host})")
        token = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(token.encode(), session.csrf.encode()):
            raise ForeignRequestError("missing or wrong X-CSRF-Token")
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise NotJsonError(f"expected Content-Type application/json, found {media!r}")
        return session
