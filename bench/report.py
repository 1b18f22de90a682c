"""Tables (Markdown, for the terminal and docs/performance.md) and the PNG plots of a run."""
from .stats import median

REFERENCE = "node"
SHARDED_PEER = "node_sharded"
COLORS = {"scalechat": "#d95f02", "node": "#1b9e77", "node_sharded": "#66a61e",
          "python_stock": "#7570b3"}

# (key, header, format, whether a ratio to node is shown)
TRAFFIC_COLUMNS = [
    ("deliveries_per_s", "deliveries/s", "{:,.0f}", True),
    ("lost", "lost", "{:d}", False),
    ("duplicated", "dup", "{:d}", False),
    ("lat_p50_ms", "p50 ms", "{:.1f}", True),
    ("lat_p99_ms", "p99 ms", "{:.1f}", True),
    ("lat_max_ms", "max ms", "{:.0f}", False),
    ("ack_p50_ms", "ack p50 ms", "{:.1f}", True),
    ("cpu_us_per_delivery", "CPU us/delivery", "{:.1f}", True),
    ("server_cpu_cores", "server cores", "{:.2f}", False),
    ("connect_per_s", "connects/s", "{:,.0f}", True),
    ("gen_cpu_max", "gen CPU", "{:.2f}", False),
]
IDLE_COLUMNS = [
    ("connected", "connected", "{:,.0f}", False),
    ("open_after_hold", "open after hold", "{:,.0f}", False),
    ("pings_per_conn", "pings/conn", "{:.1f}", False),
    ("kb_per_conn_w0", "KB/conn w0", "{:.1f}", True),
    ("kb_per_conn_w1", "KB/conn w1", "{:.1f}", True),
    ("redis_kb_per_conn", "Redis KB/conn", "{:.2f}", False),
    ("server_cpu_cores", "server CPU cores", "{:.3f}", False),
    ("connect_per_s", "connects/s", "{:,.0f}", True),
    ("connect_failed", "failed", "{:,.0f}", False),
]
CONNECT_COLUMNS = [
    ("connected", "connected", "{:,.0f}", False),
    ("connect_per_s", "connects/s", "{:,.0f}", True),
    ("connect_p50_ms", "p50 ms", "{:.1f}", True),
    ("connect_p99_ms", "p99 ms", "{:.1f}", True),
    ("cpu_us_per_connect", "server CPU us/connect", "{:,.0f}", True),
    ("gen_cpu_s", "gen CPU s", "{:.1f}", False),
    ("connect_failed", "failed", "{:,.0f}", False),
]
SCALEOUT_COLUMNS = [
    ("deliveries_per_s", "deliveries/s", "{:,.0f}"),
    ("lost", "lost", "{:d}"),
    ("duplicated", "dup", "{:d}"),
    ("lat_p50_ms", "p50 ms", "{:.1f}"),
    ("lat_p99_ms", "p99 ms", "{:.1f}"),
    ("cpu_us_per_delivery", "CPU us/delivery", "{:.1f}"),
    ("pubsub_per_delivered", "pub/sub msgs per delivered msg", "{:.2f}"),
    ("pubsub_per_delivered_max", "busiest worker", "{:.2f}"),
    ("server_cpu_cores", "server cores", "{:.2f}"),
    ("gen_cpu_max", "gen CPU", "{:.2f}"),
]
CROWD_COLUMNS = [
    ("connected", "connected", "{:,.0f}", False),
    ("connect_per_s", "connects/s", "{:,.0f}", True),
    ("connect_p50_ms", "connect p50 ms", "{:,.0f}", True),
    ("connect_p99_ms", "connect p99 ms", "{:,.0f}", True),
    ("cpu_us_per_connect", "server CPU us/connect", "{:,.0f}", True),
    ("presence_joins_received", "presence joins received", "{:,.0f}", False),
    ("gen_cpu_s", "gen CPU s joining", "{:,.1f}", False),
    ("kb_per_member_w0", "KB/member w0", "{:.1f}", True),
    ("kb_per_member_w1", "KB/member w1", "{:.1f}", True),
    ("deliveries_per_s", "deliveries/s", "{:,.0f}", True),
    ("lat_p50_ms", "p50 ms", "{:.1f}", True),
    ("lat_p99_ms", "p99 ms", "{:.1f}", True),
    ("cpu_us_per_delivery", "CPU us/delivery", "{:.1f}", True),
    ("lost", "lost", "{:d}", False),
    ("duplicated", "dup", "{:d}", False),
    ("gen_cpu_max", "gen CPU", "{:.2f}", False),
]
# scenarios whose table is not the one of their kind
COLUMNS_BY_NAME = {"crowd": CROWD_COLUMNS}
CAPACITY_COLUMNS = [
    ("capacity_msgs_per_s", "msg/s held", "{:,.0f}", True),
    ("held_deliveries_per_s", "deliveries/s", "{:,.0f}", True),
    ("held_lat_p99_ms", "p99 ms", "{:.1f}", False),
    ("held_cpu_us_per_delivery", "CPU us/delivery", "{:.1f}", True),
    ("held_server_cpu_cores", "server cores", "{:.2f}", False),
    ("connect_per_s", "connects/s", "{:,.0f}", True),
    ("lost", "lost", "{:d}", False),
    ("duplicated", "dup", "{:d}", False),
]
# (key, header, format); medians over the repeats that ran the step, sums for the counts
STEP_COLUMNS = [
    ("deliveries_per_s", "deliveries/s", "{:,.0f}"),
    ("lat_p50_ms", "p50 ms", "{:.1f}"),
    ("lat_p99_ms", "p99 ms", "{:.1f}"),
    ("ack_p50_ms", "ack p50 ms", "{:.1f}"),
    ("ack_p99_ms", "ack p99 ms", "{:.1f}"),
    ("ack_max_ms", "ack max ms", "{:,.0f}"),
    ("send_errors", "errors", None),
    ("unacked", "unacked", "{:,d}"),
    ("lost", "lost", "{:,d}"),
    ("duplicated", "dup", "{:,d}"),
    ("skipped", "skipped", "{:,d}"),
    ("server_cpu_cores", "server cores", "{:.2f}"),
    ("cpu_us_per_delivery", "CPU us/delivery", "{:.1f}"),
    ("gen_cpu_sum", "gen cores", "{:.2f}"),
]
STEP_SUMMED = {"unacked", "lost", "duplicated", "skipped"}
SUMMED = {"lost", "duplicated", "connect_failed"}


