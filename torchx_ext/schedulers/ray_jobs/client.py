"""The Jobs API side of ``ray_jobs``: addresses and app ids, the client, jobs, their states and logs.

Nothing here imports ray at module import: ``torchx runopts`` and ``--dryrun`` must stay cheap
(``from ray.job_submission import JobSubmissionClient`` alone costs ~0.6 s).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import inspect
import json
import logging
import os
import re
import threading
import time
import urllib.parse
import weakref
from typing import Any, Callable, Dict, Optional

from torchx.specs import AppState

from torchx_ext.errors import InvalidOptionError, MissingExtraError, SchedulerUnavailable
from torchx_ext.logs import LogItem, PlainLines
from torchx_ext.schedulers.ray_jobs import cluster as cluster
from torchx_ext.schedulers.ray_jobs.cluster.broker import KIND

APP_SEP = "~"  # app id = <address>~<submission id>; neither part can contain it


# ---------------------------------------------------------------------------- addresses ----
def resolve_dashboard(cfg_value: Optional[str]) -> str:
    """The dashboard URL from the run option, else ``$RAY_ADDRESS`` when it is an http(s) URL."""
    url = cfg_value or os.environ.get("RAY_ADDRESS", "")
    if not url:
        raise InvalidOptionError(
            "ray_jobs needs the Ray dashboard (Jobs API) address: pass -cfg dashboard_url=http://HEAD:8265, "
            "set it in the [ray_jobs] section of .torchxconfig, or export RAY_ADDRESS=http://HEAD:8265"
        )
    if "://" not in url:
        url = "http://" + url
    scheme = url.split("://", 1)[0]
    if scheme not in ("http", "https"):
        raise InvalidOptionError(
            f"'{url}' is not a Ray dashboard address: the Jobs API is HTTP (http://HEAD:8265); "
            f"'{scheme}://' addresses (GCS, Ray Client) cannot submit jobs"
        )
    return url.rstrip("/")


def encode_address(url: str) -> str:
    """``http://127.0.0.1:8265`` → ``127.0.0.1:8265``; anything else is percent-encoded."""
    rest = url[len("http://"):] if url.startswith("http://") else url
    return urllib.parse.quote(rest, safe=":@")


def decode_address(addr: str) -> Optional[str]:
    """The dashboard URL an app id names, or None when it is not an http(s) URL (such an id is
    no app of ours: nothing is asked of it)."""
    url = urllib.parse.unquote(addr)
    url = url if "://" in url else "http://" + url
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in ("http", "https") or not rest.strip("/"):
        return None
    return url.rstrip("/")


def same_dashboard(a: str, b: str) -> bool:
    """Do two dashboard URLs name the same endpoint? Scheme and host compare case-insensitively,
    a trailing slash is dropped; anything else (another port, path or scheme) is another one."""
    def key(url: str) -> tuple[str, str, str]:
        parts = urllib.parse.urlsplit(url.rstrip("/"))
        return parts.scheme.lower(), parts.netloc.lower(), parts.path

    return key(a) == key(b)


def make_app_id(url: str, submission_id: str) -> str:
    return f"{encode_address(url)}{APP_SEP}{submission_id}"


def split_app_id(app_id: str) -> tuple[Optional[str], str]:
    """``(dashboard url or None, submission id)``; a bare id uses ``$RAY_ADDRESS``; an id whose
    address is not http(s) has no dashboard."""
    if APP_SEP in app_id:
        addr, sid = app_id.rsplit(APP_SEP, 1)
        return decode_address(addr), sid
    env = os.environ.get("RAY_ADDRESS", "")
    return (resolve_dashboard(env) if env.startswith(("http://", "https://")) else None), app_id


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
            """A session with what requests reads from the environment on every request (proxies
            and NO_PROXY, the CA bundle, ~/.netrc) read once: that is ~1.5 ms of client time per
            request (scans of os.environ, a stat of ~/.netrc), and it is the same for every
            request to this one address."""
            session = requests.Session()
            env = session.merge_environment_settings(self._address, {}, None, self._verify, None)
            session.proxies.update(env["proxies"])
            session.verify = env["verify"]
            session.auth = requests.utils.get_netrc_auth(self._address)
            session.trust_env = False
            return session

    return TimeoutJobSubmissionClient


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


