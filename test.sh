#!/usr/bin/env bash
# Installs everything and runs the whole test suite against a real testbed on this machine:
# Debian packages (Slurm + munge, Docker engine), a Python env with torchx 0.7.0 and every extra,
# a Ray head, a two-node Slurm cluster, a Docker engine with locally built images and an sshd on
# loopback (the login node of remote Slurm); then lint,
# the whole suite on torchx 0.7.0, and the whole suite again on torchx-nightly.
# With CI=true a skipped test counts as a failure (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv-test}
NIGHTLY_VENV=${NIGHTLY_VENV:-.venv-nightly}
PIP_QUIET=(-q --disable-pip-version-check)
say() { echo "== $(date +%T) $*"; }
# pip prints one warning per unused local index entry on these machines; keep the log readable
pipq() { "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; return "${PIPESTATUS[0]}"; }

say "system packages (Slurm, Docker, OpenSSH server for remote Slurm)"
bash testbed/slurm.sh install
bash testbed/docker.sh install
bash testbed/sshd.sh install

say "python env $VENV (torchx 0.7.0, every extra (ray, docker), torch CPU for dist.ddp)"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
pipq "$VENV/bin/pip" install "${PIP_QUIET[@]}" "torchx==0.7.0" ".[all,test,lint]" "torch==2.13.0"

say "lint: ruff, mypy --strict on torchx_ext/"
"$VENV/bin/ruff" check .
"$VENV/bin/mypy"

# start what is not running yet; stop at exit only what we started
started=()
cleanup() {
    for tb in "${started[@]}"; do bash "testbed/$tb.sh" stop >/dev/null 2>&1 || true; done
    # the bridge and the iptables rule go with the last namespace (a no-op if another checkout's run)
    bash testbed/netns.sh gc >/dev/null 2>&1 || true
}
trap cleanup EXIT
# ray_multinode and slurm_multinode: nodes with their own addresses in network namespaces
# (testbed/README.md), for the multi-node tests
for tb in slurm docker ray sshd ray_multinode slurm_multinode; do
    # start is idempotent and writes testbed/.state/$tb.env for this checkout even when the
    # daemons were already up (another checkout); only what was down is stopped at exit
    VENV="$VENV" bash "testbed/$tb.sh" status >/dev/null 2>&1 || started+=("$tb")
    say "starting $tb testbed"
    VENV="$VENV" bash "testbed/$tb.sh" start
done

say "test suite on torchx 0.7.0"
"$VENV/bin/python" -m pytest -p no:cacheprovider tests

say "the whole suite again on torchx-nightly (same testbeds)"
[ -x "$NIGHTLY_VENV/bin/python" ] || python3 -m venv "$NIGHTLY_VENV"
pipq "$NIGHTLY_VENV/bin/pip" install "${PIP_QUIET[@]}" torchx-nightly fsspec "ray[default]" docker pytest \
    pytest-timeout "torch==2.13.0"
# --no-deps: our torchx>=0.7.0 requirement would otherwise install stable torchx over the nightly
pipq "$NIGHTLY_VENV/bin/pip" install "${PIP_QUIET[@]}" --no-deps --force-reinstall .
"$NIGHTLY_VENV/bin/python" -m pytest -p no:cacheprovider tests

say "docs: the site builds in strict mode (a broken link, anchor or API reference fails); its examples run in the suite (tests/test_docs.py)"
DOCS_VENV=${DOCS_VENV:-.venv-docs}
[ -x "$DOCS_VENV/bin/python" ] || python3 -m venv "$DOCS_VENV"
pipq "$DOCS_VENV/bin/pip" install "${PIP_QUIET[@]}" ".[docs]"
site=$(mktemp -d)
NO_MKDOCS_2_WARNING=1 "$DOCS_VENV/bin/mkdocs" build --strict --site-dir "$site"
rm -rf "$site"

say "editable install (pip install -e .) registers our schedulers: torchx 0.7.0 and torchx-nightly"
for tx in "torchx==0.7.0" torchx-nightly; do
    tmp=$(mktemp -d)
    python3 -m venv "$tmp/venv"
    pipq "$tmp/venv/bin/pip" install "${PIP_QUIET[@]}" "$tx" fsspec
    # --no-deps: our torchx>=0.7.0 requirement would otherwise install stable torchx over the nightly
    pipq "$tmp/venv/bin/pip" install "${PIP_QUIET[@]}" --no-deps -e .
    # one scheduler at a time: `torchx runopts` alone stops at torchx 0.7.0's own ray module without ray
    for s in host slurm_jobs docker_jobs ray_jobs local_cwd; do
        (cd "$tmp" && env -u PYTHONPATH "$tmp/venv/bin/torchx" runopts "$s" | grep -q "usage:") ||
            { echo "editable install on $tx: torchx runopts $s lists no options"; exit 1; }
    done
    (cd "$tmp" && env -u PYTHONPATH TORCHX_EXT_HOME="$tmp/home" "$tmp/venv/bin/torchx" run -s host --wait \
        utils.echo --msg editable-install-ok)
    rm -rf "$tmp"
done
say "all green"
