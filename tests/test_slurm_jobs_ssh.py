"""slurm_jobs' SSH transport (:mod:`torchx_ext.schedulers.slurm_jobs.ssh`) against a real sshd.

The sshd is testbed/sshd.sh's: 127.0.0.1, key authentication, the non-root user ``txe`` and a
client config with the ``txe-login`` alias (read from testbed/.state/sshd.env by conftest). The
last section needs no sshd: ssh's failure messages (as the real ssh printed them) and target parsing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import uuid
from typing import Iterator

import pytest

from conftest import require_backend
from torchx_ext.errors import BackendError, InvalidOptionError, SchedulerUnavailable
from torchx_ext.schedulers.slurm_jobs import transfer
from torchx_ext.schedulers.slurm_jobs.ssh import SshLogin, ssh_failure_message

HOSTILE = ["a b", "it's", '"double"', "$HOME", "${PATH}", "`id`", "$(id)", "é🙂", "", "*", "?", "[a]", "\\",
           "back\\slash", "a\nb", "tab\there", "-x", "--", ";ls", "a'; echo foo", "!x", "~", "#comment", "&", "|"]


# -- fixtures ----------------------------------------------------------------------------------------

def _testbed(name: str) -> str:
    return require_backend(name, "sshd")


@pytest.fixture
def fresh_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A TORCHX_EXT_HOME of the test's own: no master connection of another test is reused.

    Short, under /tmp: the control sockets live there and unix socket paths are short.
    """
    path = tempfile.mkdtemp(prefix="txs")
    monkeypatch.setenv("TORCHX_EXT_HOME", path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sshd() -> dict[str, str]:
    """The testbed's coordinates."""
    return {k: _testbed(f"TORCHX_EXT_TEST_SSH_{k.upper()}") for k in ("config", "host", "port", "key", "user")}


@pytest.fixture
def login(sshd: dict[str, str], fresh_home: str) -> Iterator[SshLogin]:
    """The testbed's login node by its Host alias, as a user with a working ``ssh login`` has it."""
    with SshLogin(sshd["host"], config_file=sshd["config"]) as node:
        yield node


def _config(tmp_path: object, known_hosts: str) -> str:
    """An ssh config naming only a known_hosts file (no key, no user): the target says the rest."""
    path = os.path.join(str(tmp_path), "ssh_config")
    with open(path, "w") as f:
        f.write(f"Host *\n  UserKnownHostsFile {known_hosts}\n  StrictHostKeyChecking yes\n  IdentitiesOnly yes\n")
    return path


def _known_hosts(sshd: dict[str, str]) -> str:
    return os.path.join(os.path.dirname(sshd["config"]), "known_hosts")


def _fresh_key(tmp_path: object) -> str:
    key = os.path.join(str(tmp_path), "unauthorized_key")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    return key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _one_line_naming(e: pytest.ExceptionInfo[SchedulerUnavailable], name: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg and name in msg, msg
    return msg


# -- commands ----------------------------------------------------------------------------------------

def test_round_trip(login: SshLogin, sshd: dict[str, str]) -> None:
    proc = login.run(["sh", "-c", 'echo "out $(id -un)"; echo err >&2; exit 3'])
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, f"out {sshd['user']}\n", "err\n")
    assert login.name == sshd["host"]


def test_slurm_commands_on_the_remote_path(login: SshLogin) -> None:
    proc = login.run(["sbatch", "--version"])
    assert proc.returncode == 0 and proc.stdout.startswith("slurm"), proc


def test_remote_exit_255_is_the_commands(login: SshLogin) -> None:
    # ssh's own failures exit 255 too: a command that does is still returned, not raised
    proc = login.run(["sh", "-c", "printf 'no newline' >&2; exit 255"])
    assert (proc.returncode, proc.stderr) == (255, "no newline")


def test_hostile_arguments_arrive_exactly(login: SshLogin) -> None:
    proc = login.run(["python3", "-c", "import json,sys; print(json.dumps(sys.argv[1:]))", *HOSTILE])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == HOSTILE


def test_stdin_arrives_exactly(login: SshLogin) -> None:
    text = "héllo 'q' \"dq\" $HOME\n\tno newline at the end"
    assert login.run(["cat"], stdin=text).stdout == text


def test_run_bytes_returns_stdout_byte_for_byte(login: SshLogin) -> None:
    # a log read from a byte offset: invalid UTF-8, a lone \r and a partial line stay as they are
    proc = login.run_bytes(["printf", "\\377\\376 a\\r\\nb\\303"])
    assert (proc.returncode, proc.stdout) == (0, b"\xff\xfe a\r\nb\xc3"), proc
    proc = login.run_bytes(["tail", "-c", "+3", "--", "/nonexistent/log"])
    assert proc.returncode == 1 and proc.stdout == b"" and "nonexistent" in proc.stderr


def test_run_script_on_stdin(login: SshLogin) -> None:
    script = """set -e
for a in "$@"; do printf '<%s>\\n' "$a"; done
cat <<'EOF'
$HOME stays 'literal'
EOF
exit 7
"""
    proc = login.run_script(script, ["x y", "$HOME", ""])
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "<x y>\n<$HOME>\n<>\n$HOME stays 'literal'\n"


def test_connection_is_reused(login: SshLogin) -> None:
    login.run(["true"])
    assert login.is_connected()
    assert stat.S_IMODE(os.stat(login.control_dir).st_mode) == 0o700
    sockets = [n for n in os.listdir(login.control_dir) if stat.S_ISSOCK(os.stat(os.path.join(login.control_dir, n)).st_mode)]
    assert len(sockets) == 1, sockets
    # a second node object (another process, say) goes through the same master
    other = SshLogin(login.name, config_file=_testbed("TORCHX_EXT_TEST_SSH_CONFIG"))
    assert other.is_connected() and other.run(["true"]).returncode == 0
    assert len(os.listdir(login.control_dir)) == 1
    login.close()
    assert not login.is_connected()
    assert login.run(["true"]).returncode == 0  # and a new master after close


def test_user_host_port_target(sshd: dict[str, str], fresh_home: str, tmp_path: object) -> None:
    target = f"{sshd['user']}@127.0.0.1:{sshd['port']}"
    with SshLogin(target, identity_file=sshd["key"], config_file=_config(tmp_path, _known_hosts(sshd))) as node:
        assert node.name == target
        assert node.run(["id", "-un"]).stdout == f"{sshd['user']}\n"
        # rsync gets the user as "-l USER" before ssh's "--", and the host alone after it
        ws = os.path.join(str(tmp_path), "ws")
        files = _workspace(ws)
        remote = f"torchx_ext_test/{uuid.uuid4().hex[:8]}"
        try:
            assert transfer.sync_dir(node, ws, remote) > 0
            assert _remote_tree(node, remote) == _expected_tree(files)
        finally:
            node.run(["rm", "-rf", "--", remote])


def test_timeout(login: SshLogin) -> None:
    with pytest.raises(SchedulerUnavailable, match="did not answer within 1 s"):
        login.run(["sleep", "5"], timeout=1)


# -- ssh's own failures: one line naming the host and what to check ------------------------------------

def test_refused_key(sshd: dict[str, str], fresh_home: str, tmp_path: object) -> None:
    target = f"{sshd['user']}@127.0.0.1:{sshd['port']}"
    node = SshLogin(target, identity_file=_fresh_key(tmp_path), config_file=_config(tmp_path, _known_hosts(sshd)))
    with pytest.raises(SchedulerUnavailable) as e:
        node.run(["true"])
    msg = _one_line_naming(e, target)
    assert "refused" in msg and "identity file" in msg and f"ssh {target}" in msg


def test_unknown_host_key(sshd: dict[str, str], fresh_home: str, tmp_path: object) -> None:
    empty = os.path.join(str(tmp_path), "empty_known_hosts")
    open(empty, "w").close()
    node = SshLogin(f"{sshd['user']}@127.0.0.1:{sshd['port']}", identity_file=sshd["key"],
                    config_file=_config(tmp_path, empty))
    with pytest.raises(SchedulerUnavailable) as e:
        node.run(["true"])
    msg = _one_line_naming(e, node.name)
    assert "known_hosts" in msg and "not in known_hosts" in msg


def test_changed_host_key(sshd: dict[str, str], fresh_home: str, tmp_path: object) -> None:
    other = _fresh_key(tmp_path)  # any ed25519 key that is not the server's
    wrong = os.path.join(str(tmp_path), "wrong_known_hosts")
    with open(other + ".pub") as src, open(wrong, "w") as out:
        out.write(f"[127.0.0.1]:{sshd['port']} {' '.join(src.read().split()[:2])}\n")
    node = SshLogin(f"{sshd['user']}@127.0.0.1:{sshd['port']}", identity_file=sshd["key"],
                    config_file=_config(tmp_path, wrong))
    with pytest.raises(SchedulerUnavailable) as e:
        node.run(["true"])
    msg = _one_line_naming(e, node.name)
    assert "known_hosts" in msg and "changed" in msg


def test_unreachable_port(sshd: dict[str, str], fresh_home: str, tmp_path: object) -> None:
    node = SshLogin(f"{sshd['user']}@127.0.0.1:{_free_port()}", identity_file=sshd["key"],
                    config_file=_config(tmp_path, _known_hosts(sshd)))
    with pytest.raises(SchedulerUnavailable) as e:
        node.run(["true"])
    msg = _one_line_naming(e, node.name)
    assert "Connection refused" in msg and "port" in msg
    with pytest.raises(SchedulerUnavailable, match="cannot reach"):
        transfer.sync_dir(node, str(tmp_path), "torchx_ext_unreachable")


def test_no_ssh_client(fresh_home: str, tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SchedulerUnavailable, match="OpenSSH client 'ssh' is not installed"):
        SshLogin("login.example").run(["true"])


# -- files ---------------------------------------------------------------------------------------------

@pytest.fixture
def remote_dir(login: SshLogin) -> Iterator[str]:
    path = f"torchx_ext_test/{uuid.uuid4().hex[:8]} dir"
    yield path
    login.run_script('rm -rf -- "$1"; rmdir torchx_ext_test 2>/dev/null || true', [path])


def test_put_text(login: SshLogin, remote_dir: str) -> None:
    path = f"{remote_dir}/sub dir/it's é.txt"
    text = "héllo\n'$HOME' `id`\n"
    login.put_text(path, text, mode=0o640)
    assert login.run(["cat", path]).stdout == text
    assert login.run(["stat", "-c", "%a", path]).stdout == "640\n"
    login.put_text(path, "replaced")
    assert login.run(["cat", path]).stdout == "replaced"
    assert login.run(["ls", "-A", f"{remote_dir}/sub dir"]).stdout == "it's é.txt\n"  # no temp file left
    with pytest.raises(BackendError, match=f"cannot write /proc/nope/x on {login.name}: .*"):
        login.put_text("/proc/nope/x", "x")


def _workspace(root: str) -> dict[str, bytes]:
    files = {
        "main.py": b"print('hi')\n",
        "pkg/mod.py": b"x = 1\n",
        "we ird*[x].py": b"weird\n",
        "é 🙂/it's.txt": b"unicode\n",
        ".torchxignore": b"data\n*.log\n",
        "data/big.bin": os.urandom(200_000),
        "run.log": b"ignored\n",
        "pkg/also.log": b"ignored\n",
    }
    for rel, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(content)
    return files


def _remote_tree(login: SshLogin, remote_dir: str) -> dict[str, str]:
    script = 'cd "$1" && find . -type f -print0 | sort -z | while IFS= read -r -d "" f; do printf "%s\\t%s\\n" "${f#./}" "$(md5sum < "$f" | cut -c1-32)"; done'
    proc = login.run_script(script, [remote_dir])
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("\t") for line in proc.stdout.splitlines())