def _get(client: Any, endpoint: str) -> Any:
    """A GET on the Jobs API; None for HTTP 404 (decided on the status code, not on text)."""
    r = request(client, "GET", endpoint)
    if r.status_code == 404:
        return None
    if r.status_code != 200:
        raise_error(client, r)
    return r.json()


def supports_label_selector(client: Any) -> bool:
    """Older Ray clients (< 2.55) have no ``entrypoint_label_selector`` (they raise TypeError)."""
    try:
        return "entrypoint_label_selector" in inspect.signature(client.submit_job).parameters
    except (TypeError, ValueError):
        return False


def placement_state(client: Any, name: str) -> Optional[str]:
    """State of the placement group ``name`` from the dashboard's state API: PENDING, PREPARED,
    CREATED, RESCHEDULING, REMOVED, or ABSENT (not created yet); None if the API gives no answer
    (then the caller keeps the job's own state: one extra request must not break describe)."""
    query = urllib.parse.urlencode({"filter_keys": "name", "filter_predicates": "=", "filter_values": name,
                                    "limit": 10, "detail": 0})
    try:
        rows = request(client, "GET", "/api/v0/placement_groups?" + query).json()["data"]["result"]["result"]
    except Exception:  # noqa: BLE001 - any failure of this extra request: the job's own state stands
        return None
    states = [row.get("state") for row in rows if row.get("name") == name]
    return str(states[0]) if states else "ABSENT"


# ---------------------------------------------------------------------------- jobs, logs ---
class LogDemux:
    """Turns the job log's text, fed in pieces, into the lines of one replica (or of the driver).

    ``key``: ``(role index, replica)``, or None for the driver's own lines and Ray's; ``stream``:
    ``"o"``/``"e"`` or None for both; ``timed``: hand each line with its frame's time (only
    since/until need it: without it a replica's lines come as :class:`PlainLines`, one item per
    piece, and a line without a time is never dropped by a filter). The log is a sequence of
    frames (``cluster.FRAME_MARK``), the verdict line, and Ray's own lines: a frame's text is taken
    or skipped by its length, so the cost is per frame and per piece, not per line of the log.
    A replica line's text keeps its newline (``filter_lines`` adds one only where it is missing).
    """

    _LINES = re.compile(".*\n")  # whole lines; "." is anything but "\n" (splitlines also splits at \x1e...)

    def __init__(self, key: Optional[tuple[str, int]], stream: Optional[str], timed: bool = True) -> None:
        self.key, self.stream, self.timed = key, stream, timed
        self._want = (cluster.DRIVER_ROLE, "0") if key is None else (str(key[0]), str(key[1]))
        self._partial = ""  # a header or unframed line whose end has not come yet
        self._left = 0  # characters of the current frame still to come
        self._mine = False  # the current frame is this reader's
        self._time: Optional[float] = None  # the current frame's time
        self._held = ""  # this reader's frame text after its last complete line

    def feed(self, text: str) -> list[LogItem]:
        """The complete lines of ``text`` (after what was fed before) that are this reader's."""
        out: list[LogItem] = []
        if self._partial:
            text, self._partial = self._partial + text, ""
        pos, end = 0, len(text)
        while pos < end:
            if self._left:
                take = min(self._left, end - pos)
                if self._mine:
                    self._take(text[pos:pos + take], out)
                pos += take
                self._left -= take
                if not self._left and self._held:  # a frame must end with its line's end: it did not
                    self._take("\n", out)
                continue
            nl = text.find("\n", pos)
            if nl < 0:
                self._partial = text[pos:]
                break
            self._line(text[pos:nl], out)
            pos = nl + 1
        return out

    def _line(self, line: str, out: list[LogItem]) -> None:
        """A line outside any frame: a frame's header, the verdict, or Ray's own."""
        if line.startswith(cluster.FRAME_MARK):
            parts = line[len(cluster.FRAME_MARK):].split(" ")
            if len(parts) == 5 and parts[4].isdigit():
                role, replica, stream, ts, length = parts
                self._left = int(length)
                self._mine = ((role, replica) == self._want
                              and (self.stream is None or stream == self.stream))
                if self._mine:
                    try:
                        self._time = float(ts) if self.timed or self.key is None else None
                    except ValueError:
                        self._time = None
                return
        if line.startswith(cluster.VERDICT_MARK):
            return
        if self.key is None:  # Ray's own lines and anything else the driver printed
            out.append((None, line))

    def _take(self, piece: str, out: list[LogItem]) -> None:
        if self._held:
            piece, self._held = self._held + piece, ""
        cut = piece.rfind("\n") + 1
        if cut < len(piece):
            self._held = piece[cut:]
        if not cut:
            return
        lines = self._LINES.findall(piece, 0, cut)
        if self.key is not None and not self.timed:
            out.append(PlainLines(lines))
        else:
            t = self._time
            out.extend([(t, line) for line in lines])


