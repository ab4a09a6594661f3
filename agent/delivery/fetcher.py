"""httpx behind python-tuf's FetcherInterface: TLS to the fleet CA, deadlines, resume, retries.

python-tuf hashes and length-checks what this returns; this module makes sure the bytes
arrive (or fail) within bounds:

- ``_fetch`` opens the response eagerly, so HTTP and TLS errors surface inside ``_fetch`` where
  ngclient wraps them, and returns a generator over the body that translates its own errors;
- ``Accept-Encoding: identity`` and ``iter_raw``: the bytes hashed are the bytes signed;
- a total deadline per file (read timeouts only bound the gap between bytes: a server that
  drips one byte a second never trips them);
- a dropped connection resumes with ``Range`` from the byte reached (bounded number of times);
- connection failures and 5xx answers are retried with jittered exponential backoff;
  certificate failures and TLS handshakes the server refuses are not (the answer will not
  change);
- every failure is a python-tuf ``DownloadError`` whose message names the URL and says what
  happened; ``TransferInterruptedError`` marks the ones a later resume can get past (connection
  refused, dropped or timed out), so the caller knows whether the bytes received are worth
  keeping.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from tuf.api.exceptions import DownloadError, DownloadHTTPError, SlowRetrievalError
from tuf.ngclient import FetcherInterface

from agent import __version__
from agent.records import record

log = logging.getLogger(__name__)


@record
class FetchConfig:
    """Transport settings; every wait has a bound."""

    ca_file: Path | None = None  # None: the system's trust store
    client_cert: Path | None = None
    client_key: Path | None = None
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    file_deadline_s: float = 600.0
    retries: int = 3
    backoff_base_s: float = 0.5
    backoff_max_s: float = 10.0
    max_resumes: int = 5


def ssl_context(config: FetchConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.client_cert is not None:
        context.load_cert_chain(config.client_cert, config.client_key)
    return context


class TransferInterruptedError(DownloadError):
    """The transfer stopped for a reason that may pass (connection refused, dropped or timed
    out, after the retries): the bytes received so far are worth keeping for a resume."""


# A tuple, for isinstance and except clauses (``tuple | type`` is a TypeError).
_RETRYABLE: tuple[type[httpx.HTTPError], ...] = (
    httpx.ConnectError,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
    httpx.TimeoutException,
)
_RESUMABLE: tuple[type[httpx.HTTPError], ...] = (
    httpx.ReadTimeout,
    httpx.ReadError,
    httpx.RemoteProtocolError,
)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    cause: BaseException | None = exc
    seen = 0
    while cause is not None and seen < 20:
        yield cause
        cause = cause.__cause__ or cause.__context__
        seen += 1


def _is_tls_verification(exc: BaseException) -> bool:
    return any(isinstance(c, ssl.SSLCertVerificationError) for c in _causes(exc))


def _tls_refusal(exc: BaseException) -> str | None:
    """Why the server refused the TLS handshake (it sent an alert), or None.

    A connection that merely ends (``SSLEOFError`` and friends) is not a refusal: that is a
    dropped connection, retried and resumed like any other.
    """
    for cause in _causes(exc):
        if not isinstance(cause, ssl.SSLError) or isinstance(
            cause, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError
        ):
            continue
        reason = str(getattr(cause, "reason", "") or "")
        if "ALERT" not in reason:
            continue
        if "CERTIFICATE_REQUIRED" in reason:
            return (
                "the server refused the TLS handshake: it requires a client certificate and "
                "none was sent (set repository.client_cert and client_key)"
            )
        if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason:
            return (
                f"the server refused the TLS handshake: client certificate not accepted ({reason})"
            )
        return f"the server refused the TLS handshake ({reason})"
    return None


def _what_happened(exc: httpx.HTTPError, config: FetchConfig) -> str:
    """A person's account of a transport failure."""
    if isinstance(exc, httpx.ConnectTimeout):
        return f"no connection within {config.connect_timeout_s:g} s"
    if isinstance(exc, httpx.ReadTimeout):
        return f"no data for {config.read_timeout_s:g} s"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        for cause in _causes(exc):
            if isinstance(cause, ConnectionRefusedError):
                return "connection refused"
            if isinstance(cause, socket.gaierror):
                return "host name not found"
        return "cannot connect"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "the server closed the connection"
    if isinstance(exc, httpx.ReadError | httpx.WriteError):
        return "connection lost"
    return type(exc).__name__


