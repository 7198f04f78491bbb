"""A picture of a run: accuracy and loss, data-plane bytes and round time, per round."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

__all__ = ["plot_run"]


def plot_run(
    history: Mapping[int, Mapping[str, float]],
    path: Path,
    *,
    initial: Mapping[str, float] | None = None,
    title: str = "SplitFed run",
) -> Path:
    """Draw ``history`` (per round: the app's metrics, as in ``metrics.json``) into ``path``.

    Four panels: test accuracy and loss (central, from round 0 with ``initial``, and federated
    where clients evaluated), data-plane megabytes, and round seconds (the first round includes
    the engine's start-up); two more where the leakage monitor ran: re-identification against
    chance, and the inputs' variance the reconstructions explain; two more where it attacked
    labels (label-private split): the labels recovered against the most common label's share,
    and the cosine attack's ROC AUC against 0.5. Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = sorted(history)
    rows = dict(history)
    if initial:
        rows[0] = dict(initial)

    def series(key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
        points = sorted((r, float(v[key]) * scale) for r, v in rows.items() if key in v)
        return [r for r, _ in points], [y for _, y in points]

    monitored = any("leakage-reidentification" in values for values in rows.values())
    labels_attacked = any("leakage-label-surrogate" in values for values in rows.values())
    rows_of_plots = 2 + monitored + labels_attacked
    figure, axes = plt.subplots(
        rows_of_plots, 2, figsize=(10, 3.25 * rows_of_plots), constrained_layout=True
    )
    for axis, metric in ((axes[0, 0], "accuracy"), (axes[0, 1], "loss")):
        for key, label in (
            (f"test-{metric}", "central"),
            (f"federated-eval-{metric}", "federated"),
        ):
            xs, ys = series(key)
            if xs:
                axis.plot(xs, ys, marker="o", label=label)
        axis.set_title(f"test {metric}")
        if axis.get_lines():
            axis.legend(loc="best", fontsize="small")
    bars = (
        (axes[1, 0], "data-plane-bytes", 1e-6, "data plane per round (MB, both directions)"),
        (axes[1, 1], "round-seconds", 1.0, "training round (s; round 1 includes start-up)"),
    )
    for axis, key, scale, label in bars:
        xs, ys = series(key, scale)
        axis.bar(xs, ys, color="tab:blue" if key.startswith("data") else "tab:green")
        axis.set_title(label)
        axis.set_ylim(bottom=0)
        axis.ticklabel_format(axis="y", useOffset=False, style="plain")
    if monitored:
        for axis, key, heading in (
            (axes[2, 0], "leakage-reidentification", "leakage: held-out examples re-identified"),
            (axes[2, 1], "leakage-explained-variance", "leakage: input variance reconstructed"),
        ):
            xs, ys = series(key)
            axis.plot(xs, ys, marker="o", color="tab:red", label="split server's decoder")
            if key == "leakage-reidentification":
                xs, ys = series("leakage-reidentification-chance")
                axis.plot(xs, ys, linestyle="--", color="gray", label="chance")
            axis.set_title(heading)
            axis.set_ylim(0, 1.05)
            axis.legend(loc="best", fontsize="small")
    if labels_attacked:
        recovered, gradients = axes[3, 0], axes[3, 1]
        for key, label, style in (
            ("leakage-label-head-forward", "the client head it holds", "-"),
            ("leakage-label-surrogate", "a head trained on labelled data", "-"),
            ("leakage-label-chance", "most common label", "--"),
        ):
            xs, ys = series(key)
            if xs:
                recovered.plot(
                    xs, ys, marker="o" if style == "-" else "", linestyle=style, label=label
                )
        recovered.set_title("leakage: held-out labels recovered")
        xs, ys = series("leakage-label-cosine-auc")
        gradients.plot(xs, ys, marker="o", color="tab:red", label="cosine attack")
        gradients.axhline(0.5, linestyle="--", color="gray", label="chance")
        gradients.set_title("leakage: labels from output gradients (ROC AUC)")
        for axis in (recovered, gradients):
            axis.set_ylim(0, 1.05)
            axis.legend(loc="best", fontsize="small")
    for axis in axes.flat:
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    figure.suptitle(f"{title}: {len(rounds)} rounds")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