def _not_a_normal_close(record: logging.LogRecord) -> bool:
    return not (record.levelno <= logging.INFO and str(record.msg).startswith("WebSocket closed for job"))


@functools.cache
def _quiet_tail_close() -> None:
    """Ray's client logs an INFO line at every normal end of a tail ("WebSocket closed for job
    ..."), which Ray's own handler prints under ``torchx log -t``: that one line is dropped."""
    logging.getLogger("ray.dashboard.modules.job.sdk").addFilter(_not_a_normal_close)


class _Pump:
    """Ray's log tail of one job (``JobSubmissionClient.tail_job_logs``: the dashboard's
    ``/api/jobs/<id>/logs/tail`` websocket, with the client's own headers and cookies, to the
    client's own address) run in a thread of its own, collecting what arrives for ``take``.

    It holds no reference to its reader: a reader dropped by its caller (a ``log_iter`` left
    early) is collected, and its finalizer cancels the tail."""

    LIMIT = 32 << 20  # characters held for a reader that lags; then the tail waits (TCP slows the dashboard)

    def __init__(self, client: Any, sid: str, skip: int) -> None:
        self.stopped = threading.Event()
        self.error: Optional[BaseException] = None
        self._cond = threading.Condition()
        self._pieces: list[str] = []
        self._size = 0
        self._finished = False  # the tail ended (see error); set after its last piece
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._task: Optional[asyncio.Task[None]] = None
        self.thread = threading.Thread(target=self._run, args=(client, sid, skip), name=f"ray-log-tail-{sid}",
                                       daemon=True)
        self.thread.start()

    def take(self) -> tuple[list[str], bool]:
        """What arrived since the last call, and whether the tail has ended (nothing follows)."""
        with self._cond:
            pieces, self._pieces, self._size = self._pieces, [], 0
            self._cond.notify_all()
            return pieces, self._finished

    def _put(self, piece: str) -> None:
        with self._cond:
            while self._size >= self.LIMIT and not self.stopped.is_set():
                self._cond.wait(0.5)  # blocks this loop while the reader lags
            self._pieces.append(piece)
            self._size += len(piece)

    async def _tail(self, client: Any, sid: str, skip: int) -> None:
        _quiet_tail_close()
        tail = client.tail_job_logs(sid)
        try:
            async for piece in tail:
                if skip:  # a resumed tail starts from the log's beginning again
                    cut = min(skip, len(piece))
                    piece, skip = piece[cut:], skip - cut
                if piece:
                    self._put(piece)
                if self.stopped.is_set():
                    return
        finally:
            await tail.aclose()

    def _run(self, client: Any, sid: str, skip: int) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            self._task = loop.create_task(self._tail(client, sid, skip))
            loop.run_until_complete(self._task)
        except BaseException as e:  # noqa: B036, BLE001 - handed to the reader, which decides what it means
            self.error = e
        finally:
            loop.close()
            with self._cond:
                self._finished = True

    def stop(self) -> None:
        self.stopped.set()
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop is closed: the tail is over
                pass


