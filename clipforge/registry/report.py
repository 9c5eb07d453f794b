"""The champion-vs-challenger report: every metric of the new model beside the champion's.

For each metric: both values, the delta (challenger - champion) and which side wins, by the
metric's direction (higher is better for accuracies and recalls; lower for Wang & Isola's
alignment and uniformity; no winner for descriptive numbers such as the modality gap or the
logit scale). The promotion rule's metric is marked and the registry's decision, taken by
:func:`~clipforge.registry.promote_if_better`, is stated with its reason: the report explains
the decision, it does not take it.
"""

from __future__ import annotations

import math
from typing import Any

from clipforge.core.metrics import eval_name, metric_key

#: Metric names (the last path part) where lower is better.
LOWER_IS_BETTER = frozenset({"alignment", "uniformity_image", "uniformity_text"})
#: Metric names that describe a model without ranking it.
DESCRIPTIVE = frozenset({"modality_gap", "logit_scale", "weight_decay"})


def direction(metric: str) -> str | None:
    """``"max"``, ``"min"``, or None when the metric ranks nothing."""
    last = metric.rsplit("/", 1)[-1]
    if last in DESCRIPTIVE:
        return None
    return "min" if last in LOWER_IS_BETTER else "max"


def compare(
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    *,
    promote_metric: str | None = None,
    promote_mode: str = "max",
) -> list[dict[str, Any]]:
    """One row per metric of either side, the challenger's names first, in order.

    ``champion`` is keyed as the registry tags them (``@`` as ``_at_``); names are matched
    through :func:`metric_key`. ``promote_metric`` takes ``promote_mode`` as its direction.
    """
    theirs = {metric_key(k): v for k, v in (champion or {}).items()}
    names = list(challenger) + sorted(k for k in theirs if k not in {metric_key(c) for c in challenger})
    rows = []
    for name in names:
        ours, other = challenger.get(name), theirs.get(metric_key(name))
        key = metric_key(name)
        is_rule = promote_metric is not None and key in (metric_key(promote_metric), metric_key(eval_name(promote_metric)))
        better = promote_mode if is_rule else direction(name)
        rows.append(
            {
                "metric": name,
                "challenger": ours,
                "champion": other,
                "delta": None if ours is None or other is None else ours - other,
                "better": better,
                "winner": _winner(ours, other, better),
                "promotion_metric": is_rule,
            }
        )
    return rows


def _winner(ours: float | None, other: float | None, better: str | None) -> str:
    if ours is None or other is None or better is None or math.isnan(ours) or math.isnan(other):
        return "n/a"
    if ours == other:
        return "tie"
    return "challenger" if (ours > other) == (better == "max") else "champion"


def build_report(
    *,
    model_name: str,
    challenger_version: str | None,
    challenger: dict[str, float],
    champion_version: str | None,
    champion: dict[str, float] | None,
    rule: dict[str, Any] | None,
    promoted: bool | None = None,
    reason: str = "",
) -> dict[str, Any]:
    """The report as a JSON-able dict: who is compared, the rule, the decision, the rows, the tally."""
    rows = compare(challenger, champion, promote_metric=(rule or {}).get("metric"), promote_mode=(rule or {}).get("mode", "max"))
    tally = {w: sum(r["winner"] == w for r in rows) for w in ("challenger", "champion", "tie", "n/a")}
    return {
        "model": model_name,
        "challenger": {"version": challenger_version},
        "champion": {"version": champion_version} if champion_version else None,
        "rule": rule,
        "decision": {"promoted": promoted, "reason": reason},
        "tally": tally,
        "rows": rows,
    }


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page: the decision first, then the table."""
    ch = report["challenger"]["version"]
    champ = report["champion"]["version"] if report["champion"] else None
    title = f"v{ch}" if ch else "the new model"
    lines = [f"# {report['model']}: {title} against the champion" + (f" (v{champ})" if champ else "")]
    decision = report["decision"]
    if decision["promoted"] is not None:
        verdict = "**promoted to champion**" if decision["promoted"] else "**stays challenger**"
        lines += ["", f"Decision: {title} {verdict}. {decision['reason']}".rstrip()]
    if report["rule"]:
        r = report["rule"]
        beyond = (
            f", the lower bound of its paired-bootstrap interval at {r['confidence']:g} above it" if r.get("confidence") else ""
        )
        lines += [
            "",
            f"Rule: `{r['metric']}` ({r['mode']}), by more than {r['min_delta']}{beyond}; the other metrics inform, they do not decide.",
        ]
    if interval := decision.get("interval"):
        lines += [
            "",
            f"Interval of the delta: {interval['delta']:+.4f} [{interval['low']:+.4f}, {interval['high']:+.4f}] "
            f"at {interval['confidence']:g}, over {interval['n']} samples both were measured on ({interval['resamples']} resamples).",
        ]
    if champ is None:
        lines += ["", "There is no champion yet: nothing to compare against."]
    t = report["tally"]
    lines += [
        "",
        f"Wins: challenger {t['challenger']}, champion {t['champion']}, ties {t['tie']}, not ranked {t['n/a']}.",
        "",
        "| metric | challenger | champion | delta | better | winner |",
        "|---|---:|---:|---:|:---:|---|",
    ]
    for row in report["rows"]:
        name = f"**`{row['metric']}`** (rule)" if row["promotion_metric"] else f"`{row['metric']}`"
        better = {"max": "higher", "min": "lower", None: "-"}[row["better"]]
        delta = "" if row["delta"] is None else f"{row['delta']:+.4f}"
        lines.append(f"| {name} | {_num(row['challenger'])} | {_num(row['champion'])} | {delta} | {better} | {row['winner']} |")
    return "\n".join(lines) + "\n"


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"
