#!/usr/bin/env python3
"""Delay and lose what a namespace host sends: a stand-in for netem, which this kernel lacks.

    slurm/local-cluster/on-node.sh node2 slurm/local-cluster/netdelay.py --delay-ms 0.5 \\
        --loss 0.01 [--seconds 600] &

Run inside a host (on-node.sh), it adds one iptables rule in the host's own network
namespace, ``OUTPUT -o eth0 -j NFQUEUE --queue-num Q --queue-bypass``, so that every
packet the host sends waits in the kernel for a verdict from this process; it accepts
each one ``--delay-ms`` after it came (in order) and drops a ``--loss`` fraction at
random. On SIGTERM/SIGINT, after ``--seconds``, or on any error it removes the rule;
``--queue-bypass`` lets packets through unharmed if this process is gone, and the rule
goes with the host's namespace in any case. Needs root, iptables (legacy) and a kernel
with NFQUEUE. Standard library only: raw netfilter netlink messages.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS = 1, 2
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NF_DROP, NF_ACCEPT = 0, 1
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
SOL_NETLINK, NETLINK_NO_ENOBUFS = 270, 5


def _attr(kind: int, payload: bytes) -> bytes:
    """A netlink attribute (length, type, payload), padded to 4 bytes."""
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _message(msg: int, queue: int, attrs: bytes, seq: int = 0) -> bytes:
    """A netfilter-queue netlink message: nlmsghdr, nfgenmsg (AF_UNSPEC, v0, queue), attrs."""
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    kind = (NFNL_SUBSYS_QUEUE << 8) | msg
    return struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST, seq, 0) + body


def bind_queue(sock: socket.socket, queue: int) -> None:
    """Bind queue ``queue`` for IPv4 and ask for packet metadata only (no payload)."""
    bind = struct.pack("=BBH", NFQNL_CFG_CMD_BIND, 0, socket.htons(socket.AF_INET))
    cmd = _attr(NFQA_CFG_CMD, bind)
    sock.send(_message(NFQNL_MSG_CONFIG, queue, cmd, seq=1))
    params = _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
    sock.send(_message(NFQNL_MSG_CONFIG, queue, params, seq=2))


def verdict(sock: socket.socket, queue: int, packet_id: int, accept: bool) -> None:
    hdr = struct.pack("!II", NF_ACCEPT if accept else NF_DROP, packet_id)
    sock.send(_message(NFQNL_MSG_VERDICT, queue, _attr(NFQA_VERDICT_HDR, hdr)))


def packet_ids(data: bytes):
    """The packet ids in a buffer of netlink messages (errors raise OSError)."""
    off = 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if length < 16:
            break
        if kind == NLMSG_ERROR:
            err = struct.unpack_from("=i", data, off + 16)[0]
            if err:
                raise OSError(-err, f"netfilter queue: {os.strerror(-err)}")
        elif kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            pos = off + 20  # nlmsghdr + nfgenmsg
            while pos + 4 <= off + length:
                alen, atype = struct.unpack_from("=HH", data, pos)
                if alen < 4:
                    break
                if atype & 0x7FFF == NFQA_PACKET_HDR:
                    yield struct.unpack_from("!I", data, pos + 4)[0]
                    break
                pos += (alen + 3) & ~3
        off += (length + 3) & ~3


def rule(action: str, queue: int, dev: str) -> list[str]:
    return ["iptables-legacy", action, "OUTPUT", "-o", dev, "-j", "NFQUEUE", "--queue-num",
            str(queue), "--queue-bypass"]


def run(opts) -> int:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    bind_queue(sock, opts.queue)
    subprocess.run(rule("-I", opts.queue, opts.dev), check=True, timeout=30)
    print(f"netdelay: ready ({opts.dev}: +{opts.delay_ms} ms, loss {opts.loss})", file=sys.stderr,
          flush=True)
    stop = {"now": False}

    def on_signal(*_):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    rng = random.Random(opts.seed)
    held = collections.deque()  # (release time, packet id), in arrival order
    delay = opts.delay_ms / 1e3
    end = time.monotonic() + opts.seconds
    seen = dropped = 0
    try:
        while not stop["now"] and time.monotonic() < end:
            now = time.monotonic()
            while held and held[0][0] <= now:
                _, pid = held.popleft()
                verdict(sock, opts.queue, pid, True)
            wait = max(0.0, held[0][0] - now) if held else 0.2
            ready, _, _ = select.select([sock], [], [], wait)
            if not ready:
                continue
            now = time.monotonic()
            for pid in packet_ids(sock.recv(1 << 16)):
                seen += 1
                if opts.loss and rng.random() < opts.loss:
                    dropped += 1
                    verdict(sock, opts.queue, pid, False)
                else:
                    held.append((now + delay, pid))
    finally:
        subprocess.run(rule("-D", opts.queue, opts.dev), timeout=30)
        for _, pid in held:
            verdict(sock, opts.queue, pid, True)
        print(f"netdelay: {seen} packets, {dropped} dropped, delay {opts.delay_ms} ms",
              file=sys.stderr, flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--delay-ms", type=float, default=0.5, help="added delay (default 0.5)")
    p.add_argument("--loss", type=float, default=0.0, help="fraction of packets dropped")
    p.add_argument("--queue", type=int, default=0, help="NFQUEUE number (default 0)")
    p.add_argument("--dev", default="eth0", help="the host's link (default eth0)")
    p.add_argument("--seconds", type=float, default=600, help="stop after this long")
    p.add_argument("--seed", type=int, default=0)
    opts = p.parse_args(argv)
    if not (0 <= opts.loss < 1) or opts.delay_ms < 0:
        p.error("--loss: expected a fraction in [0, 1); --delay-ms: expected >= 0")
    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
