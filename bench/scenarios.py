"""The scenarios: who connects where, who sends what, what is measured.

Each run gets a fresh stack (Redis and the workers) and fresh generator processes, so
no run inherits another's memory, rooms or connections.
"""
import dataclasses
import threading
import time

from . import servers, stats
from .driver import Gen, ask_all

# capacity: a step is held when the delivery p99 stays within this, among other conditions
HELD_P99_MS = 100.0
# capacity: how long a client waits for an ack before it gives up on it
ACK_TIMEOUT_S = 10.0
# capacity: a step whose generators sent more than this share of messages late did not offer
# its rate; the machine, not the server, set the pace
LATE_SHARE = 0.01


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    kind: str                 # "traffic", "idle", "connect" or "capacity"
    clients: int
    room_size: int            # clients per room; see `placement` for the workers they are on
    title: str = ""
    senders: str = "none"     # "none", "first:N" (clients 0..N-1), or "all"
    mode: str = "window"      # "window": N unacked in flight; "rate": messages per second
    window: int = 20
    rate: float = 0.0         # per sender, in rate mode
    duration: float = 20.0    # measured window, seconds
    warmup: float = 2.0       # sending before the measured window
    hold: float = 60.0        # idle: seconds the connections are held
    gens: int = 2             # generator processes
    concurrency: int = 64     # connection attempts in flight, over all generators
    max_in_flight: int = 50   # rate mode: a sender with this many unacked skips a beat
    workers: tuple = (2,)     # worker processes; a scenario with several runs at each count
    # "alternate": consecutive clients alternate over the workers, so each room spans all of
    # them; "pairs": each room's members sit half on one worker, half on the next (rooms go
    # round the ring of workers), so every worker holds members of 2/N of the rooms
    placement: str = "alternate"
    # capacity: messages per second in all at each step, each `warmup` + `duration` seconds;
    # then `overload` seconds at twice the highest rate held, and `recovery` s back at it
    steps: tuple = ()
    overload: float = 60.0
    recovery: float = 10.0

    @property
    def rooms(self):
        return -(-self.clients // self.room_size)

    @property
    def sender_count(self):
        return self.clients if self.senders == "all" else int(self.senders.split(":")[1])

    def describe(self):
        rooms = self.rooms
        what = f"{self.clients} clients in {rooms} room{'s' if rooms > 1 else ''}"
        if self.placement == "pairs":
            half = self.room_size // 2
            what += f", each on 2 workers ({half} + {self.room_size - half})"
        if self.kind == "traffic":
            count = self.sender_count
            how = (f"{self.window} unacked in flight each" if self.mode == "window"
                   else f"{self.rate:g} msg/s each")
            total = (f", {self.rate * count:,.0f} msg/s in all"
                     if self.mode == "rate" and count > 1 else "")
            return (f"{what}, {count} sender{'s' if count > 1 else ''} ({how}{total}), "
                    f"{self.duration:g} s")
        if self.kind == "idle":
            return f"{what}, held {self.hold:g} s with heartbeats"
        if self.kind == "capacity":
            return (f"{what}, every client a sender; {', '.join(f'{r:,g}' for r in self.steps)} "
                    f"msg/s in all, {self.warmup:g} + {self.duration:g} s a step, until a step "
                    f"is not held; then {self.overload:g} s at twice the rate held and "
                    f"{self.warmup:g} + {self.recovery:g} s back at it")
        return f"{what}: POST /api/session, connect, join; {self.concurrency} at a time"


FULL = {
    "connect": Scenario("connect", "connect", clients=2000, room_size=10,
                        title="connect rate"),
    "fanout": Scenario("fanout", "traffic", clients=200, room_size=200, senders="first:2",
                       mode="window", window=20, duration=20, title="fan-out"),
    "latency": Scenario("latency", "traffic", clients=200, room_size=200, senders="first:1",
                        mode="rate", rate=20, duration=20, title="latency at 20 msg/s"),
    "idle10k": Scenario("idle10k", "idle", clients=10000, room_size=20, hold=60, gens=2,
                        title="10,000 idle connections"),
    "idle20k": Scenario("idle20k", "idle", clients=20000, room_size=20, hold=60, gens=4,
                        title="20,000 idle connections"),
    "rooms": Scenario("rooms", "traffic", clients=2000, room_size=10, senders="all",
                      mode="rate", rate=0.5, duration=20, title="many rooms"),
    # 500 messages a second in all at every worker count: 8 python_stock workers, each
    # decoding every message, still leave the generators a core of this 2-core machine
    "scaleout": Scenario("scaleout", "traffic", clients=2000, room_size=10, senders="all",
                         mode="rate", rate=0.25, duration=20, workers=(2, 4, 8),
                         placement="pairs", title="scale-out"),
    # the rooms workload on the same connections at a rising rate: the rate to size hardware by
    "capacity": Scenario("capacity", "capacity", clients=2000, room_size=10, senders="all",
                         mode="rate", duration=10, warmup=2,
                         steps=(250, 500, 1000, 1500, 2000, 3000, 4000, 6000, 8000),
                         overload=60, recovery=10, title="capacity"),
    # one room of 10,000 joined in a burst, then a light chat: the cost of a crowd
    "crowd": Scenario("crowd", "traffic", clients=10000, room_size=10000, senders="first:2",
                      mode="rate", rate=5, duration=20, gens=4, concurrency=256,
                      title="one room of 10,000"),
}

QUICK = {
    "connect": dataclasses.replace(FULL["connect"], clients=200),
    "fanout": dataclasses.replace(FULL["fanout"], clients=50, duration=2, warmup=0.5),
    "latency": dataclasses.replace(FULL["latency"], clients=50, duration=2, warmup=0.5),
    "idle10k": dataclasses.replace(FULL["idle10k"], clients=500, hold=2),
    "idle20k": dataclasses.replace(FULL["idle20k"], clients=1000, hold=2),
    "rooms": dataclasses.replace(FULL["rooms"], clients=200, rate=2, duration=2, warmup=0.5),
    "scaleout": dataclasses.replace(FULL["scaleout"], clients=400, rate=1.25, duration=2,
                                    warmup=0.5),
    "capacity": dataclasses.replace(FULL["capacity"], clients=200, steps=(50, 100, 200, 400),
                                    duration=2, warmup=0.5, overload=4, recovery=2),
    "crowd": dataclasses.replace(FULL["crowd"], clients=500, duration=2, warmup=0.5),
}

# capacity and crowd run only when named: each takes minutes a server at full size
DEFAULT = ("connect", "fanout", "latency", "idle10k", "idle20k", "rooms", "scaleout")
QUICK_DEFAULT = ("connect", "fanout", "latency", "idle10k", "rooms", "scaleout")


def room_of(sc, idx):
    return f"{sc.name}-{idx // sc.room_size}"


def worker_of(sc, idx, workers):
    """The index of the worker client `idx` connects to."""
    if sc.placement == "pairs":
        room, seat = divmod(idx, sc.room_size)
        return (room + (seat >= sc.room_size // 2)) % workers
    return idx % workers


def case_of(sc, workers):
    """The name results are grouped under: the scenario, and its worker count if it has several."""
    return sc.name if len(sc.workers) == 1 else f"{sc.name}-{workers}w"


def row_of(server, redis):
    """A table row: the server, and the Redis it ran on unless one redis-server."""
    return server if redis == "single" else f"{server}+cluster"


def gen_of(sc, idx):
    # consecutive pairs go to both workers; pairs rotate over the generators
    return (idx // 2) % sc.gens


def sender_indexes(sc):
    if sc.senders == "all":
        return list(range(sc.clients))
    if sc.senders.startswith("first:"):
        return list(range(int(sc.senders.split(":")[1])))
    return []


def execute(sc, stack, logdir, progress=None):
    """Run one scenario against a started stack; return its figures."""
    gens = [Gen(i, logdir / f"gen{i}.log") for i in range(sc.gens)]
    try:
        result = {"scenario": sc.name, "server": stack.server, "clients": sc.clients,
                  "workers": stack.workers, "redis": stack.redis,
                  "case": case_of(sc, stack.workers), "row": row_of(stack.server, stack.redis),
                  "config": dataclasses.asdict(sc)}
        rss_before = stack.rss()
        result.update(_connect(sc, stack, gens))
        result["rss_kb_before"] = rss_before
        # memory per member once everyone has joined, before any message
        rss_joined = stack.rss()
        result["rss_kb_joined"] = rss_joined
        per_worker = result.pop("_by_worker")
        result["kb_per_member"] = _kb_per(per_worker, rss_before, rss_joined)
        if sc.kind == "traffic":
            result.update(_traffic(sc, stack, gens))
        elif sc.kind == "idle":
            result.update(_idle(sc, stack, gens, progress))
        elif sc.kind == "capacity":
            result.update(_capacity(sc, stack, gens, progress))
        rss_after = result.get("rss_kb_after") or stack.rss()
        result["rss_kb_after"] = rss_after
        result["kb_per_conn"] = _kb_per(per_worker, rss_before, rss_after)
        result["connections_by_worker"] = per_worker
        conns = sum(per_worker.values())
        redis_growth = sum(rss_after[n] - rss_before[n] for n in rss_after if servers.is_redis(n))
        result["redis_kb_per_conn"] = round(redis_growth / conns, 2) if conns else None
        stack.check_alive()
    except BaseException:
        for gen in gens:  # interrupted or failed: no polite goodbyes
            gen.kill()
        raise
    for gen in gens:
        gen.close()
    return result


def _kb_per(per_worker, before, after):
    """Each worker's RSS growth divided by its connections, in KB."""
    return {w: round((after[w] - before[w]) / n, 2) if n else None
            for w, n in per_worker.items()}


def _connect(sc, stack, gens):
    plans = [[] for _ in gens]
    for idx in range(sc.clients):
        port = stack.ports[worker_of(sc, idx, stack.workers)]
        plans[gen_of(sc, idx)].append({"idx": idx, "port": port,
                                       "name": f"u{idx}", "rooms": [room_of(sc, idx)]})
    per_gen = max(1, sc.concurrency // len(gens))
    cpu0, gcpu0 = _cpu(stack, gens)
    answers = ask_all(gens, [{"op": "connect", "clients": plan, "concurrency": per_gen,
                              "timeout": 60} for plan in plans],
                      timeout=120 + sc.clients / 20)
    cpu1, gcpu1 = _cpu(stack, gens)
    connected = sum(a["connected"] for a in answers)
    start = min(a["start"] for a in answers)
    end = max(a["end"] for a in answers)
    times = sorted(t for a in answers for t in a["times"])
    errors = {}
    for a in answers:
        for reason, n in a["errors"].items():
            errors[reason] = errors.get(reason, 0) + n
    by_port = {}
    for a in answers:
        for port, n in a["by_port"].items():
            by_port[int(port)] = by_port.get(int(port), 0) + n
    return {
        "connected": connected,
        "connect_failed": sc.clients - connected,
        "connect_errors": errors,
        "connect_per_s": round(connected / (end - start), 1) if end > start else None,
        "connect_p50_ms": _ms(stats.quantile_list(times, 50)),
        "connect_p99_ms": _ms(stats.quantile_list(times, 99)),
        # server (workers + Redis) and generator CPU over the whole connect phase
        "cpu_us_per_connect": (round(sum(cpu1[n] - cpu0[n] for n in cpu1) / connected * 1e6)
                               if connected else None),
        "gen_cpu_s": round(sum(b - a for a, b in zip(gcpu0, gcpu1)), 2),
        # joins announced to the clients already in the room (servers without presence: 0)
        "presence_joins_received": sum(a.get("presence_joins", 0) for a in answers),
        "_by_worker": {f"w{i}": by_port.get(port, 0) for i, port in enumerate(stack.ports)},
    }


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000.0, 2)


def _cpu(stack, gens):
    return stack.cpu(), [servers.cpu_seconds(g.pid) for g in gens]


@dataclasses.dataclass
class Phase:
    """One sending phase on connected clients: the generators' answers and the servers' CPU."""
    duration: float
    runs: list        # each generator's answer to `run`
    verifies: list    # each generator's answer to `verify`
    acked: dict       # room -> ids acknowledged
    cpu: dict         # CPU seconds of each server process during the measured window
    gen_cpu: list     # CPU seconds of each generator during the measured window
    rss_at_end: dict  # RSS of each server process when the window ended


def _phase(sc, stack, gens, rate, warmup, duration, ack_timeout):
    """Send from the scenario's senders (`rate` per sender in rate mode) for `warmup` +
    `duration` seconds, wait up to `ack_timeout` for the last acks, then check that every
    client received every acknowledged message of its room."""
    senders = sender_indexes(sc)
    start = time.time() + 0.5
    t0 = start + warmup
    t1 = t0 + duration
    for i, gen in enumerate(gens):
        mine = [{"idx": idx, "room": room_of(sc, idx)} for idx in senders if gen_of(sc, idx) == i]
        gen.send({"op": "run", "start": start, "t0": t0, "t1": t1, "mode": sc.mode,
                  "window": sc.window, "rate": rate, "max_in_flight": sc.max_in_flight,
                  "senders": mine, "ack_timeout": ack_timeout})
    _sleep_until(t0)
    cpu0, gcpu0 = _cpu(stack, gens)
    _sleep_until(t1)
    cpu1, gcpu1 = _cpu(stack, gens)
    rss_at_end = stack.rss()
    runs = [gen.recv(timeout=60 + ack_timeout) for gen in gens]

    acked = {}
    for r in runs:
        for room, ids in r["acked"].items():
            acked.setdefault(room, []).extend(ids)
    rooms_of_gen = [set() for _ in gens]
    for idx in range(sc.clients):
        rooms_of_gen[gen_of(sc, idx)].add(room_of(sc, idx))
    verifies = ask_all(gens, [{"op": "verify", "timeout": 60,
                               "expected": {room: acked.get(room, []) for room in rooms}}
                              for rooms in rooms_of_gen], timeout=120)
    return Phase(duration, runs, verifies, acked, {n: cpu1[n] - cpu0[n] for n in cpu1},
                 [b - a for a, b in zip(gcpu0, gcpu1)], rss_at_end)


def _figures(phase):
    """What a phase delivered, how fast, at what cost, and what went wrong."""
    runs, verifies, duration = phase.runs, phase.verifies, phase.duration
    window_deliveries = sum(r["window_deliveries"] for r in runs)
    server_cpu = sum(phase.cpu.values())
    lat = stats.merge_hists(v["lat_hist"] for v in verifies)
    ack = stats.merge_hists(r["ack_hist"] for r in runs)
    send_errors = {}
    for r in runs:
        for code, n in r["send_errors"].items():
            send_errors[code] = send_errors.get(code, 0) + n
    return {
        "duration_s": duration,
        "sent": sum(r["sent"] for r in runs),
        "acked": sum(len(ids) for ids in phase.acked.values()),
        "unacked": sum(r["unacked"] for r in runs),
        "skipped": sum(r["skipped"] for r in runs),
        "late": sum(r.get("late", 0) for r in runs),
        "send_errors": send_errors,
        "deliveries_window": window_deliveries,
        "deliveries_total": sum(v["deliveries"] for v in verifies),
        "deliveries_per_s": round(window_deliveries / duration, 1),
        "lost": sum(v["lost"] for v in verifies),
        "duplicated": sum(v["duplicated"] for v in verifies),
        "unexpected": sum(v["unexpected"] for v in verifies),
        "closed_clients": sum(v["closed"] for v in verifies),
        "presence_leaves": sum(v.get("presence_leaves", 0) for v in verifies),
        "drain_wait_s": round(max(v["drain_wait"] for v in verifies), 2),
        "lat_p50_ms": _round(stats.percentile_ms(lat, 50)),
        "lat_p99_ms": _round(stats.percentile_ms(lat, 99)),
        "lat_max_ms": _round(lat["max"] / 1000.0) if lat["count"] else None,
        "lat_samples": lat["count"],
        "ack_p50_ms": _round(stats.percentile_ms(ack, 50)),
        "ack_p99_ms": _round(stats.percentile_ms(ack, 99)),
        "ack_max_ms": _round(ack["max"] / 1000.0) if ack["count"] else None,
        "cpu_us_per_delivery": (round(server_cpu * 1e6 / window_deliveries, 2)
                                if window_deliveries else None),
        "server_cpu_cores": round(server_cpu / duration, 3),
        "cpu_s_by_process": {n: round(v, 3) for n, v in phase.cpu.items()},
        "gen_cpu_cores": [round(v / duration, 3) for v in phase.gen_cpu],
    }


def _traffic(sc, stack, gens):
    pubsub0 = stack.pubsub_received()
    phase = _phase(sc, stack, gens, sc.rate, sc.warmup, sc.duration, ack_timeout=30)
    pubsub1 = stack.pubsub_received()
    return {
        **_figures(phase),
        "rss_kb_after": phase.rss_at_end,
        **_pubsub_figures(sc, stack, phase.verifies, pubsub0, pubsub1),
    }


def _capacity(sc, stack, gens, progress=None):
    """Raise the rate step by step on the same connections until a step is not held; then
    overload at twice the highest rate held, and come back to it."""
    steps, held = [], None
    for rate in sc.steps:
        if progress is not None:
            progress(f"step {rate:,g} msg/s")
        step = _capacity_step(sc, stack, gens, rate, sc.duration)
        steps.append(step)
        stack.check_alive()
        if not step["held"]:
            break
        held = rate
    at_held = steps[len([s for s in steps if s["held"]]) - 1] if held is not None else {}
    out = {
        "capacity_msgs_per_s": held,
        "limited_by": "; ".join(steps[-1]["not_held"]) if not steps[-1]["held"]
        else "every step held",
        "held_deliveries_per_s": at_held.get("deliveries_per_s"),
        "held_lat_p99_ms": at_held.get("lat_p99_ms"),
        "held_cpu_us_per_delivery": at_held.get("cpu_us_per_delivery"),
        "held_server_cpu_cores": at_held.get("server_cpu_cores"),
        "steps": steps,
        "overload": None,
        "recovery": None,
    }
    if held is None:
        out["overload_skipped"] = "no step held"
    else:
        if progress is not None:
            progress(f"overload {2 * held:,g} msg/s")
        out["overload"] = _overload(sc, stack, gens, 2 * held)
        stack.check_alive()
        if progress is not None:
            progress(f"recovery {held:,g} msg/s")
        out["recovery"] = _capacity_step(sc, stack, gens, held, sc.recovery)
    phases = steps + [p for p in (out["overload"], out["recovery"]) if p]
    # totals of every phase: a lost or doubled acknowledged message is a failed run
    out["lost"] = sum(p["lost"] for p in phases)
    out["duplicated"] = sum(p["duplicated"] for p in phases)
    out["unavailable"] = sum(p["send_errors"].get("unavailable", 0) for p in phases)
    out["presence_leaves"] = sum(p["presence_leaves"] for p in phases)
    return out


def _capacity_step(sc, stack, gens, rate, duration):
    """One step at `rate` messages a second in all, and whether the servers held it."""
    phase = _phase(sc, stack, gens, rate / sc.sender_count, sc.warmup, duration, ACK_TIMEOUT_S)
    figures = _figures(phase)
    reasons = not_held(figures)
    return {"rate": rate, "held": not reasons, "not_held": reasons, **figures}


def not_held(f):
    """Why a step was not held; empty when it was."""
    reasons = []
    if f["lat_p99_ms"] is None:
        reasons.append("no delivery measured")
    elif f["lat_p99_ms"] > HELD_P99_MS:
        reasons.append(f"p99 {f['lat_p99_ms']:,.0f} ms")
    if f["send_errors"]:
        reasons.append("errors " + ", ".join(f"{code} {n}" for code, n in
                                             sorted(f["send_errors"].items())))
    for key, what in (("unacked", "unacked"), ("lost", "lost"), ("duplicated", "dup"),
                      ("skipped", "skipped"), ("closed_clients", "clients dropped")):
        if f[key]:
            reasons.append(f"{f[key]:,} {what}")
    if f["late"] > LATE_SHARE * max(1, f["sent"]):
        reasons.append(f"generator late ({f['late']:,} sends)")
    return reasons


def _overload(sc, stack, gens, rate):
    """`sc.overload` seconds at `rate`, all of it measured, with the workers' RSS sampled."""
    before = stack.rss()
    with RssSampler(stack) as sampler:
        phase = _phase(sc, stack, gens, rate / sc.sender_count, 0.0, sc.overload,
                       ACK_TIMEOUT_S)
    after = stack.rss()
    workers = [n for n in before if not servers.is_redis(n)]
    return {
        "rate": rate,
        **_figures(phase),
        "rss_kb_before": before,
        "rss_kb_peak": sampler.peak,
        "rss_kb_after": after,
        "workers_rss_mb_before": round(sum(before[n] for n in workers) / 1024, 1),
        "workers_rss_mb_peak": round(sampler.workers_peak / 1024, 1),
        "workers_rss_mb_after": round(sum(after[n] for n in workers) / 1024, 1),
    }


class RssSampler:
    """Reads every server process's RSS about once a second in a thread, keeping the peaks."""

    def __init__(self, stack, interval=1.0):
        self.stack = stack
        self.interval = interval
        self.peak = {}
        self.workers_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self):
        now = self.stack.rss()
        for name, kb in now.items():
            self.peak[name] = max(self.peak.get(name, 0), kb)
        self.workers_peak = max(self.workers_peak, sum(
            kb for name, kb in now.items() if not servers.is_redis(name)))

    def _run(self):
        while not self._stop.wait(self.interval):
            self._read()

    def __enter__(self):
        self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._read()
        return False


def _pubsub_figures(sc, stack, verifies, before, after):
    """Pub/sub messages each worker received, per message it delivered, over the whole traffic
    phase: from before the first send until every acknowledged message was delivered.

    A worker delivers a message of a room to all its members in that room, so the messages
    it delivered are its clients' deliveries divided by its members per room.
    """
    by_port = {}
    for v in verifies:
        for port, n in v["deliveries_by_port"].items():
            by_port[int(port)] = by_port.get(int(port), 0) + n
    clients, rooms = {}, {}
    for idx in range(sc.clients):
        w = worker_of(sc, idx, stack.workers)
        clients[w] = clients.get(w, 0) + 1
        rooms.setdefault(w, set()).add(room_of(sc, idx))
    delivered = {}
    for w, (name, port) in enumerate(zip(stack.worker_names, stack.ports)):
        if clients.get(w):
            delivered[name] = by_port.get(port, 0) * len(rooms[w]) / clients[w]
    out = {"messages_delivered_by_worker": {n: round(v, 1) for n, v in delivered.items()}}
    if before is None or after is None:
        return out
    received = {name: after[name] - before[name] for name in after}
    out["pubsub_received_by_worker"] = received
    ratios = [received[n] / delivered[n] for n in delivered if delivered[n]]
    total = sum(delivered.values())
    out["pubsub_per_delivered"] = round(sum(received.values()) / total, 3) if total else None
    out["pubsub_per_delivered_max"] = round(max(ratios), 3) if ratios else None
    return out


def _idle(sc, stack, gens, progress=None):
    began = time.time()
    cpu0, gcpu0 = _cpu(stack, gens)
    peak = stack.rss()
    end = began + sc.hold
    while time.time() < end:
        time.sleep(min(5.0, max(0.0, end - time.time())))
        stack.check_alive()
        now = stack.rss()
        peak = {n: max(peak[n], now[n]) for n in now}
        if progress is not None:
            progress(f"holding {time.time() - began:.0f}/{sc.hold:g}s")
    held = time.time() - began
    cpu1, gcpu1 = _cpu(stack, gens)
    rss_after = stack.rss()
    status = ask_all(gens, [{"op": "status"}] * len(gens), timeout=30)
    server_cpu = sum(cpu1[n] - cpu0[n] for n in cpu1)
    return {
        "hold_s": round(held, 1),
        "open_after_hold": sum(s["open"] for s in status),
        "dropped": sum(s["dropped"] for s in status),
        "pings_answered": sum(s["pings"] for s in status),
        "server_cpu_cores": round(server_cpu / held, 3),
        "cpu_s_by_process": {n: round(cpu1[n] - cpu0[n], 3) for n in cpu1},
        "gen_cpu_cores": [round((b - a) / held, 3) for a, b in zip(gcpu0, gcpu1)],
        "rss_kb_after": rss_after,
        "rss_kb_peak": peak,
    }


def _round(value, digits=2):
    return None if value is None else round(value, digits)


def _sleep_until(t):
    delay = t - time.time()
    if delay > 0:
        time.sleep(delay)