def _expected_tree(files: dict[str, bytes]) -> dict[str, str]:
    import hashlib
    return {k: hashlib.md5(v).hexdigest() for k, v in files.items() if not k.endswith(".log") and not k.startswith("data/")}


def test_sync_dir_sends_only_what_changed(login: SshLogin, remote_dir: str, tmp_path: object) -> None:
    ws = os.path.join(str(tmp_path), "ws")
    files = _workspace(ws)
    expected = _expected_tree(files)
    # something ignored already on the remote (an earlier sync, before it was ignored) goes away
    login.put_text(f"{remote_dir}/data/stale", "stale")
    sent = transfer.sync_dir(login, ws, remote_dir)
    assert sent == sum(len(files[k]) for k in expected)
    assert _remote_tree(login, remote_dir) == expected
    assert transfer.sync_dir(login, ws, remote_dir) == 0  # nothing changed: no file content sent
    with open(os.path.join(ws, "pkg/mod.py"), "wb") as f:
        f.write(b"x = 2  # changed\n")
    os.remove(os.path.join(ws, "main.py"))
    with open(os.path.join(ws, "data/big.bin"), "ab") as f:
        f.write(b"ignored change")
    assert transfer.sync_dir(login, ws, remote_dir) == len(b"x = 2  # changed\n")
    files["pkg/mod.py"] = b"x = 2  # changed\n"
    del files["main.py"]
    assert _remote_tree(login, remote_dir) == _expected_tree(files)


