"""Benchmark scalechat against reference servers: `python -m bench --help`.

Each scenario runs on every server in turn (A B C A B C ...), each time on a fresh
stack, at each of its worker counts and on each Redis topology asked for; the report gives
medians over the repeats and ratios to the Node peer.
Results: a JSON file and a PNG plot in bench/results/, and the tables on the terminal.
"""
import argparse
import atexit
import dataclasses
import datetime
import json
import platform
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import report, scenarios, servers

RESULTS = servers.BENCH / "results"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Load-test scalechat and the reference servers (node, node_sharded, "
                    "python_stock) side by side on 127.0.0.1.")
    parser.add_argument("--servers", default=",".join(servers.SERVERS),
                        help="comma-separated, from: %(default)s")
    parser.add_argument("--scenarios", default=None,
                        help=f"comma-separated, from: {','.join(scenarios.FULL)} "
                             f"(default: {','.join(scenarios.DEFAULT)}; with --quick: "
                             f"{','.join(scenarios.QUICK_DEFAULT)})")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs of each scenario on each server (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="small clients counts and 2 s windows: a smoke run of about a minute")
    parser.add_argument("--duration", type=float, default=None,
                        help="override the measured window of the traffic scenarios (s)")
    parser.add_argument("--hold", type=float, default=None,
                        help="override how long idle connections are held (s)")
    parser.add_argument("--rate", type=float, default=None, metavar="MSGS",
                        help="override the messages per second, in all, of the scenarios that "
                             "send at a rate (latency, rooms, scaleout)")
    parser.add_argument("--steps", default=None, metavar="LIST",
                        help="the messages per second, in all, of the capacity scenario's steps, "
                             "rising (default: "
                             f"{','.join(f'{r:g}' for r in scenarios.FULL['capacity'].steps)}; "
                             "with --quick: "
                             f"{','.join(f'{r:g}' for r in scenarios.QUICK['capacity'].steps)})")
    parser.add_argument("--overload-seconds", type=float, default=None, metavar="S",
                        help="how long the capacity scenario sends at twice the rate it held "
                             f"(default {scenarios.FULL['capacity'].overload:g}; with --quick "
                             f"{scenarios.QUICK['capacity'].overload:g})")
    parser.add_argument("--workers", default=None, metavar="LIST",
                        help="override the worker counts of the scale-out scenario "
                             "(default 2,4,8)")
    parser.add_argument("--redis", default="single", metavar="LIST",
                        help="comma-separated Redis topologies, from: "
                             f"{','.join(servers.TOPOLOGIES)} (default: %(default)s); a cluster "
                             "is 3 masters and 3 replicas, for "
                             f"{' and '.join(servers.CLUSTER_SERVERS)} only")
    parser.add_argument("--aof", action="store_true",
                        help="run Redis with appendonly everysec, as deploy/redis.conf does "
                             "(default: no persistence; the same for every server)")
    parser.add_argument("--scalechat-ref", default=None, metavar="REF",
                        help="measure scalechat at this git commit (default: the working tree "
                             "as it is when the run starts, copied so that edits during the run "
                             "change nothing)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="directory for the JSON, PNG and logs (default: bench/results)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--report", type=Path, default=None, metavar="JSON",
                        help="run nothing: print the tables of a results JSON and redraw its PNG")
    args = parser.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for s in args.servers:
        if s not in servers.SERVERS:
            parser.error(f"unknown server {s!r}; choose from {', '.join(servers.SERVERS)}")
    args.redis = [t.strip() for t in args.redis.split(",") if t.strip()]
    for t in args.redis:
        if t not in servers.TOPOLOGIES:
            parser.error(f"unknown Redis topology {t!r}; choose from "
                         f"{', '.join(servers.TOPOLOGIES)}")
    workers = None
    if args.workers is not None:
        try:
            workers = tuple(int(w) for w in args.workers.split(",") if w.strip())
        except ValueError:
            parser.error(f"--workers takes worker counts such as 2,4,8, got {args.workers!r}")
        if not workers or min(workers) < 2:
            parser.error("--workers needs counts of at least 2 (each room spans 2 workers)")
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be positive")
    steps = None
    if args.steps is not None:
        try:
            steps = tuple(float(r) for r in args.steps.split(",") if r.strip())
        except ValueError:
            parser.error(f"--steps takes rates such as 250,500,1000, got {args.steps!r}")
        if not steps or min(steps) <= 0 or list(steps) != sorted(set(steps)):
            parser.error("--steps needs positive rates, each higher than the one before")
    if args.overload_seconds is not None and args.overload_seconds <= 0:
        parser.error("--overload-seconds must be positive")
    table = scenarios.QUICK if args.quick else scenarios.FULL
    names = args.scenarios.split(",") if args.scenarios else (
        scenarios.QUICK_DEFAULT if args.quick else scenarios.DEFAULT)
    chosen = {}
    for name in (n.strip() for n in names if n.strip()):
        if name not in table:
            parser.error(f"unknown scenario {name!r}; choose from {', '.join(table)}")
        sc = table[name]
        if args.duration is not None and sc.kind == "traffic":
            sc = dataclasses.replace(sc, duration=args.duration)
        if args.hold is not None and sc.kind == "idle":
            sc = dataclasses.replace(sc, hold=args.hold)
        if args.rate is not None and sc.mode == "rate" and sc.kind == "traffic":
            sc = dataclasses.replace(sc, rate=args.rate / sc.sender_count)
        if workers is not None and len(sc.workers) > 1:
            sc = dataclasses.replace(sc, workers=workers)
        if steps is not None and sc.kind == "capacity":
            sc = dataclasses.replace(sc, steps=steps)
        if args.overload_seconds is not None and sc.kind == "capacity":
            sc = dataclasses.replace(sc, overload=args.overload_seconds)
        chosen[name] = sc
    if (steps is not None or args.overload_seconds is not None) and \
            not any(sc.kind == "capacity" for sc in chosen.values()):
        parser.error("--steps and --overload-seconds apply to the capacity scenario only: "
                     "add it to --scenarios")
    args.chosen = chosen
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def versions():
    out = {"python": platform.python_version(), "machine": platform.machine(),
           "cpus": __import__("os").cpu_count()}
    for name, argv in (("node", ["node", "--version"]), ("redis", ["redis-server", "--version"])):
        try:
            out[name] = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out[name] = None
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=servers.ROOT,
                                       capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["commit"] = None
    return out


