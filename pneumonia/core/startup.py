"""What a command sets for its whole process when it starts; importing the package sets none of
it, so a notebook or the Flower app that imports `pneumonia` keeps its own settings.

- Denormal floats flushed to zero. Optimizer states that shrink geometrically (RMSProp's square
  average, AdaGrad's and AdaDelta's ratios of them) fill with denormals, each op on which costs
  the CPU many times a normal one: an AdaGrad step at 64 px went from 0.16 s to 0.48 s over 120
  steps, flat at 0.17 s flushed. The flag is per thread and torch's CPU worker threads copy it
  when they start, so it must come before the first parallel op: at start-up. It changes no
  value above 1.2e-38.
- Lightning and Opacus advice that does not apply here, silenced (`QUIET`).
- matplotlib's Agg backend: figures go to files and TensorBoard, never to a screen (the
  package's own figures need no backend, `core.figures`; torchmetrics' plots use pyplot's).
- The package's log records (`logging.getLogger("pneumonia....")`) printed on stdout as bare
  lines: the console of a run. A library user sees nothing unless they ask for it.

`startup()` is idempotent; `errors.exit_on_user_error`, which wraps every command, calls it.
"""

from __future__ import annotations

import logging
import sys
import warnings

# (message regex, why): warnings a run would print on every start, for nothing the user can do.
QUIET = (
    # The run directory holds config.yaml before the loggers start.
    (r".*exists and is not empty.*", "lightning"),
    # In-memory tensors need no loader workers.
    (r".*does not have many workers.*", "lightning"),
    (r".*smaller than the logging interval.*", "lightning"),
    (r".*isinstance\(treespec, LeafSpec\).*", "lightning"),
    # On several devices the epoch's metrics are torchmetrics' own, synced when computed.
    (r".*when logging on epoch level in distributed setting.*", "lightning"),
    # The stem's input (the images) needs no gradient; Opacus's hooks are right without it.
    (r"Full backward hook is firing", "opacus"),
)
PACKAGE_LOGGER = "pneumonia"


class _Console(logging.Handler):
    """Writes each record's message to the sys.stdout of the moment (a redirected or captured
    stdout included), as the commands' print did."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:
            self.handleError(record)


def startup() -> None:
    """Apply the process-wide settings above (again: no effect)."""
    # Imported here, not at the top: `--help` wraps in the same error handler and must not
    # wait for torch.
    import matplotlib
    import torch

    torch.set_flush_denormal(True)
    matplotlib.use("Agg")
    for message, _owner in QUIET:
        warnings.filterwarnings("ignore", message=message)
    console()


def console(level: int = logging.INFO) -> logging.Logger:
    """Print the package's records at `level` and above on stdout, once."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    if not any(isinstance(h, _Console) for h in logger.handlers):
        logger.addHandler(_Console())
    logger.setLevel(level)
    # The console is the only place they go: a root handler (Opacus's basicConfig, a
    # notebook's) would print each line twice.
    logger.propagate = False
    return logger