class JobLogReader:
    """New lines of one replica (or of the driver) from the job's log, demultiplexed.

    Two ways to read, chosen by the caller's first call (:func:`torchx_ext.logs.follow` asks
    ``is_done`` first only when it follows):

    * ``read_new`` first: a one-shot read of the whole log as it is now (``GET /api/jobs/<id>/logs``);
      a later ``read_new`` gets what came since (the whole log again: for a read, not a follow);
    * ``is_done`` first (following): Ray's log tail (see :class:`_Pump`) delivers each byte of
      the log once, as it is written, until the job ends; ``read_new`` returns what arrived.
      Without a Ray job yet (an app waiting for its dependencies) it waits as before; a tail that
      ends while the app runs (the dashboard or the driver node's agent restarted) is resumed,
      skipping what was read; ``is_over`` (the app ended, or its dashboard is lost) ends a follow
      whose tail Ray does not end (a job Ray still holds PENDING).
    """

    CHECK_S = 2.0  # while the tail streams, the app's state is asked this often
    QUIET_S = 5.0  # the app is over and the tail was silent this long: nothing more will come
    MAX_FAILED_STARTS = 3  # tails that ended at once, in a row: read the whole log, as before

    def __init__(self, client: Any, sid: str, key: Optional[tuple[str, int]], stream: Optional[str],
                 is_over: Optional[Callable[[], bool]] = None, timed: bool = True) -> None:
        self.client, self.sid, self.key, self.stream = client, sid, key, stream
        self.demux = LogDemux(key, stream, timed)
        self.is_over = is_over or (lambda: True)
        self.offset = 0  # characters of the log fed to the demultiplexer
        self._following = False
        self._pump: Optional[_Pump] = None
        self._finalizer: Optional[Callable[[], Any]] = None  # a weakref.finalize
        self._failed_starts = 0
        self._got_data = False  # the current tail delivered something
        self._ended = False  # the current tail ended (normally or with an error), and all it got was taken
        self._last_check = 0.0
        self._last_data = 0.0
        self._whole = False  # fell back to whole-log reads

    # -------------------------------------------------------------- one-shot ----------------
    def _read_whole(self) -> list[LogItem]:
        found = _get(self.client, f"/api/jobs/{self.sid}/logs")
        if found is None:  # still waiting for its dependencies
            return []
        text = str(found.get("logs") or "")
        piece, self.offset = text[self.offset:], max(self.offset, len(text))
        return self.demux.feed(piece)

    def read_new(self) -> list[LogItem]:
        if not self._following or self._whole:
            return self._read_whole()
        if self._pump is None:
            return []
        pieces, self._ended = self._pump.take()
        if not pieces:
            return []
        self._got_data = True
        self._last_data = time.monotonic()
        text = "".join(pieces)
        self.offset += len(text)
        return self.demux.feed(text)

    # -------------------------------------------------------------- following ---------------
    def is_done(self) -> bool:
        """Nothing more will come after the next ``read_new``; starts (and resumes) the tail."""
        self._following = True
        if self._whole:
            return self.is_over()
        pump = self._pump
        if pump is None:
            if self.is_over():
                self._whole = True  # ended before it was ever followed (or never ran): read it once
                return True
            self._start()
            return False
        if self._ended:
            # Ray ends its tail once the job is over and the log is read to its end; any other
            # end (an error, a restarted dashboard or agent) while the app runs is resumed
            if self.is_over():
                return True
            self._failed_starts = 0 if self._got_data else self._failed_starts + 1
            if self._failed_starts >= self.MAX_FAILED_STARTS:
                self._whole = True  # this dashboard does not tail: read the whole log, as before
                return False
            self._start()
            return False
        if not pump.thread.is_alive():
            return False  # its end is taken by the next read_new
        now = time.monotonic()
        if now - self._last_check < self.CHECK_S:
            return False
        self._last_check = now
        return self.is_over() and now - self._last_data >= self.QUIET_S

    def _start(self) -> None:
        job = get_job(self.client, self.sid)
        meta = (job.metadata or {}) if job is not None else {}
        if job is None or meta.get(KIND) == "verdict":
            # no Ray job yet (waiting for dependencies), or a decided app that never ran: nothing to tail
            self._pump = None
            return
        self.stop()
        self._ended = self._got_data = False
        self._last_data = time.monotonic()
        self._pump = _Pump(self.client, self.sid, self.offset)
        self._finalizer = weakref.finalize(self, self._pump.stop)

    def stop(self) -> None:
        """Ends the tail (if any) now."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None


def get_job(client: Any, sid: str) -> Any:
    """The job's JobDetails, or None if the cluster has no job with that submission id.

    The same request as ``client.get_job_info``, which answers a missing job only with a
    RuntimeError whose text holds "404" (as a hex submission id may)."""
    from ray.job_submission import JobDetails

    found = _get(client, f"/api/jobs/{sid}")
    return None if found is None else JobDetails(**found)


def job_status(job: Any) -> str:
    return str(getattr(job.status, "value", job.status))


STATES = {"PENDING": AppState.PENDING, "RUNNING": AppState.RUNNING, "SUCCEEDED": AppState.SUCCEEDED,
          "FAILED": AppState.FAILED, "STOPPED": AppState.CANCELLED}


CANCELLED_SUFFIX = "--cancelled"  # the marker job a cancel of a pending app leaves


def job_state(client: Any, job: Any, marker: Optional[bool] = None) -> tuple[AppState, str, dict[str, Any]]:
    """An app job's state, message and the driver's verdict (per-replica states). ``marker``:
    whether the job has a cancel marker, if known (else it is asked for when needed)."""
    meta = job.metadata or {}
    if meta.get(KIND) == "verdict":  # decided without running: cancelled or failed dependency
        return AppState[meta.get("torchx_ext_verdict", "FAILED")], meta.get("torchx_ext_msg", ""), {}
    st = STATES.get(job_status(job), AppState.UNKNOWN)
    verdict = parse_verdict(job.message or "")
    msg = verdict.get("msg") or ("" if st == AppState.SUCCEEDED else (job.message or ""))
    if st == AppState.PENDING and (marker if marker is not None
                                   else get_job(client, job.submission_id + CANCELLED_SUFFIX) is not None):
        # Ray keeps a stopped job PENDING while it cannot be placed (up to 15 min)
        return AppState.CANCELLED, "cancelled by user before it could be placed", verdict
    if st == AppState.CANCELLED:
        msg = "stopped (cancelled)"
    elif st == AppState.FAILED and verdict.get("state") == "CANCELLED":
        # the driver found the cancel marker of a stop that never reached it and ended itself
        st = AppState.CANCELLED
    pg_name = meta.get("torchx_ext_placement_group")
    if st == AppState.RUNNING and pg_name:
        # the driver runs, but the gang's replicas start only once its placement group is
        # reserved: until then the app is PENDING, as TorchX means it (waiting for resources)
        pg = placement_state(client, pg_name)
        if pg in ("ABSENT", "PENDING", "PREPARED"):
            return AppState.PENDING, (f"waiting for the cluster to reserve the group's resources "
                                      f"(placement group {pg_name}: {pg.lower()})"), verdict
    return st, msg, verdict


def listed_apps(jobs: list[Any]) -> list[tuple[str, AppState, str]]:
    """(submission id, state, app name) of every torchx-ext app among a cluster's jobs (waiting ones too)."""
    ids = {j.submission_id for j in jobs}
    out = []
    for job in jobs:
        meta = job.metadata or {}
        kind, name = meta.get(KIND), str(meta.get("torchx_ext_app", ""))
        if kind == "verdict":
            out.append((job.submission_id, AppState[meta["torchx_ext_verdict"]], name))
        elif kind == "app":
            out.append((job.submission_id, STATES.get(job_status(job), AppState.UNKNOWN), name))
        elif kind == "waiting" and meta.get("torchx_ext_submission_id") not in ids:
            out.append((meta["torchx_ext_submission_id"], AppState.PENDING, name))
    return out