def show(doc, chosen, server_names, png):
    """Print the tables of a results document and draw its plots."""
    summary = report.summarize(doc["runs"])
    doc["summary"] = summary
    print()
    code = doc.get("scalechat")
    at = ""
    if code:
        at = f"scalechat at {code['commit']}{' with uncommitted changes' if code['uncommitted_changes'] else ''}; "
    print(f"`{doc['command']}`, {doc.get('elapsed_s', 0):.0f} s; {at}medians over repeats, "
          f"(x) = ratio to node's median; lost and dup are totals over repeats.")
    print()
    print(report.tables(summary, chosen, server_names, doc["runs"]))
    problems = report.failures(doc["runs"])
    if problems:
        print("Problems:")
        print(problems)
        print()
    if png is not None and summary:
        single = {n: sc for n, sc in chosen.items()
                  if len(sc.workers) == 1 and sc.kind in ("traffic", "idle")}
        if any(n in summary for n in single):
            report.plot(summary, doc["runs"], single, server_names, png)
            print(f"plot: {png}")
        for name, sc in chosen.items():
            if len(sc.workers) > 1 and any(r.get("scenario") == name for r in doc["runs"]):
                path = png.with_name(f"{png.stem}-{name}.png")
                report.plot_scaleout(doc["runs"], sc, server_names, path)
                print(f"plot: {path}")
    return summary


def replay(path, no_plot):
    doc = json.loads(path.read_text())
    chosen = {}
    for name, cfg in doc["scenarios"].items():
        cfg["workers"] = tuple(cfg.get("workers", (2,)))
        cfg["steps"] = tuple(cfg.get("steps", ()))
        chosen[name] = scenarios.Scenario(**cfg)
    show(doc, chosen, doc.get("rows", doc["servers"]),
         None if no_plot else path.with_suffix(".png"))
    return 0


