"""The cluster side of ``ray_jobs``: code that runs *inside* the Ray cluster.

This package is uploaded with every submission (``runtime_env["py_modules"]``, content-hashed, so
Ray uploads it once per version) and imported there as ``ray_jobs_cluster``, with the group engine
(:mod:`torchx_ext.engine`, standard library only) inside it as ``ray_jobs_cluster.engine``
(``ray_jobs.local.cluster_package``): the cluster needs Ray and nothing of torchx or torchx-ext.
Hence the rule for every module here: standard library and ``ray`` only, and relative imports
between these modules (the one exception, in the driver and :mod:`.readiness`: the engine, from here
or from torchx_ext).

* :mod:`.driver` — the job entrypoint of every app: reserves the gang, starts one process per
  replica, performs the group engine's decisions, multiplexes the replicas' output into the job log;
* :mod:`.gang` — the replicas' places: the driver itself (one replica), or a placement group
  with a Ray actor per replica, reserved all or nothing;
* :mod:`.readiness` — the services' readiness: the driver connects to their ports where they run;
* :mod:`.supervision` — what ends a driver besides its app: a lost job supervisor, a lost stop;
* :mod:`.replica` — runs one replica's process (in the driver, or in a Ray actor of the gang);
* :mod:`.broker` — one long-running job per cluster that starts dependents when their
  dependencies succeed (so waiting apps cost the cluster nothing but a job record).
"""

# The wire format shared with torchx_ext.schedulers.ray_jobs.scheduler (client side). Version it if changed.
SPEC_ENV = "TORCHX_EXT_RAY_SPEC"
# Ray expands $VAR and drops ${VAR} in runtime_env env_vars values (os.path.expandvars, no
# escape), so the spec and any value containing "$" travel base64-encoded; values of variables
# named ENV_B64_PREFIX + NAME are decoded into NAME for the replicas.
ENV_B64_PREFIX = "TORCHX_EXT_B64__"
# The driver writes a replica's output to the job log in frames: a header line
#   FRAME_MARK role replica stream time length
# followed by ``length`` characters of the replica's lines (whole lines, as they came), so that the
# client takes a replica's text by slicing, not line by line, and skips the other replicas' frames
# without reading them (bench/bench_ray_jobs.py, "following a replica's log"). A frame's lines
# share its time (its first line's; a frame spans at most FRAME_S): since/until are that precise.
# Ray serves the log read in text mode with universal newlines ("\r" and "\r\n" become "\n"), so
# the driver applies that translation to a frame's text itself before counting it: the length
# holds on both sides, and a replica's "\r" reaches `torchx log` as Ray's own reads deliver it.
# (Version 2 of the wire format: version 1 marked every line with "\x1etx ", which a reader of
# version 2 shows as Ray's own lines in the driver's log, not as a replica's.)
FRAME_MARK = "\x1etxf "
FRAME_S = 0.05
VERDICT_MARK = "\x1etx-verdict "
# The driver's own line on each restart: "restart N: why"
RESTART_MARK = "restart "
# How describe learns num_restarts of a job Ray reports RUNNING or SUCCEEDED (whose message carries
# no verdict) without reading its log: the driver of an app with retries keeps {"num_restarts": N}
# (and, when a service has ports, "held": the [role, replica]s not started until the services are ready)
# in this file beside its job log (Ray's log directory of its node), which the client reads through
# the dashboard's state API (GET /api/v0/logs/file?node_id=<driver node>&filename=...)
RESTARTS_FILE = "torchx-ext-{}.restarts.json"
DRIVER_ROLE = "d"
# A waiting record (a dependent app not started yet) is a Ray job that asks for RECORD_RESOURCE,
# which no node has: Ray keeps it PENDING without starting its job supervisor (a process and ~0.7 s
# of head time each), so a hundred records do not delay the jobs that run. The broker releases the
# record's supervisor (ray.kill) once the app is decided. Records carrying RECORD_HELD in their
# metadata are such records: their Ray status says nothing about the app (Ray fails a supervisor
# still pending after RAY_JOB_START_TIMEOUT_SECONDS, 15 min by default, and a released one).
RECORD_RESOURCE = "torchx_ext_waiting_record"
RECORD_HELD = "torchx_ext_record_held"
# A gang's placement group is named PG_PREFIX + submission id, so that describe() can tell a gang
# still waiting for its resources (PENDING) from one that runs
PG_PREFIX = "torchx-ext-pg-"


def already_exists(error: BaseException) -> bool:
    """Did the Jobs API refuse a submission because its submission id is taken?

    The one place that reads Ray's text for it: the dashboard answers HTTP 400 with "Job with
    submission_id ... already exists" and the client raises a plain RuntimeError with that text (a
    400 is also every other rejection). Claiming an id this way is how an app's outcome is decided
    exactly once (cancel vs. broker), so this is tested against a real head.
    """
    return isinstance(error, RuntimeError) and "already exists" in str(error)
