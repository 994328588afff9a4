"""The Jobs API client of ``ray_jobs``: Ray's ``JobSubmissionClient`` with a timeout, a bearer
token and per-cluster facts, and the one module outside the cluster package that uses Ray's
private client API (``RAY_CHECKED``). Nothing here imports ray at module import.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
import time
import urllib.parse
from typing import Any, Dict, NamedTuple, Optional

from torchx_ext.errors import InvalidOptionError, MissingExtraError, SchedulerUnavailable
from torchx_ext.schedulers.ray_jobs import cluster as cluster

# ---------------------------------------------------------------------------- client -------
# The Ray versions this module's use of Ray's private client API (the subclass below, request()
# and raise_error()) was checked against; tests/test_ray_jobs_unit.py checks the installed Ray is
# one of them and that every private member used still exists. This module is the only one outside
# the cluster package (ray_jobs_cluster/driver.py: the GCS job table) that touches Ray's privates.
RAY_CHECKED = ("2.60.0",)
PRIVATE_CLIENT_MEMBERS = ("_do_request", "_raise_error", "_check_connection_and_version_with_url",
                          "_upload_package_if_needed")


def request(client: Any, method: str, endpoint: str, **kwargs: Any) -> Any:
    """A request to the dashboard with the client's address, headers, cookies, TLS settings and
    timeout: Ray's JobSubmissionClient has no public way to ask the dashboard's other REST APIs
    (the state API, the version) with them."""
    return client._do_request(method, endpoint, **kwargs)  # noqa: SLF001 - the one adapter (RAY_CHECKED)


def raise_error(client: Any, response: Any) -> None:
    """Ray's own RuntimeError with the dashboard's answer (as its public methods raise)."""
    client._raise_error(response)  # noqa: SLF001 - the one adapter (RAY_CHECKED)


def import_client_class() -> Any:
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:
        raise MissingExtraError("ray", "ray") from e
    return JobSubmissionClient


PACKAGE_CACHE_S = 30.0
# What holds for a cluster, not for a job (its version check, the driver package's URI), per
# dashboard address and shared by every client of this process (a Runner per thread is common):
# address -> key -> (time.monotonic() when learnt, answer). forget_cluster() drops an address.
_CLUSTER_FACTS: dict[str, dict[str, tuple[float, str]]] = {}
_FACTS_LOCK = threading.Lock()


def forget_cluster(address: str) -> None:
    """Drops what was learnt about the cluster at ``address`` (it stopped answering: a head that
    comes back may be a new one, without our package)."""
    with _FACTS_LOCK:
        _CLUSTER_FACTS.pop(address.rstrip("/"), None)
_format_auth_error: Any = None
_AuthenticationError: Any = None


# Over 60 lines: the adapter class is defined inside, so that ray is imported only when a
# client is first needed (a dry-run never imports it); its methods are short.
@functools.cache
def _timeout_client_class() -> Any:
    global _format_auth_error, _AuthenticationError
    base = import_client_class()
    from ray.dashboard.modules import dashboard_sdk

    _format_auth_error = getattr(dashboard_sdk, "format_authentication_http_error", None)
    _AuthenticationError = getattr(dashboard_sdk, "AuthenticationError", RuntimeError)

    class TimeoutJobSubmissionClient(base):  # type: ignore[misc, valid-type]
        """The Jobs API client with a per-request timeout and keep-alive connections.

        Why a private method is overridden: Ray's public client has no timeout at all, so a head
        that accepts connections but never answers (a dying dashboard) hangs every call, and it
        opens a new connection per request; ``_do_request`` is the one place all of its requests
        go through. The timeout is an instance attribute, set before the constructor's first
        request: no shared state.
        """

        def __init__(self, *args: Any, request_timeout_s: float = 10.0, **kwargs: Any) -> None:
            self.request_timeout_s = request_timeout_s
            self._local = threading.local()
            super().__init__(*args, **kwargs)

        def _known(self, key: str) -> Optional[str]:
            with _FACTS_LOCK:
                known = _CLUSTER_FACTS.get(self._address.rstrip("/"), {}).get(key)
            return known[1] if known is not None and time.monotonic() - known[0] < PACKAGE_CACHE_S else None

        def _learnt(self, key: str, answer: str) -> None:
            with _FACTS_LOCK:
                _CLUSTER_FACTS.setdefault(self._address.rstrip("/"), {})[key] = (time.monotonic(), answer)

        def _check_connection_and_version_with_url(self, min_version: str = "1.9",
                                                   version_error_message: Optional[str] = None,
                                                   url: str = "/api/version") -> None:
            # Ray asks the dashboard for its version before every submit (twice in 2.60): it
            # holds for a cluster, so one answer per process is trusted for PACKAGE_CACHE_S
            key = f"version|{min_version}|{url}"
            if self._known(key) is not None:
                return
            super()._check_connection_and_version_with_url(min_version, version_error_message, url)
            self._learnt(key, "ok")

        def package_uri(self, path: str) -> str:
            """The ``gcs://`` URI of the package directory ``path`` on this cluster, uploaded if
            missing. Ray hashes, checks and uploads a ``py_modules`` path at every submission; our
            driver package is the same for every job of this process, so that is done once per
            process and cluster and trusted for PACKAGE_CACHE_S (a head restarted meanwhile is
            seen as unreachable first, and the scheduler then forgets the cluster)."""
            known = self._known(path)
            if known is not None:
                return known
            kwargs: dict[str, Any] = {"include_parent_dir": True}
            if "include_gitignore" in inspect.signature(super()._upload_package_if_needed).parameters:
                kwargs["include_gitignore"] = True
            uri = str(super()._upload_package_if_needed(path, **kwargs))
            self._learnt(path, uri)
            return uri

        def _do_request(self, method: str, endpoint: str, *, data: Optional[bytes] = None,
                        json_data: Optional[dict[str, Any]] = None, **kwargs: Any) -> Any:
            # Ray's own body, on a keep-alive session: Ray calls requests.request, a new TCP
            # connection (and a new session) per request. One session per thread, as
            # requests.Session is not documented thread-safe, so the scheduler is.
            import requests

            session = getattr(self._local, "session", None)
            if session is None:
                session = self._local.session = self._session(requests)
            kwargs.setdefault("timeout", self.request_timeout_s)
            response = session.request(method, self._address + endpoint, cookies=self._cookies, data=data,
                                       json=json_data, headers=self._headers, verify=session.verify, **kwargs)
            if _format_auth_error is not None:  # Ray >= 2.50 turns 401/403 into AuthenticationError
                formatted = _format_auth_error(response.status_code, response.text)
                if formatted:
                    raise _AuthenticationError(formatted)
            return response

        def _session(self, requests: Any) -> Any:
            return new_session(requests, self._address, self._verify)

    return TimeoutJobSubmissionClient


def new_session(requests: Any, address: str, verify: Any = True) -> Any:
    """A ``requests`` session for ``address`` with what requests reads from the environment on
    every request (proxies and NO_PROXY, the CA bundle, ~/.netrc) read once: that is ~1.5 ms of
    client time per request (scans of os.environ, a stat of ~/.netrc), and it is the same for
    every request to this one address."""
    session = requests.Session()
    env = session.merge_environment_settings(address, {}, None, verify, None)
    session.proxies.update(env["proxies"])
    session.verify = env["verify"]
    session.auth = requests.utils.get_netrc_auth(address)
    session.trust_env = False
    return session


LOG_STREAM_INTERVAL_S = 0.5  # how often Ray's agent looks again at the end of a growing log (its default: 1 s)


def has_log_stream(client: Any) -> bool:
    """Can :func:`open_log_stream` ask ``client``'s dashboard (a Jobs API client, not a test's)?"""
    return isinstance(getattr(client, "_address", None), str)


def open_log_stream(client: Any, sid: str, node_id: str, timeout: float) -> Any:
    """The job's log as the dashboard's state API streams it (``GET /api/v0/logs/stream``, what
    ``ray.util.state.get_log(submission_id=..., follow=True)`` asks): the whole log from its first
    byte in chunks of up to 64 KiB, then what is appended; it never ends by itself.

    Asked with the client's own address, headers (its token), cookies and TLS settings: the
    token goes only to the dashboard it was given for. Returns the streaming ``requests``
    response with no read timeout left (the log may stay quiet for hours), or None where there
    is no such stream: a client without those fields (a test's), or an answer other than 200 (a
    Ray without the endpoint, a log the agent cannot find); the caller then uses Ray's tail.
    Raises what requests raises: unreachable, or ``ReadTimeout`` within ``timeout`` while the
    log has no byte yet (the dashboard answers with the first chunk).
    """
    if not has_log_stream(client):
        return None
    address = client._address  # noqa: SLF001 - the one adapter (RAY_CHECKED)
    import requests

    query = urllib.parse.urlencode({"node_id": node_id, "submission_id": sid, "lines": -1,
                                    "interval": LOG_STREAM_INTERVAL_S})
    # the session is not closed here: the response's connection is still in use (it goes with the response)
    session = new_session(requests, address, client._verify)  # noqa: SLF001 - the one adapter (RAY_CHECKED)
    r = session.get(f"{address}/api/v0/logs/stream?{query}", headers=client._headers,  # noqa: SLF001
                    cookies=client._cookies, stream=True, timeout=(timeout, timeout))  # noqa: SLF001
    if r.status_code != 200:
        r.close()
        session.close()
        return None
    sock = getattr(getattr(r.raw, "connection", None), "sock", None)
    if sock is not None:
        sock.settimeout(None)  # the timeout was for the answer; the body comes when the log grows
    return r


def close_log_stream(response: Any) -> None:
    """Ends a stream of :func:`open_log_stream` now, also while another thread waits in its read
    (closing the response alone would leave that read waiting for the log's next chunk)."""
    import socket

    sock = getattr(getattr(getattr(response, "raw", None), "connection", None), "sock", None)
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


class ListedJob(NamedTuple):
    """What ``list`` reads of a job, from the Jobs REST API's ``GET /api/jobs/`` (the fields of
    Ray's JobDetails of the same names)."""

    submission_id: Optional[str]
    status: str
    metadata: Dict[str, str]
    start_time: Optional[int] = None  # ms since the epoch


def list_jobs(url: str, token_env: Optional[str], timeout: float) -> Optional[list[ListedJob]]:
    """Every job of the cluster at ``url`` from Ray's documented Jobs REST API, without Ray.

    ``client.list_jobs()`` costs a list of 2,000 jobs ~0.5 s of client time that is not the
    dashboard's: importing ray (~0.35 s, the bulk of a ``torchx list``) and a pydantic JobDetails
    per job. None where Ray's own client must ask: Ray's token authentication is on
    (``RAY_AUTH_MODE=token``: Ray finds the token), or the answer is not the Jobs API's list (an
    error status, another server): Ray's client then asks again and raises its own error.
    Transport failures (unreachable) are raised as requests raises them.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return None
    import requests

    headers = auth_headers(token_env)
    with new_session(requests, url) as session:
        r = session.get(url + "/api/jobs/", headers=headers, timeout=timeout)
    if r.status_code != 200:
        return None
    try:
        rows = r.json()
    except ValueError:
        return None
    if not isinstance(rows, list) or not all(isinstance(j, dict) for j in rows):
        return None
    return [ListedJob(j.get("submission_id"), str(j.get("status", "")), j.get("metadata") or {}, j.get("start_time"))
            for j in rows]


def package_uris(client: Any, paths: list[str]) -> list[str]:
    """``py_modules`` as URIs already on the cluster (see ``package_uri``); a client without that
    method (a test's, an old one's) gets the paths, and Ray uploads them itself."""
    if not hasattr(client, "package_uri"):
        return paths
    return [client.package_uri(p) for p in paths]


def auth_headers(token_env: Optional[str]) -> Dict[str, str]:
    """``Authorization: Bearer <token>`` from the variable named ``token_env`` (value never shown)."""
    if not token_env:
        return {}
    token = os.environ.get(token_env)
    if not token:
        raise InvalidOptionError(
            f"token_env={token_env} names an environment variable that is not set (or empty); "
            "export it with the dashboard's bearer token, or drop token_env"
        )
    return {"Authorization": f"Bearer {token}"}


def connect(url: str, token_env: Optional[str] = None, timeout: float = 10.0) -> Any:
    """A Jobs API client for ``url``; an unreachable dashboard is one clear error, quickly."""
    cls = _timeout_client_class()
    headers = auth_headers(token_env)
    try:
        # the constructor checks the connection and the Jobs API version (one GET, bounded)
        return cls(url, headers=headers or None, request_timeout_s=timeout)
    except (OSError, RuntimeError, ValueError) as e:  # requests' errors are OSErrors
        raise SchedulerUnavailable(unreachable_message(url, e)) from None


def unreachable_message(url: str, e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if len(first) > 300:
        first = first[:300] + "..."
    return f"the Ray dashboard at {url} is unreachable: {first}"


def is_unreachable(e: BaseException) -> bool:
    """Is ``e`` a transport failure (as opposed to an answer from the dashboard)?"""
    if isinstance(e, (OSError, SchedulerUnavailable)):
        return True
    try:
        import requests

        return isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout))
    except ImportError:
        return False


