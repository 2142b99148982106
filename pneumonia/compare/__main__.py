"""`python -m pneumonia.compare`: train every entry of a comparison and write its report.

    python -m pneumonia.compare --config configs/compare/paper_table3_cpu.yaml \\
        --data.root ../shared/data/chest_xray/train

Any other `--group.key value` is a fit option applied to every entry. Finished entries are
skipped (same resolved config), an interrupted one resumes; --force trains all again.
"""

from __future__ import annotations

import argparse
import sys

from pneumonia.core.errors import UserError, exit_on_user_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pneumonia.compare",
        description="Train and compare classifiers side by side; writes reports/<name>/.",
        epilog="Other --group.key value options (e.g. --data.root DIR) are fit options applied "
        "to every entry: `python -m pneumonia.fit --help` lists them.",
    )
    parser.add_argument("--config", required=True, help="a comparison YAML (configs/compare/)")
    parser.add_argument("--force", action="store_true", help="train every entry again")
    parser.add_argument("--reports_root", default="reports", help="reports/<name>/ goes here")
    parser.add_argument("--runs_root", default="runs/compare", help="entries' run directories")
    parser.add_argument(
        "--report_only", action="store_true", help="re-draw the report; train nothing"
    )
    parser.add_argument(
        "--only",
        help="comma-separated entry names: train and report these alone (a long study in parts; "
        "the report then says which entries it holds)",
    )
    return parser


def only_entries(comparison, names: str | None):
    """The comparison cut to the `--only` entries (a leave_out entry K: its K_federated and
    K_pooled runs), or as it is."""
    if not names:
        return comparison
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = [e.name for e in comparison.entries]

    def named(entry_name: str, name: str) -> bool:
        return name in (entry_name, entry_name.removesuffix("_federated").removesuffix("_pooled"))

    kept = [e for e in comparison.entries if any(named(e.name, n) for n in wanted)]
    unknown = [n for n in wanted if not any(named(e.name, n) for e in kept)]
    if unknown:
        raise UserError(f"--only {unknown[0]!r} is not an entry; entries: {', '.join(known)}")
    if len(kept) < len(comparison.entries):  # a part of the study: say which
        comparison.description += f" (this report: entries {', '.join(e.name for e in kept)} only)"
    comparison.entries = kept
    if comparison.reference not in [e.name for e in kept]:
        comparison.reference = kept[0].name if comparison.reference else None
    return comparison


@exit_on_user_error
def main(argv: list[str] | None = None) -> str:
    args, overrides = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    # Training's and the report's modules (torch, Lightning, matplotlib): not for --help.
    from pneumonia.compare.plan import load_comparison
    from pneumonia.compare.report import write_report
    from pneumonia.compare.runner import DONE, entry_status, run_comparison

    if overrides and not overrides[0].startswith("--"):
        raise UserError(
            f"unexpected argument {overrides[0]!r}: fit options look like --data.root DIR"
        )
    comparison = load_comparison(args.config, overrides, args.reports_root, args.runs_root)
    comparison = only_entries(comparison, args.only)
    if args.report_only:
        # A finished run under another config would put old figures under the new labels.
        missing = [e.name for e in comparison.entries if entry_status(e) != DONE]
        if missing:
            raise UserError(
                f"entries not trained yet under this config: {', '.join(missing)}: "
                "run without --report_only"
            )
    else:
        run_comparison(comparison, args.force)
    results = write_report(comparison)
    print(f"\n{results.read_text()}\nreport: {comparison.report_dir}", flush=True)
    return str(comparison.report_dir)


if __name__ == "__main__":
    main()