def _flat(run):
    """Per-run values the tables use, derived from the nested figures."""
    row = dict(run)
    for worker, kb in (run.get("kb_per_conn") or {}).items():
        row[f"kb_per_conn_{worker}"] = kb
    for worker, kb in (run.get("kb_per_member") or {}).items():
        row[f"kb_per_member_{worker}"] = kb
    if run.get("connected") and "pings_answered" in run:
        row["pings_per_conn"] = run["pings_answered"] / run["connected"]
    gen = run.get("gen_cpu_cores")
    row["gen_cpu_max"] = max(gen) if gen else None
    return row


def _case(run):
    return run.get("case", run["scenario"])


def _row(run):
    return run.get("row", run["server"])


def summarize(runs):
    """{case: {row: {key: median over repeats (sum for losses), "repeats": n}}}.

    A case is a scenario at one worker count; a row a server on one Redis topology.
    """
    grouped = {}
    for run in runs:
        if "error" in run:
            continue
        grouped.setdefault(_case(run), {}).setdefault(_row(run), []).append(_flat(run))
    summary = {}
    for scenario, by_server in grouped.items():
        summary[scenario] = {}
        for server, rows in by_server.items():
            keys = {k for r in rows for k, v in r.items() if isinstance(v, (int, float))}
            agg = {}
            for k in keys:
                values = [r.get(k) for r in rows]
                if k in SUMMED:
                    agg[k] = sum(v or 0 for v in values)
                else:
                    agg[k] = median(values)
            agg["repeats"] = len(rows)
            summary[scenario][server] = agg
    return summary


def _columns(sc):
    if sc.name in COLUMNS_BY_NAME:
        return COLUMNS_BY_NAME[sc.name]
    return {"traffic": TRAFFIC_COLUMNS, "idle": IDLE_COLUMNS,
            "capacity": CAPACITY_COLUMNS}.get(sc.kind, CONNECT_COLUMNS)


def _cell(value, fmt, ratio):
    if value is None:
        return "-"
    try:
        text = fmt.format(int(value) if fmt.endswith("d}") else value)
    except (ValueError, TypeError):
        text = str(value)
    if ratio is not None:
        text += f" ({ratio:.2f}x)"
    return text


