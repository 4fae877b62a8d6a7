"""The paper's claims and the rules of a verdict, in one place: what the paper says (the
figures it reports) and how a measured ratio is judged against it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from snake_mpi.analysis.compare import Row, label
from snake_mpi.store import Result

PAPER_MEMORY_RATIO = 19.37 / 3.13
"""The paper's OPT-1.3B memory claim: full fine-tuning / a Snake node (about 6.2)."""
BYTES_CLAIM = 0.5
"""The paper: Snake's communication is roughly half of federated learning's."""
ACCURACY_CLAIM = 0.95
"""The paper: Snake keeps at least about 95 % of federated learning's accuracy."""
BYTES_TOLERANCE = 0.6
"""A bytes ratio up to this counts as "about half"."""


@dataclass(frozen=True, slots=True)
class Claim:
    """One of the paper's claims, measured: Snake (``label``) against FedAvg."""

    label: str
    what: str
    measured: float
    claimed: str
    holds: bool


def claims(rows: Sequence[Row]) -> list[Claim]:
    """The paper's two relative claims for every Snake run against the (first) FedAvg run:
    bytes per round (about half) and final accuracy (at least ~95 % of FedAvg's)."""
    fed = next((r for r in rows if r.label == "fedavg"), None)
    if fed is None:
        return []
    out = []
    for r in rows:
        if not r.label.startswith("snake"):
            continue
        ratio = r.bytes_per_round / fed.bytes_per_round
        acc = r.final_accuracy / fed.final_accuracy
        out.append(
            Claim(
                r.label, "bytes per round / FedAvg's", ratio, "about 0.5", ratio <= BYTES_TOLERANCE
            )
        )
        out.append(
            Claim(r.label, "final accuracy / FedAvg's", acc, ">= 0.95", acc >= ACCURACY_CLAIM)
        )
    return out


def format_claims(items: Sequence[Claim]) -> str:
    """The claim table in Markdown."""
    lines = ["| run | claim | measured | paper | verdict |", "|---|---|---|---|---|"]
    for c in items:
        verdict = "holds" if c.holds else "does not hold"
        lines.append(f"| {c.label} | {c.what} | {c.measured:.3f} | {c.claimed} | {verdict} |")
    return "\n".join(lines)


def snake_claims(rows: Sequence[Row]) -> list[list[str]]:
    """The paper's bytes and accuracy claims for every Snake run against the FedAvg run with
    the same number of ranks (else the one with the same number of data holders: one rank
    more, the server), as table rows."""
    fed = {r.ranks: r for r in rows if r.label == "fedavg"}
    out = []
    for r in rows:
        if not r.label.startswith("snake"):
            continue
        partner = fed.get(r.ranks) or fed.get(r.ranks + 1)
        if partner is None:
            continue
        for c in claims([partner, r]):
            out.append(
                [
                    f"{c.label} N={r.ranks} vs fedavg N={partner.ranks}",
                    c.what,
                    f"{c.measured:.3f}",
                    c.claimed,
                    "holds" if c.holds else "does not hold",
                ]
            )
    return out


def perplexity_claim(results: Sequence[Result]) -> list[list[str]]:
    """For language-model runs: Snake's final perplexity against FedAvg's (the paper: lower)."""
    final: dict[str, tuple[Result, float]] = {}
    for res in results:
        ev = res.evaluation
        if "perplexity" in ev and len(ev["perplexity"]):
            final.setdefault(label(res), (res, float(ev["perplexity"][-1])))
    if "fedavg" not in final:
        return []
    fed = final["fedavg"][1]
    return [
        [
            f"{name} N={res.world_size}",
            "final perplexity / FedAvg's",
            f"{ppl / fed:.3f}",
            "< 1 (lower)",
            "holds" if ppl < fed else "does not hold",
        ]
        for name, (res, ppl) in final.items()
        if name.startswith("snake")
    ]


def memory_claim(rows: Sequence[Row], results: Sequence[Result]) -> list[list[str]]:
    """For language-model runs: the full / Snake ratio of the largest training state and of
    the largest peak-RSS increase, against the paper's 6.2."""

    def increase(res: Result) -> float:
        ranks = res.tables["ranks"]
        return float((ranks["peak_rss_bytes"] - ranks["rss_before_model_bytes"]).max())

    pairs = list(zip(rows, results, strict=True))
    full = next(((r, res) for r, res in pairs if r.label == "centralised"), None)
    if full is None:
        return []
    out = []
    for row, res in pairs:
        if not row.label.startswith("snake"):
            continue
        for what, ratio in (
            (
                "training state per node",
                full[0].train_state_max_bytes / max(row.train_state_max_bytes, 1),
            ),
            ("peak RSS increase per node", increase(full[1]) / max(increase(res), 1)),
        ):
            verdict = "holds" if ratio >= 0.9 * PAPER_MEMORY_RATIO else "does not hold"
            out.append(
                [
                    f"{row.label} N={row.ranks}",
                    f"full fine-tuning / Snake, {what}",
                    f"{ratio:.2f}",
                    f"about {PAPER_MEMORY_RATIO:.1f} (OPT-1.3B)",
                    verdict,
                ]
            )
    return out
