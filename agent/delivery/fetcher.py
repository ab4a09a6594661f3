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
  certificate failures are not (the answer will not change).
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from tuf.api.exceptions import DownloadError, DownloadHTTPError
from tuf.ngclient import FetcherInterface

from agent import __version__

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
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


_RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError)
_RESUMABLE = (httpx.ReadTimeout, httpx.ReadError, httpx.RemoteProtocolError)


def _is_tls_verification(exc: BaseException) -> bool:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


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
        ceiling = min(self.config.backoff_max_s, self.config.backoff_base_s * 2**attempt)
        return random.uniform(0, ceiling)  # noqa: S311 - jitter, not security

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
                if not isinstance(exc, _RETRYABLE | httpx.TimeoutException):
                    raise DownloadError(f"{url}: {type(exc).__name__}: {exc}") from exc
                if attempt >= self.config.retries or time.monotonic() >= deadline:
                    raise DownloadError(
                        f"{url}: {type(exc).__name__}: {exc} (after {attempt + 1} attempts)"
                    ) from exc
                delay = self._backoff(attempt)
                log.info("fetch %s failed (%s); retrying in %.1f s", url, exc, delay)
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
                            raise DownloadError(
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
                    if resumes >= self.config.max_resumes or time.monotonic() >= deadline:
                        raise DownloadError(
                            f"{url}: connection lost at byte {received}: {exc}"
                        ) from exc
                    resumes += 1
                    log.info("fetch %s: connection lost at byte %d; resuming", url, received)
                    response = self._open(url, received, deadline)
                    if response.status_code == 200:
                        skip = received
                except httpx.HTTPError as exc:
                    raise DownloadError(f"{url}: {type(exc).__name__}: {exc}") from exc
        finally:
            response.close()