def tables(summary, scenarios, servers, runs=()):
    """Markdown tables, one per scenario (three for capacity); ratios are to node's median."""
    lines = []
    for name, sc in scenarios.items():
        if len(sc.workers) > 1:
            lines.append(scaleout_table(summary, sc, servers))
            continue
        if name not in summary:
            continue
        by_server = summary[name]
        cols = _columns(sc)
        extra = [("limited by", _limits(runs, name))] if sc.kind == "capacity" else []
        lines.append(f"#### {name}: {sc.describe()}")
        lines.append("")
        lines.append("| server | " + " | ".join(c[1] for c in cols) +
                     "".join(f" | {header}" for header, _ in extra) + " |")
        lines.append("|---" * (len(cols) + len(extra) + 1) + "|")
        ref = by_server.get(REFERENCE, {})
        for server in servers:
            if server not in by_server:
                continue
            agg = by_server[server]
            cells = []
            for key, _header, fmt, with_ratio in cols:
                value = agg.get(key)
                ratio = None
                if with_ratio and server != REFERENCE and value is not None and ref.get(key):
                    ratio = value / ref[key]
                cells.append(_cell(value, fmt, ratio))
            cells += [by_row.get(server, "-") for _, by_row in extra]
            lines.append(f"| {server} (n={agg['repeats']}) | " + " | ".join(cells) + " |")
        lines.append("")
        if sc.kind == "capacity":
            lines.append(steps_table(runs, sc, servers))
            lines.append(overload_table(runs, sc, servers))
    return "\n".join(lines)


def _capacity_runs(runs, name, row):
    return [r for r in runs if "error" not in r and r.get("scenario") == name and _row(r) == row]


def _limits(runs, name):
    """{row: what ended each repeat's search, e.g. "p99 140 ms / errors busy 12"}."""
    out = {}
    for run in runs:
        if "error" not in run and run.get("scenario") == name:
            out.setdefault(_row(run), []).append(run.get("limited_by") or "-")
    return {row: " / ".join(reasons) for row, reasons in out.items()}


def _errors(counts):
    return ", ".join(f"{code} {n:,}" for code, n in sorted(counts.items())) or "0"


def steps_table(runs, sc, rows):
    """A line per server and step: medians over the repeats that reached the step, counts
    summed; "held" says in how many of them the step was held."""
    lines = [f"#### {sc.name} steps: each {sc.warmup:g} s of warm-up and {sc.duration:g} s "
             f"measured; held = p99 <= 100 ms, no error, nothing unacked after 10 s, nothing "
             f"lost or doubled, no client dropped, no send skipped, at most 1 % sent late", ""]
    headers = ["server", "msg/s", "held"] + [c[1] for c in STEP_COLUMNS]
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|---" * len(headers) + "|")
    for row in rows:
        by_rate = {}
        for run in _capacity_runs(runs, sc.name, row):
            for step in run.get("steps", []):
                by_rate.setdefault(step["rate"], []).append(step)
        for rate in sorted(by_rate):
            steps = by_rate[rate]
            cells = [row, f"{rate:,g}", f"{sum(s['held'] for s in steps)}/{len(steps)}"]
            for key, _header, fmt in STEP_COLUMNS:
                if key == "send_errors":
                    total = {}
                    for s in steps:
                        for code, n in s["send_errors"].items():
                            total[code] = total.get(code, 0) + n
                    cells.append(_errors(total))
                    continue
                values = [_step_value(s, key) for s in steps]
                if key in STEP_SUMMED:
                    value = sum(v or 0 for v in values)
                else:
                    value = median(values)
                cells.append(_cell(value, fmt, None))
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def _step_value(step, key):
    if key == "gen_cpu_sum":
        return sum(step.get("gen_cpu_cores") or []) or None
    return step.get(key)