def claim(client: Any, sid: str, metadata: dict[str, str]) -> bool:
    """Submits a job that exits at once under ``sid``; False if the id is taken already."""
    try:
        client.submit_job(entrypoint="exit 0", submission_id=sid, metadata=metadata)
        return True
    except RuntimeError as e:
        if cluster.already_exists(e):
            return False
        raise


def delete_jobs(client: Any, ids: list[str], patience_s: float = 40) -> None:
    """Deletes jobs once they are over. Ray's job monitor can write a just-ended job back (FAILED,
    "supervisor actor died") after delete_job: delete once over for a while, and again if it returns."""
    deadline = time.time() + patience_s
    while ids and time.time() < deadline:
        for job_id in list(ids):
            job = get_job(client, job_id)
            if job is None:
                ids.remove(job_id)
            elif job_status(job) not in ("PENDING", "RUNNING") and time.time() - (job.end_time or 0) / 1000 > 3:
                client.delete_job(job_id)
        time.sleep(1.0)


def request_fields(url: str, app_id: str, sid: str, job: Any) -> dict[str, Any]:
    """A submitted app's request (RayJobsRequest's fields), read back from its job (or its waiting
    record): what describe_native returns. Secret values stay masked by the request's repr."""
    meta = dict(job.metadata or {})
    waiting = meta.get(KIND) == "waiting"
    runtime_env = dict(job.runtime_env or {})
    if waiting:
        app_meta = json.loads(meta.get("torchx_ext_app_metadata", "{}"))
        resources = json.loads(meta.get("torchx_ext_submit_kwargs", "{}"))
        if "torchx_ext_pip" in meta:
            runtime_env["pip"] = json.loads(meta["torchx_ext_pip"])
    else:
        app_meta = meta
        resources = {k: getattr(job, k) for k in ("entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory",
                                                    "entrypoint_resources") if getattr(job, k, None)}
    encoded = (runtime_env.get("env_vars") or {}).get(cluster.SPEC_ENV, "")
    spec = json.loads(base64.b64decode(encoded)) if encoded else {}
    return {"dashboard_url": url, "app_id": app_id, "submission_id": sid,
            "entrypoint": meta.get("torchx_ext_entrypoint") if waiting else job.entrypoint,
            "runtime_env": runtime_env, "metadata": app_meta, "entrypoint_resources": resources,
            "label_selector": dict(spec.get("label_selector") or {}),
            "dependencies": json.loads(meta.get("torchx_ext_dependencies", "[]")), "spec": spec,
            "preflight_needs": [], "secret_names": json.loads(app_meta.get("torchx_ext_secret_names", "[]"))}


