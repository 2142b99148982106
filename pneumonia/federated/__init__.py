"""Federated training's parts: clients with their own Trainers, a server that only sees state
dicts. The rounds themselves are `pneumonia.run.federated`.

options    FederatedConfig (the `federated.*` group) and its checks
client     one hospital: its data, LightningModule and Lightning Trainer, kept across rounds
cohort     the clients as the server sees them; LocalCohort simulates them here
aggregate  weighted averages of state dicts and the checks an update must pass
strategies FedAvg, FedProx, FedBN, FedAvgM, FedAdam by name: how updates become the global model
server     client sampling and aggregation; holds no dataset
state      the atomic after-every-round checkpoint that `--resume` continues from
"""
