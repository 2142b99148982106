"""Federated training across hospitals on Flower (`pip install 'pneumonia[flower]'`).

The package's own round loop, strategies, client training and run directory, with Flower's
SuperLink and SuperNodes carrying state dicts and counts between machines:

wire        what crosses the network (and nothing else)
node        a SuperNode's images, its Client, the client state it keeps between rounds
client_app  the ClientApp: query (counts, moments) and train (one round)
cohort      FlowerCohort: the SuperNodes as the round loop's clients
secure      one round of Flower's SecAgg+ (federated.secure_aggregation): the server learns
            only the weighted average of the round's updates
server_app  the ServerApp: the run layer's job with a FlowerCohort, writing the usual run directory
engine      federated.engine: what `fit` refuses for engine simulation, before Flower loads
simulation  engine simulation: the job with its clients in Ray workers of Flower's simulation
            runtime (`pip install 'pneumonia[simulation]'`), the run as the in-process loop's
tls         throw-away CA and server certificate for demos
launch      a SuperLink and SuperNodes as local processes (demo, tests, bench)
demo        `make flower-demo`
app/        the Flower App (FAB) `flwr run` submits: names the two apps, holds no code
"""