class HttpxFetcher(FetcherInterface):
    """One httpx client (keep-alive across the files of an update cycle)."""

    def __init__(
        self,
        config: FetchConfig | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config or FetchConfig()
        self._sleep = sleep
        self._client = httpx.Client(
            verify=ssl_context(self.config),
            timeout=httpx.Timeout(
                connect=self.config.connect_timeout_s,
                read=self.config.read_timeout_s,
                write=self.config.read_timeout_s,
                pool=self.config.connect_timeout_s,
            ),
            headers={"Accept-Encoding": "identity", "User-Agent": f"edge-agent/{__version__}"},
            follow_redirects=False,
        )
        self.requests = 0

    def close(self) -> None:
        self._client.close()

    def _backoff(self, attempt: int) -> float:
        """Attempt ``n`` waits between half and all of ``min(max, base * 2**n)``: the waits
        grow, and the jitter keeps a fleet that lost its repository together from coming back
        in step."""
        ceiling = min(self.config.backoff_max_s, self.config.backoff_base_s * 2.0**attempt)
        return ceiling * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not security

    def _open(self, url: str, start: int, deadline: float) -> httpx.Response:
        headers = {"Range": f"bytes={start}-"} if start else {}
        attempt = 0
        while True:
            self.requests += 1
            try:
                request = self._client.build_request("GET", url, headers=headers)
                response = self._client.send(request, stream=True)
            except httpx.HTTPError as exc:
                if _is_tls_verification(exc):
                    raise DownloadError(f"{url}: TLS verification failed: {exc}") from exc
                refusal = _tls_refusal(exc)
                if refusal is not None:
                    raise DownloadError(f"{url}: {refusal}: {exc}") from exc
                if not isinstance(exc, _RETRYABLE):
                    raise DownloadError(f"{url}: {type(exc).__name__}: {exc}") from exc
                what = _what_happened(exc, self.config)
                if attempt >= self.config.retries or time.monotonic() >= deadline:
                    attempts = "attempt" if attempt == 0 else "attempts"
                    raise TransferInterruptedError(
                        f"{url}: {what} ({type(exc).__name__}: {exc}); gave up after "
                        f"{attempt + 1} {attempts}"
                    ) from exc
                delay = self._backoff(attempt)
                log.info("fetch %s: %s (%s); retrying in %.2f s", url, what, exc, delay)
                self._sleep(delay)
                attempt += 1
                continue
            status = response.status_code
            if status >= 500 and attempt < self.config.retries and time.monotonic() < deadline:
                response.close()
                delay = self._backoff(attempt)
                log.info("fetch %s answered %d; retrying in %.1f s", url, status, delay)
                self._sleep(delay)
                attempt += 1
                continue
            if status == 206 and start:
                content_range = response.headers.get("Content-Range", "")
                if not content_range.startswith(f"bytes {start}-"):
                    response.close()
                    raise DownloadError(f"{url}: resumed at {start}, server sent {content_range!r}")
                return response
            if status != 200:
                response.close()
                raise DownloadHTTPError(f"{url}: HTTP {status}", status)
            return response

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self.fetch_from(url, 0)

    def fetch_from(self, url: str, start: int) -> Iterator[bytes]:
        """The body of ``url`` from byte ``start`` (a partial download kept across restarts).

        Raises:
            DownloadError: as ``fetch`` (a server that ignores Range is handled: the bytes
                before ``start`` are skipped).
        """
        deadline = time.monotonic() + self.config.file_deadline_s
        response = self._open(url, start, deadline)
        skip = start if start and response.status_code == 200 else 0
        return self._stream(url, response, deadline, received=start - skip, skip=skip)

    def _stream(
        self,
        url: str,
        response: httpx.Response,
        deadline: float,
        received: int = 0,
        skip: int = 0,  # bytes to drop when a server ignored Range and sent the whole file
    ) -> Iterator[bytes]:
        resumes = 0
        try:
            while True:
                try:
                    for chunk in response.iter_raw():
                        if time.monotonic() > deadline:
                            raise SlowRetrievalError(
                                f"{url}: not complete within {self.config.file_deadline_s:g} s "
                                f"({received} bytes received): slow retrieval"
                            )
                        data = chunk
                        if skip:
                            dropped = min(skip, len(data))
                            data = data[dropped:]
                            skip -= dropped
                            if not data:
                                continue
                        received += len(data)
                        yield data
                    return
                except _RESUMABLE as exc:
                    response.close()
                    what = _what_happened(exc, self.config)
                    if resumes >= self.config.max_resumes or time.monotonic() >= deadline:
                        why = (
                            f"gave up after {resumes} resumes"
                            if resumes >= self.config.max_resumes
                            else f"the {self.config.file_deadline_s:g} s deadline has passed"
                        )
                        raise TransferInterruptedError(
                            f"{url}: {what} at byte {received} ({type(exc).__name__}: {exc}); {why}"
                        ) from exc
                    resumes += 1
                    log.info("fetch %s: %s at byte %d; resuming", url, what, received)
                    response = self._open(url, received, deadline)
                    if response.status_code == 200:
                        skip = received
                except httpx.HTTPError as exc:
                    raise DownloadError(f"{url}: {type(exc).__name__}: {exc}") from exc
        finally:
            response.close()
