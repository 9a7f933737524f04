"""The run's data report: per source, documents read/kept, drop reasons, dedup clusters, languages,
tokens and tokenizer fertility (tokens per whitespace word), as a Markdown table (`report.md`) and a
bar chart of kept vs dropped documents per reason (`report.png`)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def report_table(manifest: dict) -> str:
    rows = [
        "| source | read | kept | tokens | bytes/token | tokens/word | dropped (by rule) | skipped inputs | languages |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in manifest["sources"].items():
        tokens = s.get("tokens", 0)
        dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "-"
        skipped = ", ".join(f"{k} {v}" for k, v in s["skipped_inputs"].items()) or "-"
        langs = ", ".join(f"{k} {v}" for k, v in list(s.get("languages", {}).items())[:6]) or "-"
        rows.append(
            f"| {name} | {s['documents_read']:,} | {s['documents_kept']:,} | {tokens:,} | "
            f"{s['bytes'] / max(tokens, 1):.2f} | {s.get('fertility', 0):.3f} | {dropped} | {skipped} | {langs} |"
        )
    for name, d in manifest.get("dedup", {}).items():
        rows.append(
            f"\nMinHash dedup of {name}: {d['removed']:,} of {d['documents']:,} removed in {d['clusters']:,} "
            f"clusters (largest {d['largest_cluster']}; sizes {d['cluster_sizes']})"
        )
    return "\n".join(rows)


def write_report(manifest: dict, directory: str) -> None:
    table = report_table(manifest)
    with open(os.path.join(directory, "report.md"), "w") as f:
        f.write(f"# Data report ({manifest['config_hash']})\n\n{table}\n")
    log.info("data report:\n%s", table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the table is the report; the chart is a convenience
        log.warning("matplotlib missing: no report.png")
        return
    names = list(manifest["sources"])
    reasons = sorted({r for s in manifest["sources"].values() for r in s["dropped"]})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)), 4.5))
    bottom = [0] * len(names)
    for label in ["kept", *reasons]:
        vals = [
            s["documents_kept"] if label == "kept" else s["dropped"].get(label, 0)
            for s in manifest["sources"].values()
        ]
        ax.bar(names, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("documents")
    ax.set_title("documents kept and dropped per rule")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "report.png"), dpi=100)
    plt.close(fig)
