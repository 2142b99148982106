"""`python -m pneumonia.fit`: train one classifier, centrally or federated, into a complete
run directory.

    python -m pneumonia.fit                                   # synthetic data, CPU-sized
    python -m pneumonia.fit --config configs/fl_se_resnet_gn_cpu.yaml \\
        --data.root ../shared/data/chest_xray/train
    python -m pneumonia.fit --resume runs/fl_se_resnet_gn_cpu/version_0
"""

from __future__ import annotations

import sys
from pathlib import Path

from pneumonia.core.caches import cached_help
from pneumonia.core.errors import asks_for_help, exit_on_user_error
from pneumonia.run.config import (
    DEFAULT_CONFIG,
    build_fit_parser,
    check_config_sources,
    parse_args,
    parse_fit_config,
    with_default_config,
)
from pneumonia.run.progress import Progress

# How a run takes its keys, below the module docstring in --help.
KEYS = """Any key below can be set in a --config YAML (a group's keys nested under its name:
`data: {image_size: 128}`) or on the command line (`--data.image_size 128`), which wins.
--resume RUN_DIR continues a stopped run with its own config.yaml (add --federated.rounds N or
--trainer.max_epochs N to train it longer, where its schedule allows); --print_config prints
the resolved config and exits."""


def run(argv: list[str] | None = None, progress: Progress | None = None) -> dict:
    """Parse the command line and run the job; the summary. Raises UserError (`main` prints it
    as one line); `--help` prints the help and exits 0."""
    argv = sys.argv[1:] if argv is None else argv
    if asks_for_help(argv):
        text = cached_help("fit", help_inputs(argv), argv, lambda: fit_help(argv))
        print(text, end="", flush=True)
        raise SystemExit(0)
    cfg, config_yaml, resume = parse_fit_config(argv)
    if cfg.federated.engine != "local":  # the clients on Flower's simulation runtime
        from pneumonia.flower.engine import run_on_engine

        return run_on_engine(cfg, config_yaml, resume, progress)
    from pneumonia.run.job import run_job  # training's modules, only when there is a run

    return run_job(cfg, config_yaml, resume, progress)


def config_files(argv: list[str]) -> list[str]:
    """The --config files `argv` names, in order."""
    configs = [a for i, a in enumerate(argv) if i and argv[i - 1] == "--config"]
    return configs + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


def help_inputs(argv: list[str]) -> list[Path]:
    """The files the help's defaults come from (the cache's key reads them)."""
    return [Path(c) for c in config_files(argv)] or [DEFAULT_CONFIG]


def fit_help(argv: list[str]) -> str:
    """The help, its defaults the values the --config files in `argv` give: configs/default.yaml's
    when there is none (what a run without --config reads), the built-in defaults overridden
    by the files otherwise; the files are read with a run's checks."""
    configs = config_files(argv)
    sources = with_default_config([arg for path in configs for arg in ("--config", path)])
    parser = build_fit_parser()
    check_config_sources(parser, sources)
    values = parse_args(parser, sources)
    parser.set_defaults({key: value for key, value in values.items() if key != "config"})
    parser.description = f"{__doc__.strip()}\n\n{defaults_line(configs)}\n\n{KEYS}"
    return parser.format_help()


def defaults_line(configs: list[str]) -> str:
    """Where the defaults shown come from."""
    if configs:
        return f"Defaults below: the built-in ones overridden by {', '.join(configs)}."
    if DEFAULT_CONFIG.is_file():
        return (
            f"Defaults below: {_shown(DEFAULT_CONFIG)}'s, which a run without --config reads. "
            "With --config FILE, the keys FILE leaves out take the built-in defaults instead "
            "(--config FILE --help shows them)."
        )
    return "Defaults below: the built-in ones (configs/default.yaml is not there)."


def _shown(path: Path) -> str:
    """`path` relative to the working directory where it lies below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


main = exit_on_user_error(run)


if __name__ == "__main__":
    main()
