"""Merging the generators' latency histograms and summarising repeats."""
import math
import statistics

from .loadgen import HIST_BINS, HIST_HI_US, HIST_LO_US

_STEP = math.log(HIST_HI_US / HIST_LO_US) / HIST_BINS


def merge_hists(hists):
    merged = {"count": 0, "max": 0, "bins": {}}
    for h in hists:
        merged["count"] += h["count"]
        merged["max"] = max(merged["max"], h["max"])
        for b, c in h["bins"].items():
            b = int(b)
            merged["bins"][b] = merged["bins"].get(b, 0) + c
    return merged


def percentile_ms(hist, q):
    """The q-th percentile (0-100) of a merged histogram, in ms (bin midpoint, within 1%)."""
    total = hist["count"]
    if not total:
        return None
    rank = q / 100.0 * total
    seen = 0
    for b in sorted(hist["bins"]):
        seen += hist["bins"][b]
        if seen >= rank:
            return HIST_LO_US * math.exp((b + 0.5) * _STEP) / 1000.0
    return hist["max"] / 1000.0


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def quantile_list(sorted_values, q):
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return sorted_values[i]
