"""Federated training: clients with their own Trainers, a server that only sees state dicts.

config     FederatedConfig (the `federated.*` group)
cohort     the clients as the server sees them; LocalCohort simulates them here
client     one hospital: its data, LightningModule and Lightning Trainer, kept across rounds
aggregate  weighted averages of state dicts and the checks an update must pass
strategies FedAvg, FedProx, FedBN, FedAvgM, FedAdam: how updates become the global model
server     client sampling and aggregation; holds no dataset
state      the atomic after-every-round checkpoint that `--resume` continues from
loop       the rounds: calls the stages above, logs, evaluates, writes the run directory
"""
