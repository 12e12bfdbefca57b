"""Issue 21, copies on a peer: dcp.save of a 1 GiB state dict with Writer(path) against
Writer(path, replica=...) to a `sluice serve --checkpoint-dir` on loopback (the same disk, UCX
over TCP), 3 alternating rounds, medians.

  PYTHONPATH=build/python python benchmarks/checkpoint_copy_bench.py
"""
import json, os, shutil, signal, statistics, subprocess, sys, time, tempfile, warnings
import torch, torch.distributed.checkpoint as dcp
from sluice.checkpoint import Writer
warnings.simplefilter("ignore")
root = tempfile.mkdtemp(dir="/var/tmp")
tok = os.path.join(root, "token"); open(tok, "w").write("bench\n")
srv = subprocess.Popen([os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build", "sluice"), "serve", "--checkpoint-dir", root + "/peer", "--listen",
                        "127.0.0.1:0", "--token-file", tok, "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
addr = json.loads(srv.stdout.readline())["address"]
state = {f"t{i}": torch.randn(32 << 20) for i in range(8)}  # 8 x 128 MiB = 1 GiB
res = {"local": [], "replica": []}
for r in range(3):
    for kind in ("local", "replica"):
        path = os.path.join(root, f"ckpt-{kind}")
        w = Writer(path, replica=addr if kind == "replica" else None, token_file=tok, replica_timeout_ms=60000)
        t = time.perf_counter(); dcp.save(state, storage_writer=w); dt = time.perf_counter() - t
        assert w.last_result.get("replica_error", "") == "", w.last_result
        res[kind].append(1.0 / dt)
        print(kind, f"{1/dt:.3f} GiB/s", file=sys.stderr)
srv.send_signal(signal.SIGTERM); srv.wait()
shutil.rmtree(root)
l, c = statistics.median(res["local"]), statistics.median(res["replica"])
print(f"local save {l:.3f} GiB/s, save + copy {c:.3f} GiB/s ({c/l:.2f}x); rounds local {[round(x,3) for x in res['local']]} replica {[round(x,3) for x in res['replica']]}")