def overload_table(runs, sc, rows):
    """A line per run: the overload phase at twice the rate held, then the recovery step."""
    lines = [f"#### {sc.name} overload: {sc.overload:g} s at twice the rate held, then "
             f"{sc.warmup:g} + {sc.recovery:g} s back at it", ""]
    headers = ["server", "msg/s", "sent", "errors", "unacked after 10 s", "ack p50 ms",
               "ack p99 ms", "ack max ms", "lost", "dup", "presence leaves",
               "worker RSS MB before / peak / after", "deliveries/s", "p99 ms", "recovery"]
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|---" * len(headers) + "|")
    for row in rows:
        for run in _capacity_runs(runs, sc.name, row):
            name = f"{row} #{run.get('repeat', 1)}"
            over, back = run.get("overload"), run.get("recovery")
            if not over:
                why = run.get("overload_skipped", "not run")
                lines.append(f"| {name} | skipped: {why} |" + " |" * (len(headers) - 2))
                continue
            recovery = "held" if back and back["held"] else (
                "not held: " + "; ".join(back["not_held"]) if back else "-")
            cells = [name, f"{over['rate']:,g}", f"{over['sent']:,}",
                     _errors(over["send_errors"]), f"{over['unacked']:,}",
                     _cell(over["ack_p50_ms"], "{:.1f}", None),
                     _cell(over["ack_p99_ms"], "{:,.1f}", None),
                     _cell(over["ack_max_ms"], "{:,.0f}", None),
                     f"{over['lost']:,}", f"{over['duplicated']:,}",
                     f"{over['presence_leaves']:,}",
                     f"{over['workers_rss_mb_before']:,.0f} / {over['workers_rss_mb_peak']:,.0f}"
                     f" / {over['workers_rss_mb_after']:,.0f}",
                     _cell(over["deliveries_per_s"], "{:,.0f}", None),
                     _cell(over["lat_p99_ms"], "{:,.1f}", None), recovery]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def scaleout_table(summary, sc, rows):
    """One wide table: a line per server and worker count.

    "vs 2w" is the CPU per delivery against the same server's at the fewest workers;
    "vs node_sharded" against node's sharded adapter at the same worker count.
    """
    cases = [(w, f"{sc.name}-{w}w") for w in sc.workers]
    lines = [f"#### {sc.name}: {sc.describe()}; at {', '.join(map(str, sc.workers))} workers", ""]
    headers = ["server", "workers"] + [c[1] for c in SCALEOUT_COLUMNS]
    headers.insert(headers.index("CPU us/delivery") + 1, f"vs {sc.workers[0]}w")
    headers.insert(headers.index(f"vs {sc.workers[0]}w") + 1, f"vs {SHARDED_PEER}")
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|---" * len(headers) + "|")
    for row in rows:
        base = summary.get(cases[0][1], {}).get(row, {}).get("cpu_us_per_delivery")
        for workers, case in cases:
            agg = summary.get(case, {}).get(row)
            if agg is None:
                continue
            cells = [f"{row} (n={agg['repeats']})", str(workers)]
            for key, _header, fmt in SCALEOUT_COLUMNS:
                cells.append(_cell(agg.get(key), fmt, None))
                if key == "cpu_us_per_delivery":
                    cpu = agg.get(key)
                    peer = summary[case].get(SHARDED_PEER, {}).get(key)
                    cells.append(f"{cpu / base:.2f}x" if cpu and base else "-")
                    cells.append(f"{cpu / peer:.2f}x" if cpu and peer else "-")
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def failures(runs):
    lines = []
    for run in runs:
        what = f"- {_case(run)} / {_row(run)} #{run['repeat']}"
        if "error" in run:
            lines.append(f"{what}: {run['error']}")
        else:
            if run.get("connect_failed"):
                reasons = "; ".join(f"{n}x {r}" for r, n in run.get("connect_errors", {}).items())
                lines.append(f"{what}: {run['connect_failed']} connections failed ({reasons})")
            for key in ("lost", "duplicated", "unexpected", "unacked", "skipped", "dropped",
                        "unavailable", "presence_leaves"):
                if run.get(key):
                    lines.append(f"{what}: {key} = {run[key]}")
            if run.get("send_errors"):
                lines.append(f"{what}: send errors {run['send_errors']}")
            recovery = run.get("recovery")
            if recovery and not recovery["held"]:
                lines.append(f"{what}: recovery step not held ({'; '.join(recovery['not_held'])})")
    return "\n".join(lines)