def from_ray(e: BaseException) -> bool:
    """Was ``e`` raised inside Ray's own code (its client refusing a request)?"""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("ray.")


def parse_verdict(message: str) -> dict[str, Any]:
    """The driver's verdict line, which Ray repeats in a failed job's message (last logs)."""
    idx = message.rfind(cluster.VERDICT_MARK)
    if idx < 0:
        return {}
    line = message[idx + len(cluster.VERDICT_MARK):].split("\n", 1)[0]
    try:
        return dict(json.loads(line))
    except ValueError:
        return {}


def ray_version() -> str:
    try:
        import ray

        return f"ray {ray.__version__}"
    except ImportError:
        return "no ray"


RESTARTS_TIMEOUT_S = 3


def published_restarts(client: Any, job: Any) -> Optional[int]:
    """num_restarts of a running (or SUCCEEDED) app, as its driver published it: a small file
    beside the job's driver log (``ray_jobs_cluster.RESTARTS_FILE``), read through the dashboard's
    state API (``/api/v0/logs/file``, what ``ray.util.state.get_log`` asks) on the driver's node.
    None when there is none to read (a driver of an older version, a lost node): then 0 is shown."""
    node = getattr(job, "driver_node_id", None)
    if not node:
        return None
    # the dashboard asks the node's agent, for up to `timeout` s (30 by default): a lost node must
    # not hold describe, nor read as a lost dashboard (which get_job, just before, has ruled out)
    query = urllib.parse.urlencode({"node_id": node, "filename": cluster.RESTARTS_FILE.format(job.submission_id),
                                    "lines": 1, "timeout": RESTARTS_TIMEOUT_S})
    try:
        r = request(client, "GET", "/api/v0/logs/file?" + query, timeout=RESTARTS_TIMEOUT_S + 2)
        if r.status_code != 200:  # no such file (Ray answers 500 with text), or no node to ask
            return None
        return int(json.loads(r.text)["num_restarts"])
    except Exception:  # noqa: BLE001 - one extra request must not break describe (as placement_state)
        return None