def test_sync_dir_without_rsync_sends_a_tar(login: SshLogin, remote_dir: str, tmp_path: object,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    ws = os.path.join(str(tmp_path), "ws")
    files = _workspace(ws)
    expected = _expected_tree(files)
    bin_dir = os.path.join(str(tmp_path), "bin")
    os.mkdir(bin_dir)
    os.symlink(shutil.which("ssh") or "/usr/bin/ssh", os.path.join(bin_dir, "ssh"))
    monkeypatch.setenv("PATH", bin_dir)  # ssh, and no rsync
    total = sum(len(files[k]) for k in expected)
    assert transfer.sync_dir(login, ws, remote_dir) == total
    assert transfer.sync_dir(login, ws, remote_dir) == total  # the fallback sends everything, every time
    os.remove(os.path.join(ws, "main.py"))
    assert transfer.sync_dir(login, ws, remote_dir) == total - len(files.pop("main.py"))
    assert _remote_tree(login, remote_dir) == _expected_tree(files)


def test_sync_dir_refuses_the_home_directory(tmp_path: object) -> None:
    node = SshLogin("login.example")  # refused before any connection
    for bad in ("", ".", "./", "/", "~", ".."):
        with pytest.raises(InvalidOptionError, match="refusing to sync"):
            transfer.sync_dir(node, str(tmp_path), bad)


def test_sync_dir_remote_refusal_is_a_backend_error(login: SshLogin, tmp_path: object) -> None:
    with pytest.raises(BackendError, match="cannot create directory"):
        transfer.sync_dir(login, str(tmp_path), "/proc/torchx_ext_nope")


# -- no sshd needed: ssh's messages, as the real ssh (OpenSSH 9.2) printed them, and targets ------------

REAL_STDERR = {
    "refused": "txe@127.0.0.1: Permission denied (publickey).\n",
    "unknown host key": "No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.\n"
                        "Host key verification failed.\n",
    "changed host key": """@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!
Someone could be eavesdropping on you right now (man-in-the-middle attack)!
It is also possible that a host key has just been changed.
The fingerprint for the ED25519 key sent by the remote host is
SHA256:QHtcEeOLhVDBl9tnle9ECi1sAG1Ep8/077NBAUIeWTQ.
Please contact your system administrator.
Add correct host key in wrong_kh to get rid of this message.
Offending ED25519 key in wrong_kh:1
  remove with:
  ssh-keygen -f "wrong_kh" -R "[127.0.0.1]:2222"
Host key for [127.0.0.1]:2222 has changed and you have requested strict checking.
Host key verification failed.
""",
    "refused port": "ssh: connect to host 127.0.0.1 port 1: Connection refused\n",
    "unresolvable": "ssh: Could not resolve hostname no-such-host.invalid: Name or service not known\n",
    "missing identity": "Warning: Identity file /nonexistent/key not accessible: No such file or directory.\n"
                        "txe@127.0.0.1: Permission denied (publickey).\n",
    "unprotected key": """@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@         WARNING: UNPROTECTED PRIVATE KEY FILE!          @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
Permissions 0644 for 'open_key' are too open.
It is required that your private key files are NOT accessible by others.
This private key will be ignored.
Load key "open_key": bad permissions
txe@127.0.0.1: Permission denied (publickey).
""",
    "banner timeout": "Connection timed out during banner exchange\nConnection to 10.255.255.1 port 22 timed out\n",
    "through rsync": "ssh: connect to host 127.0.0.1 port 1: Connection refused\n"
                     "rsync: connection unexpectedly closed (0 bytes received so far) [sender]\n"
                     "rsync error: unexplained error (code 255) at io.c(232) [sender=3.2.7]\n",
}


@pytest.mark.parametrize("case,expected", [
    ("refused", ["was refused", "ssh-agent", "`ssh h:1` works by hand"]),
    ("unknown host key", ["host key verification failed", "not in known_hosts", "known_hosts"]),
    ("changed host key", ["host key changed", "known_hosts", "ssh-keygen -R"]),
    ("refused port", ["cannot reach h:1 (connect to host 127.0.0.1 port 1: Connection refused)", "port"]),
    ("unresolvable", ["cannot reach h:1 (Could not resolve hostname", "host name"]),
    ("missing identity", ["was refused", "identity file does not exist"]),
    ("unprotected key", ["was refused", "chmod 600"]),
    ("banner timeout", ["cannot reach h:1 (Connection timed out during banner exchange)"]),
    ("through rsync", ["cannot reach h:1 (connect to host 127.0.0.1 port 1: Connection refused)"]),
])
def test_ssh_failure_message(case: str, expected: list[str]) -> None:
    msg = ssh_failure_message("h:1", REAL_STDERR[case])
    assert "\n" not in msg and "h:1" in msg
    for part in expected:
        assert part in msg, msg


def test_ssh_failure_message_lost_and_unknown() -> None:
    # a multiplexed call whose connection died mid-command: ssh exits 255 and prints nothing
    assert ssh_failure_message("h", "", started=True).startswith("the connection to h was lost;")
    assert "lost (Connection to h closed by remote host.)" in ssh_failure_message(
        "h", "Connection to h closed by remote host.\n")
    assert ssh_failure_message("h", "something new\nlast words\n") == "ssh to h failed: last words"


@pytest.mark.parametrize("target,name", [
    ("login", "login"), ("alice@login.example.org", "alice@login.example.org"), ("login:2222", "login:2222"),
    ("bob@10.0.0.1:22", "bob@10.0.0.1:22"), ("[::1]:2200", "[::1]:2200"), (" carol@h ", "carol@h"),
])
def test_target_names(target: str, name: str) -> None:
    assert SshLogin(target).name == name


@pytest.mark.parametrize("target", ["", "-oProxyCommand=touch /tmp/x", "a b", "h:0", "h:70000", "u@", "@h", "h:x"])
def test_invalid_targets(target: str) -> None:
    with pytest.raises(InvalidOptionError, match="invalid SSH login"):
        SshLogin(target)


@pytest.mark.parametrize("target,why", [
    ("x@-oProxyCommand=id", "the host '-oProxyCommand=id' begins with '-'"),
    ("-oProxyCommand=id@h", "the user '-oProxyCommand=id' begins with '-'"),
    ("x@-h:2222", "the host '-h' begins with '-'"),
    ("-h", "the host '-h' begins with '-'"),
    ("u@h\x07", "control characters"), ("u\x00@h", "control characters"), ("u@h\rx", "control characters"),
    ("u@h\tx", "control characters"),
])
def test_logins_that_ssh_would_read_as_options_are_refused_in_one_line(target: str, why: str) -> None:
    with pytest.raises(InvalidOptionError) as e:
        SshLogin(target)
    message = str(e.value)
    assert "\n" not in message and "\r" not in message
    assert repr(target) in message and why in message and "expected user@host[:port]" in message


def _modes(login: SshLogin, path: str) -> dict[str, str]:
    """``{relative path: octal mode}`` of everything under ``path`` on the login node, ``path`` as "."."""
    proc = login.run_script('cd -- "$1" && find . -printf "%P\\t%m\\n"', [path])
    assert proc.returncode == 0, proc.stderr
    return {rel or ".": mode for rel, mode in (line.split("\t") for line in proc.stdout.splitlines())}


def test_put_text_is_private_from_birth(login: SshLogin, remote_dir: str) -> None:
    # the remote login shell's umask is 022 (sshd's default): the new directories are 0700 anyway
    assert login.run(["sh", "-c", "umask"]).stdout.strip() == "0022"
    login.put_text(f"{remote_dir}/a/b/secret.json", "{}")
    assert _modes(login, remote_dir) == {".": "700", "a": "700", "a/b": "700", "a/b/secret.json": "600"}


@pytest.mark.parametrize("rsync", [True, False])
def test_sync_dir_copies_are_private(login: SshLogin, remote_dir: str, tmp_path: object,
                                     monkeypatch: pytest.MonkeyPatch, rsync: bool) -> None:
    ws = os.path.join(str(tmp_path), "ws")
    _workspace(ws)
    os.chmod(os.path.join(ws, "main.py"), 0o755)
    os.chmod(os.path.join(ws, "pkg"), 0o755)
    if not rsync:
        bin_dir = os.path.join(str(tmp_path), "bin")
        os.mkdir(bin_dir)
        os.symlink(shutil.which("ssh") or "/usr/bin/ssh", os.path.join(bin_dir, "ssh"))
        monkeypatch.setenv("PATH", bin_dir)
    transfer.sync_dir(login, ws, f"{remote_dir}/copy")
    modes = _modes(login, remote_dir)
    assert modes.pop("copy/main.py") == "700"  # the user's own bits, x included, are kept
    assert all(mode == ("700" if "." not in rel.rsplit("/", 1)[-1] or rel == "." else "600")
               for rel, mode in modes.items() if rel != "copy/é 🙂"), modes
    assert all(not int(mode, 8) & 0o077 for mode in modes.values()), modes


def test_sync_dir_link_dest_is_protected_like_the_destination(login: SshLogin, remote_dir: str,
                                                              tmp_path: object) -> None:
    ws = os.path.join(str(tmp_path), "ws")
    _workspace(ws)
    home = login.run(["sh", "-c", "pwd"]).stdout.strip()
    # a previous copy whose path the remote shell would split and run, were it not protected
    name = "prev dir;touch injected;$(touch injected2)"
    transfer.sync_dir(login, ws, f"{remote_dir}/{name}")
    transfer.sync_dir(login, ws, f"{remote_dir}/next", link_dest=f"{home}/{remote_dir}/{name}")
    links = login.run(["stat", "-c", "%h", f"{remote_dir}/next/pkg/mod.py"]).stdout.strip()
    assert links == "2", "unchanged files are hard links into the previous copy"
    assert sorted(login.run(["ls", "-A", remote_dir]).stdout.splitlines()) == ["next", name]
    assert _remote_tree(login, f"{remote_dir}/next") == _expected_tree(_workspace(ws))  # nothing else there


def test_long_home_falls_back_to_a_short_private_dir(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHX_EXT_HOME", os.path.join(str(tmp_path), "x" * 80))
    path = SshLogin("login").control_dir
    assert path == os.path.join(tempfile.gettempdir(), f"torchx_ext-ssh-{os.getuid()}")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    # the longest socket path ssh makes there (%C, then a 17-byte temporary suffix) fits in sun_path
    assert len(os.path.join(path, "f" * 40) + ".0123456789abcdef") < 108
