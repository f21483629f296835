"""The final report of a training run, logged as artifacts of its MLflow run under report/.

    report/metrics.md, .csv    each model on each evaluated split (test, and cold when items are
                               held out): users, HR@K and NDCG@K at eval.ks, MRR
    report/segments.md, .csv   the same per user segment (models.ranking.user_segments): HR and
                               NDCG at SEGMENT_K, MRR and users, by history length, by whether
                               the target is a cold item and by how popular the target is
    report/hr_ndcg_at_k.png    HR@K and NDCG@K for every K from 1 to max(eval.ks)

Everything here is made from the evaluations' rank totals, i.e. aggregates over users: no user
id or attribute reaches a table or the plot.
"""

from typing import TYPE_CHECKING

import pandas as pd

from interestformer.jobs import tracking
from interestformer.models.ranking import RankTotals

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Evaluations = dict[str, dict[str, RankTotals]]
"""Split (test, cold, new_users) -> model name (InterestFormer, most popular) -> its rank totals."""


def metrics_table(evaluations: Evaluations) -> pd.DataFrame:
    return pd.DataFrame([{"split": split, "model": model, **_in_table_order(totals.metrics())}
                         for split, models in evaluations.items() for model, totals in models.items()])


def segments_table(evaluations: Evaluations) -> pd.DataFrame:
    """A row per split, segment and model; both models' rows of a segment next to each other."""
    rows = []
    for split, models in evaluations.items():
        per_model = {model: _by_segment(totals) for model, totals in models.items()}
        segments = dict.fromkeys(segment for by_segment in per_model.values() for segment in by_segment)
        rows += [{"split": split, "segment": segment, "model": model, **_in_table_order(per_model[model][segment])}
                 for segment in segments for model in models if segment in per_model[model]]
    return pd.DataFrame(rows)


def _by_segment(totals: RankTotals) -> dict[str, dict[str, float]]:
    by_segment = {}
    for key, value in totals.segment_metrics().items():
        segment, metric = key.removeprefix("segment/").rsplit("/", 1)
        by_segment.setdefault(segment, {})[metric] = value
    return by_segment


def _in_table_order(metrics: dict[str, float]) -> dict[str, float]:
    """users first, then HR and NDCG by K, MRR last."""
    rest = {name: value for name, value in metrics.items() if name not in ("users", "mrr")}
    return {"users": metrics["users"], **rest, "mrr": metrics["mrr"]}


def markdown(table: pd.DataFrame) -> str:
    """A GitHub-style table; metrics to 4 decimals."""
    def cell(value) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def metrics_at_k_figure(evaluations: Evaluations) -> "Figure":
    """HR@K and NDCG@K against K (log scale): a colour per model, a line style per split."""
    # Imported here: every training worker and Tune trial imports this module with jobs.train, and
    # matplotlib would add up to a second of CPU to each one's start; only the driver plots.
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    hr_axes, ndcg_axes = figure.subplots(1, 2)
    styles = ["-", "--", ":"]
    for (split, models), style in zip(evaluations.items(), styles):
        for (model, totals), colour in zip(models.items(), ("tab:blue", "tab:orange", "tab:green")):
            curves = totals.metrics_at_every_k()
            ks = range(1, len(curves["hr"]) + 1)
            label = f"{model}, {split} ({totals.users} users)"
            hr_axes.plot(ks, curves["hr"], style, color=colour, label=label)
            ndcg_axes.plot(ks, curves["ndcg"], style, color=colour, label=label)
    for axes, name in ((hr_axes, "HR@K"), (ndcg_axes, "NDCG@K")):
        axes.set_xscale("log")
        axes.xaxis.set_major_formatter(FormatStrFormatter("%g"))  # 1, 10, 100 rather than powers of ten
        axes.set_xlabel("K (full ranking over every item)")
        axes.set_ylabel(name)
        axes.set_ylim(bottom=0)
        axes.grid(True, which="both", alpha=0.3)
    hr_axes.legend(fontsize="small")
    return figure


def log_report(uri: str, run_id: str, evaluations: Evaluations):
    """Logs the tables and the plot (see the module docstring) into the run."""
    for name, table in (("metrics", metrics_table(evaluations)), ("segments", segments_table(evaluations))):
        tracking.log_text(uri, run_id, markdown(table), f"report/{name}.md")
        tracking.log_text(uri, run_id, table.to_csv(index=False), f"report/{name}.csv")
    tracking.log_figure(uri, run_id, metrics_at_k_figure(evaluations), "report/hr_ndcg_at_k.png")
