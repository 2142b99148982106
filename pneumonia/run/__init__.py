"""The run layer: one training job, from a parsed config to a complete run directory.

job          run_job: preflight, data, recipe, run directory, training, finalize, summary
inputs       RunInputs: what both kinds of training start from
centralized  train_centralized: one Lightning Trainer over all training images
federated    train_federated: the rounds (cohort of clients, server, strategy)
finalize     the reported model's threshold, metrics with intervals, predictions, summary
monitor      a federated run's rounds.csv rows, TensorBoard curves and line per round
rundir       the run directory's layout and its numbering
progress     the progress hook and how durations read

Centralized and federated training are mirror images: each takes `RunInputs` (the config, the
recipe, the splits, the run directory, a progress hook) and returns a `Trained`.
"""
