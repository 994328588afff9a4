"""One module per backend: ``host``, ``ray_jobs``, ``slurm_jobs``, ``docker_jobs``.

Each exposes ``create_scheduler(session_name, **kwargs)`` and its typed executor class; heavy
dependencies (ray, docker) are imported inside the code that needs them.
"""
