"""The agent's exception tree, branched by what the agent does about each error.

::

    AgentError                      every error the agent raises on purpose
    ├── ConfigError                 bad configuration: exit with EXIT_CONFIG, no restart
    ├── TrustError                  repository/trust failure: reject that version, keep serving,
    │                               never retry the same bytes
    ├── DownloadError               network/transport failure: retry with backoff
    ├── StoreError                  model store I/O (disk full, missing file): keep the last good
    ├── ModelError                  a model cannot be loaded or validated: reject it / roll back
    │   └── SmokeTestError          the model loads but fails its signed smoke test
    ├── RequestError                a malformed inference request: 400, keep serving
    │   ├── PayloadTooLargeError    413
    │   ├── NotFoundError           404: unknown model or version
    │   └── UnsupportedError        501: a protocol feature the agent does not offer
    ├── UnavailableError            503: the model is not ready (loading, swapping, draining)
    ├── InferenceError              500: the runtime failed on a well-formed request
    └── CommandError                a remote/admin command was refused (bad signature, replay …)

Every message says what was expected and what was found, and names the field, tensor, file or
key involved, so a person can act on it without reading the code.
"""

from __future__ import annotations

EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h; edge-agent.service sets RestartPreventExitStatus=78


class AgentError(Exception):
    """Root of the tree. ``remedy`` is optional advice printed by the CLI."""

    status = 500

    def __init__(self, message: str, *, remedy: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.remedy = remedy

    def __str__(self) -> str:
        return self.message


class ConfigError(AgentError):
    """The configuration is invalid; the agent exits and is not restarted."""


class TrustError(AgentError):
    """Signed metadata or target bytes could not be trusted; the version is rejected."""


class DownloadError(AgentError):
    """The repository could not be reached or a transfer failed; retried with backoff."""


class StoreError(AgentError):
    """The on-disk model store could not be read or written."""


class ModelError(AgentError):
    """A model could not be loaded, or does not match its signed signature."""


class SmokeTestError(ModelError):
    """A model's outputs on its signed smoke-test input are outside the tolerance."""


class RequestError(AgentError):
    """A client sent a request the agent cannot accept (HTTP 400)."""

    status = 400


class PayloadTooLargeError(RequestError):
    """A request exceeds a configured size bound (HTTP 413)."""

    status = 413


class NotFoundError(RequestError):
    """The request names a model or version the agent does not have (HTTP 404)."""

    status = 404


class UnsupportedError(RequestError):
    """The request asks for a protocol feature the agent does not offer (HTTP 400: the request
    is what must change, and a 5xx would count as the server failing)."""

    status = 400


class UnavailableError(AgentError):
    """The model exists but cannot answer now (HTTP 503)."""

    status = 503

    def __init__(
        self, message: str, *, retry_after_s: float | None = None, remedy: str | None = None
    ) -> None:
        super().__init__(message, remedy=remedy)
        self.retry_after_s = retry_after_s


class InferenceError(AgentError):
    """The runtime failed on a well-formed request (HTTP 500)."""

    status = 500


class RuntimeInputError(RequestError):
    """The runtime refused the request's values as invalid arguments (HTTP 400): an index past
    a table's end, sizes that disagree between inputs. The client's mistake, not the model's."""


class CommandError(AgentError):
    """A remote or admin command was refused."""

    status = 403
