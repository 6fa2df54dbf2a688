"""Which host every rank runs on: gathered over the communicator, described in one line.

``gather_hosts(comm, threads)`` is a collective (``Communicator.gather_hosts`` calls it);
``describe_layout`` is pure, on the gathered records (the run's header line).
"""

from __future__ import annotations

import socket

import numpy as np

HOST_BYTES = 64  # a host name longer than this is cut in the layout


def _ranges(values) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"`` (in the order given)."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 < len(values) and values[i + 1] == v + 1:
            continue
        parts.append(str(start) if start == v else f"{start}-{v}")
        start = None
    return ",".join(parts)


def describe_layout(records, max_hosts: int = 8) -> str:
    """One line for the run's header: hosts, ranks per host, and per host its ranks,
    their local ranks and threads.

    ``records``: (host, local rank, ranks on the host, threads) of every rank, in rank
    order (``Communicator.gather_hosts``). Hosts are listed in order of their first
    rank; beyond ``max_hosts`` the rest are counted, not named. Example:
    ``2 host(s) x 2 rank(s) [node1: ranks 0-1 local 0-1 x 1 thread(s); node2: ...]``.
    """
    by_host: dict[str, list[int]] = {}
    for rank, rec in enumerate(records):
        by_host.setdefault(rec[0], []).append(rank)
    per_host = sorted({len(ranks) for ranks in by_host.values()})
    count = str(per_host[0]) if len(per_host) == 1 else f"{per_host[0]}-{per_host[-1]}"
    shown = []
    for host, ranks in list(by_host.items())[:max_hosts]:
        local = _ranges([records[r][1] for r in ranks])
        threads = sorted({records[r][3] for r in ranks})
        shown.append(f"{host}: ranks {_ranges(ranks)} local {local} x "
                     f"{','.join(map(str, threads))} thread(s)")
    more = len(by_host) - len(shown)
    tail = f"; {more} more host(s)" if more > 0 else ""
    return f"{len(by_host)} host(s) x {count} rank(s) [{'; '.join(shown)}{tail}]"


def gather_hosts(comm, threads: int) -> list[tuple[str, int, int, int]]:
    """(host name, local rank, ranks on that host, threads) of every rank of the
    Communicator ``comm``, in rank order.

    A collective: every rank calls it. The local rank and size are the ones MPI
    gives (the shared-memory split), so this shows what each rank really uses.
    """
    rec = np.zeros(4 + HOST_BYTES // 8, dtype=np.int64)
    rec[:3] = (comm.local_rank, comm.local_size, int(threads))
    name = socket.gethostname().encode()[:HOST_BYTES]
    rec.view(np.uint8)[32 : 32 + len(name)] = np.frombuffer(name, dtype=np.uint8)
    table = rec.reshape(1, -1)
    if comm.size > 1:
        table = np.empty((comm.size, rec.size), dtype=np.int64)
        comm._enter("gather_hosts", rec.size, rec.dtype, rec.nbytes)
        comm.comm.Allgather(rec, table)
        comm._leave()
    out = []
    for row in table:
        host = row.view(np.uint8)[32:].tobytes().rstrip(b"\0").decode(errors="replace")
        out.append((host, int(row[0]), int(row[1]), int(row[2])))
    return out
