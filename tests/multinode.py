"""Replica programs shared by the multi-node tests (tests/test_multinode_*.py): each says where
it ran (its address on the testbed's bridge), and what it saw of the other nodes."""

PORT = 47200  # replica i of an app listens on PORT + i (two may share a node)

# Where am I: the source address towards the bridge (no default route in the namespaces).
WHERE = (
    "import socket\n"
    "def me():\n"
    "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(('198.18.0.1', 9))\n"
    "    return s.getsockname()[0]\n"
)

# server (1 replica, port PORT) and client (replicas k, port PORT+1+k): each connects to every
# replica of the other role at the address discovery gave it and waits for each to connect back.
DISCOVERY = WHERE + f"PORT = {PORT}\n" + r"""
import os, socket, sys, threading, time
role, k = os.environ["TORCHX_EXT_ROLE"], int(os.environ["TORCHX_EXT_REPLICA_ID"])
other = "client" if role == "server" else "server"
peers = os.environ["TORCHX_EXT_HOSTS_" + other.upper()].split(",")
ports = [PORT] if other == "server" else [PORT + 1 + j for j in range(len(peers))]
print("ran-on", me(), "hosts", os.environ["TORCHX_EXT_HOSTS_SERVER"], os.environ["TORCHX_EXT_HOSTS_CLIENT"], flush=True)
srv = socket.create_server(("0.0.0.0", PORT if role == "server" else PORT + 1 + k))
got = []
def accept():
    while len(got) < len(peers):
        c, addr = srv.accept(); got.append((addr[0], c.recv(100).decode())); c.close()
t = threading.Thread(target=accept, daemon=True); t.start()
deadline = time.time() + 40
for p, port in zip(peers, ports):
    while True:
        try:
            c = socket.create_connection((p, port), timeout=2); break
        except OSError:
            if time.time() > deadline: sys.exit(f"cannot connect to {p}:{port}")
            time.sleep(0.2)
    c.sendall(f"{role}/{k}".encode()); c.close()
    print("connected-to", p, port, flush=True)
t.join(max(0.0, deadline - time.time()))
for addr, who in sorted(got):
    print("accepted-from", addr, who, flush=True)
sys.exit(0 if len(got) == len(peers) else "missing connections: " + repr(got))
"""

# gloo all-reduce of each rank's (rank + 1) across the replicas of role "t"
ALLREDUCE = WHERE + r"""
import datetime, os, torch, torch.distributed as dist
hosts = os.environ["TORCHX_EXT_HOSTS_T"].split(",")
rank, world = int(os.environ["TORCHX_EXT_REPLICA_ID"]), len(hosts)
os.environ["GLOO_SOCKET_IFNAME"] = "eth0"
print("ran-on", me(), "master", hosts[0], flush=True)
dist.init_process_group("gloo", init_method=f"tcp://{hosts[0]}:47299", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=60))
x = torch.tensor([float(rank + 1)])
dist.all_reduce(x)
print("sum", int(x.item()), flush=True)
dist.destroy_process_group()
"""

# the service listens 2 s late; the client connects once, at its start
LATE_SERVER = WHERE + f"PORT = {PORT}\n" + r"""
import socket, time
print("ran-on", me(), flush=True)
time.sleep(2)
srv = socket.create_server(("0.0.0.0", PORT))
while True:
    c, _ = srv.accept(); c.sendall(b"hello"); c.close()
"""
CONNECT_ONCE = WHERE + f"PORT = {PORT}\n" + r"""
import os, socket
print("ran-on", me(), flush=True)
host = os.environ["TORCHX_EXT_HOSTS_SERVER"]
print("GOT", socket.create_connection((host, PORT), timeout=10).recv(100).decode(), "from", host, flush=True)
"""