def make_plan(args, scalechat_code):
    """(scenario, workers, repeat, server, redis) of every run, and the servers left out."""
    skipped = {}
    if "cluster" in args.redis:
        for server in args.servers:
            if server not in servers.CLUSTER_SERVERS:
                skipped[f"{server}+cluster"] = f"{server} does not run on a Redis Cluster"
        if "scalechat" in args.servers:
            # the URL of a cluster whose nodes do not exist yet: only its form is checked
            refusal = servers.scalechat_refuses(
                scalechat_code, servers.cluster_url([7000, 7001, 7002]))
            if refusal:
                skipped["scalechat+cluster"] = f"scalechat refuses a redis+cluster:// URL: {refusal}"
    pairs = [(server, redis) for server in args.servers for redis in args.redis
             if scenarios.row_of(server, redis) not in skipped]
    plan = [(name, workers, rep, server, redis)
            for name, sc in args.chosen.items() for workers in sc.workers
            for rep in range(args.repeats) for server, redis in pairs]
    return plan, [scenarios.row_of(s, r) for s, r in pairs], skipped


def main(argv=None):
    args = parse_args(argv)
    if args.report is not None:
        return replay(args.report, args.no_plot)
    from tqdm import tqdm

    def terminate(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, terminate)
    atexit.register(servers.stop_all)
    fd_limit = raise_fd_limit()

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out
    logroot = out / f"logs-{stamp}"
    logroot.mkdir(parents=True, exist_ok=True)
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = {"command": command.strip(), "started": stamp, "fd_limit": fd_limit,
           "versions": versions(), "servers": args.servers, "redis": args.redis,
           "scenarios": {n: dataclasses.asdict(sc) for n, sc in args.chosen.items()},
           "runs": []}
    json_path = out / f"bench-{stamp}.json"
    if {"node", "node_sharded"} & set(args.servers):
        servers.node_ready()
    code = None
    if "scalechat" in args.servers:
        doc["scalechat"] = servers.snapshot_scalechat(logroot / "scalechat-code", args.scalechat_ref)
        code = doc["scalechat"]["path"]
    plan, doc["rows"], doc["skipped"] = make_plan(args, code)
    for row, reason in doc["skipped"].items():
        print(f"skipping {row}: {reason}")

    began = time.time()
    interrupted = False
    bar = tqdm(plan, unit="run", dynamic_ncols=True)
    try:
        for name, workers, rep, server, redis in bar:
            sc = args.chosen[name]
            case, row = scenarios.case_of(sc, workers), scenarios.row_of(server, redis)
            bar.set_description(f"{case} {row} #{rep + 1}")
            logdir = logroot / f"{case}-{row}-{rep + 1}"
            stack = servers.Stack(server, logdir, workers=workers, redis=redis, aof=args.aof,
                                  scalechat_code=code)
            try:
                stack.start()
                result = scenarios.execute(
                    sc, stack, logdir,
                    progress=lambda text: bar.set_postfix_str(text, refresh=True))
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # reported in the results, the next run goes on
                result = {"scenario": name, "server": server, "workers": workers, "redis": redis,
                          "case": case, "row": row, "error": f"{type(exc).__name__}: {exc}"}
                tqdm.write(f"{case} {row} #{rep + 1} failed: {result['error']} (logs: {logdir})")
            finally:
                stack.stop()
            result["repeat"] = rep + 1
            doc["runs"].append(result)
            json_path.write_text(json.dumps(doc, indent=1))
    except KeyboardInterrupt:
        interrupted = True
        tqdm.write("interrupted: stopping every process started, then reporting the runs that finished")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        bar.close()
        servers.stop_all()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    doc["elapsed_s"] = round(time.time() - began, 1)
    show(doc, args.chosen, doc["rows"], None if args.no_plot else out / f"bench-{stamp}.png")
    json_path.write_text(json.dumps(doc, indent=1))
    print(f"results: {json_path}")
    print(f"logs: {logroot}")
    failed = any("error" in r for r in doc["runs"]) or any(
        r.get("lost") or r.get("duplicated") or r.get("connect_failed") or r.get("unavailable")
        or r.get("presence_leaves") for r in doc["runs"])
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
