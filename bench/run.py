"""Benchmark scalechat against reference servers: `python -m bench --help`.

Each scenario runs on every server in turn (A B C A B C ...), each time on a fresh
stack; the report gives medians over the repeats and ratios to the Node peer.
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
        description="Load-test scalechat and the reference servers (node, python_stock) "
                    "side by side on 127.0.0.1.")
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
        chosen[name] = sc
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
    """Print the tables of a results document and draw its plot."""
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
    print(report.tables(summary, chosen, server_names))
    problems = report.failures(doc["runs"])
    if problems:
        print("Problems:")
        print(problems)
        print()
    if png is not None and summary:
        report.plot(summary, doc["runs"], chosen, server_names, png)
        print(f"plot: {png}")
    return summary


def replay(path, no_plot):
    doc = json.loads(path.read_text())
    chosen = {name: scenarios.Scenario(**cfg) for name, cfg in doc["scenarios"].items()}
    show(doc, chosen, doc["servers"], None if no_plot else path.with_suffix(".png"))
    return 0


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
    plan = [(name, rep, server) for name in args.chosen for rep in range(args.repeats)
            for server in args.servers]
    doc = {"command": command.strip(), "started": stamp, "fd_limit": fd_limit,
           "versions": versions(), "servers": args.servers,
           "scenarios": {n: dataclasses.asdict(sc) for n, sc in args.chosen.items()},
           "runs": []}
    json_path = out / f"bench-{stamp}.json"
    if "node" in args.servers:
        servers.node_ready()
    code = None
    if "scalechat" in args.servers:
        doc["scalechat"] = servers.snapshot_scalechat(logroot / "scalechat-code", args.scalechat_ref)
        code = doc["scalechat"]["path"]

    began = time.time()
    interrupted = False
    bar = tqdm(plan, unit="run", dynamic_ncols=True)
    try:
        for name, rep, server in bar:
            sc = args.chosen[name]
            bar.set_description(f"{name} {server} #{rep + 1}")
            logdir = logroot / f"{name}-{server}-{rep + 1}"
            stack = servers.Stack(server, logdir, aof=args.aof, scalechat_code=code)
            try:
                stack.start()
                result = scenarios.execute(
                    sc, stack, logdir,
                    progress=lambda text: bar.set_postfix_str(text, refresh=True))
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # reported in the results, the next run goes on
                result = {"scenario": name, "server": server, "error": f"{type(exc).__name__}: {exc}"}
                tqdm.write(f"{name} {server} #{rep + 1} failed: {result['error']} (logs: {logdir})")
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
    show(doc, args.chosen, args.servers, None if args.no_plot else out / f"bench-{stamp}.png")
    json_path.write_text(json.dumps(doc, indent=1))
    print(f"results: {json_path}")
    print(f"logs: {logroot}")
    failed = any("error" in r for r in doc["runs"]) or any(
        r.get("lost") or r.get("duplicated") for r in doc["runs"])
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