def plot_scaleout(runs, sc, rows, path):
    """CPU per delivery, and pub/sub messages per delivered message, against the worker count:
    a line per server through the medians, a dot per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    panels = [("cpu_us_per_delivery", "Server + Redis CPU per delivery (lower is better)",
               "CPU us / delivery"),
              ("pubsub_per_delivered", "Pub/sub messages a worker received per message it "
               "delivered", "messages received / message delivered")]
    for ax, (key, title, ylabel) in zip(axes, panels):
        for row in rows:
            server = row.split("+", 1)[0]
            style = "--" if row.endswith("+cluster") else "-"
            medians = []
            for workers in sc.workers:
                values = [r[key] for r in runs if "error" not in r and r.get(key) is not None
                          and r.get("scenario") == sc.name and _row(r) == row
                          and r.get("workers") == workers]
                ax.plot([workers] * len(values), values, ".", color=COLORS.get(server),
                        markersize=4, alpha=0.6)
                if values:
                    medians.append((workers, median(values)))
            if medians:
                ax.plot(*zip(*medians), style, marker="o", color=COLORS.get(server), label=row)
        ax.set_xticks(list(sc.workers))
        ax.set_xlabel("worker processes")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        _headroom(ax, False)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Scale-out: {sc.describe()} (medians; dots are single runs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(summary, runs, scenarios, servers, path):
    """Throughput, latency percentiles, CPU per delivery and memory per connection."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {row: COLORS.get(row.split("+", 1)[0]) for row in servers}
    traffic = [n for n, sc in scenarios.items() if sc.kind == "traffic" and n in summary]
    idle = [n for n, sc in scenarios.items() if sc.kind == "idle" and n in summary]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    width = 0.8 / max(1, len(servers))

    def bars(ax, names, key, title, ylabel, log=False):
        for i, server in enumerate(servers):
            xs, ys = [], []
            for j, name in enumerate(names):
                value = summary[name].get(server, {}).get(key)
                if value is not None:
                    xs.append(j + (i - (len(servers) - 1) / 2) * width)
                    ys.append(value)
            ax.bar(xs, ys, width, label=server, color=colors.get(server))
            for run in runs:  # each repeat as a dot
                if run.get("server") == server and run.get("scenario") in names and \
                        _flat(run).get(key) is not None:
                    j = names.index(run["scenario"])
                    ax.plot(j + (i - (len(servers) - 1) / 2) * width, _flat(run)[key], "k.",
                            markersize=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        _headroom(ax, log)
        ax.legend(fontsize=8, ncol=len(servers), loc="upper right")

    bars(axes[0][0], traffic, "deliveries_per_s", "Deliveries per second (higher is better)",
         "deliveries/s (log scale)", log=True)
    ax = axes[0][1]
    pct = [("lat_p50_ms", "p50", 1.0), ("lat_p99_ms", "p99", 0.55), ("lat_max_ms", "max", 0.25)]
    slot = 0.8 / max(1, len(servers) * len(pct))
    for i, server in enumerate(servers):
        for k, (key, label, alpha) in enumerate(pct):
            xs, ys = [], []
            for j, name in enumerate(traffic):
                value = summary[name].get(server, {}).get(key)
                if value:
                    xs.append(j - 0.4 + (i * len(pct) + k + 0.5) * slot)
                    ys.append(value)
            ax.bar(xs, ys, slot, color=colors.get(server), alpha=alpha,
                   label=f"{server} {label}")
    ax.set_xticks(range(len(traffic)))
    ax.set_xticklabels(traffic)
    ax.set_yscale("log")
    _headroom(ax, True)
    ax.set_title("Delivery latency p50 / p99 / max (lower is better)")
    ax.set_ylabel("ms (log scale)")
    ax.legend(fontsize=7, ncol=len(servers))
    bars(axes[1][0], traffic, "cpu_us_per_delivery",
         "Server + Redis CPU per delivery (lower is better)", "CPU us / delivery")
    if idle:
        ax = axes[1][1]
        for i, server in enumerate(servers):
            xs, ys = [], []
            for j, name in enumerate(idle):
                agg = summary[name].get(server, {})
                kbs = [agg.get("kb_per_conn_w0"), agg.get("kb_per_conn_w1")]
                kbs = [k for k in kbs if k is not None]
                if kbs:
                    xs.append(j + (i - (len(servers) - 1) / 2) * width)
                    ys.append(sum(kbs) / len(kbs))
            ax.bar(xs, ys, width, label=server, color=colors.get(server))
        ax.set_xticks(range(len(idle)))
        ax.set_xticklabels(idle)
        ax.set_title("Worker memory per idle connection (lower is better)")
        ax.set_ylabel("KB / connection (RSS)")
        _headroom(ax, False)
        ax.legend(fontsize=8, ncol=len(servers), loc="upper right")
    else:
        axes[1][1].axis("off")
    fig.suptitle("scalechat vs reference servers (medians; dots are single runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _headroom(ax, log):
    """Room above the bars for the legend."""
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * (8 if log else 1.3))
