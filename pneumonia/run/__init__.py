"""The run layer: one training job, from a parsed config to a complete run directory.

job               run_job: preflight, data, recipe, run directory, training, finalize, summary
inputs            RunInputs, what both kinds of training start from; Trained, what they return
centralized       train_centralized: one Lightning Trainer over all training images
federated         train_federated: the round loop (cohort of clients, server, strategy)
rounds            a federated run's record of its rounds: rounds.csv, checkpoints, round state
averaging         federated.average_rounds: the mean of the last rounds' global models
federated_report  the partition and sites a federation starts with; its summary records
monitor           a federated run's rounds.csv rows, TensorBoard curves and line per round
selection         how best.ckpt is chosen, in words: one rule for epochs and rounds
stopping          early stopping by epoch (Lightning) and by round (the same rule)
finalize          the reported model's threshold, then its scores, pictures, card, predictions
scores            its figures with intervals on each evaluation set, and predictions.csv's rows
panels            its verdict/* TensorBoard scalars and figures, Grad-CAM panels, cases.png
card              its model card (inside best.ckpt)
console           the summary's lines on the console
sites             a federation judged site by site: held-out site, cross-site matrix
resumable         what makes a centralized run resume exactly
rundir            the run directory: its layout, every path in it, its numbering and lock
config            the fit command's options
progress          the progress hook and how durations read

Centralized and federated training are mirror images: each takes `RunInputs` (the config, the
recipe, the splits, the run directory, a progress hook) and returns a `Trained`. Library code
here never prints: it logs (`logging.getLogger(__name__)`); the commands' console
(pneumonia.core.startup) prints the lines.
"""
