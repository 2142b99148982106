"""The Flower layer's pure parts: the wire format, node data, the run config, the launcher's
command lines. No process is started here."""

from __future__ import annotations

import pytest
import torch

from pneumonia.core.errors import UserError
from pneumonia.federated.aggregate import ClientUpdate
from pneumonia.federated.cohort import RoundTask
from pneumonia.flower import node, wire
from pneumonia.flower.cohort import wait_for_nodes
from pneumonia.flower.launch import FLOWER_LOG, node_config_text
from pneumonia.flower.server_app import fit_arguments
from pneumonia.models.factory import ModelConfig, create_model
from pneumonia.training.recipe import Recipe


def bn_state() -> dict:
    model = create_model(ModelConfig(name="se_resnet18", norm="bn", width=16), 32)
    return model.state_dict()


def test_state_dict_crosses_as_one_array_per_dtype_and_comes_back_exactly():
    state = bn_state()
    record, layout = wire.to_arrays(state)
    assert sorted(record) == ["float32", "int64"]  # not one object per tensor
    back = wire.from_arrays(record, layout)
    assert list(back) == list(state)
    for key, tensor in state.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


def test_train_request_and_reply_round_trip():
    state = bn_state()
    task = RoundTask(state, round_index=2, local_epochs=3, lr=0.0015)
    recipe = Recipe(model={"name": "se_resnet18"}, optim={"lr": 0.002}, image_size=32, mean=0.5)
    request = wire.read_train_request(
        wire.train_request(wire.TrainRequest(task, 1, "seed: 4\n", recipe, timings=False))
    )
    got, client, config = request.task, request.client, request.config_yaml
    assert (got.round_index, got.local_epochs, got.lr, client) == (2, 3, 0.0015, 1)
    assert config == "seed: 4\n" and request.recipe == recipe and not request.timings
    assert all(torch.equal(got.global_state[k], v) for k, v in state.items())
    update = ClientUpdate(client=1, state=state, n=46, train_loss=0.75, train_accuracy=0.5)
    back, timings = wire.read_train_reply(wire.train_reply(update, {"ready": 12.5}), 1)
    assert (back.client, back.n, back.train_loss, back.train_accuracy) == (1, 46, 0.75, 0.5)
    assert timings == {"ready": 12.5}
    assert wire.read_train_reply(wire.train_reply(update), 1)[1] == {}  # timed only if asked


def test_query_reply_carries_counts_and_moments_only():
    info = wire.NodeInfo("000001", (46, 0.25, 0.0725), "ab" * 32, {"images": 46, "NORMAL": 17})
    content = wire.query_reply(info)
    assert wire.read_query_reply(content) == info
    assert set(content) == {"node", "moments"}  # no ArrayRecord: no image leaves


def parse(*extra: str):
    from pneumonia.run.config import parse_fit_config

    argv = ["--config", "configs/default.yaml", "--federated.clients", "2", *extra]
    return parse_fit_config(argv)[0]


def test_a_node_with_a_partition_id_holds_the_simulated_clients_images():
    from pneumonia.data.partition import partition
    from pneumonia.data.sources import load_splits

    cfg = parse("--data.image_size", "32", "--data.synthetic.n_patients", "40")
    images, key = node.node_images(cfg, {"partition-id": 1, "num-partitions": 2})
    train = load_splits(cfg.data, cfg.seed).train
    expected = train.subset(partition(train, "iid", 2, 0.5, cfg.seed)[1])
    assert key == "000001" and images.names == expected.names
    assert torch.equal(images.images, expected.images)


def test_nodes_describe_what_the_simulated_clients_hold():
    """Same moments and the same run fingerprint as LocalCohort: a run resumes over either."""
    from pneumonia.data.sources import load_splits
    from pneumonia.federated.cohort import LocalCohort, combined_digest
    from pneumonia.run.config import trainer_arguments

    cfg = parse("--data.image_size", "32", "--data.synthetic.n_patients", "40")
    infos = [node.describe(cfg, {"partition-id": j}) for j in (0, 1)]
    local = LocalCohort(cfg, load_splits(cfg.data, cfg.seed), trainer_arguments(cfg))
    assert [i.moments for i in infos] == local.moments()
    assert combined_digest([i.digest for i in infos]) == local.fingerprint()
    assert [i.counts for i in infos] == [
        {k: v for k, v in row.items() if k != "client"} for row in local.table
    ]


def test_a_hospital_node_holds_its_whole_folder(kermany_root):
    cfg = parse("--data.image_size", "32")
    info = node.describe(cfg, {"data-root": str(kermany_root), "name": "st-marys"})
    assert info.key == "st-marys"
    assert info.counts == {"images": 27, "patients": 14, "NORMAL": 12, "PNEUMONIA": 15}
    assert info.moments[0] == 27 and 0 < info.moments[1] < 1


@pytest.mark.parametrize(
    "node_config,message",
    [
        ({}, "needs data-root=DIR or partition-id=J"),
        ({"partition-id": 2}, "partition-id=2 num-partitions=2 does not fit"),
        ({"partition-id": 0, "num-partitions": 3}, "num-partitions=3 does not fit the run's"),
    ],
)
def test_node_config_errors_name_the_key(node_config, message):
    with pytest.raises(UserError, match=message):
        node.node_images(parse("--data.image_size", "32"), node_config)


def test_client_state_is_packed_for_the_node_only():
    state = {"local_state": {"w": torch.ones(2)}, "optimizer_state": None, "steps": 7}
    back = node.unpack_state(node.pack_state(state))
    assert back["steps"] == 7 and torch.equal(back["local_state"]["w"], torch.ones(2))


def test_run_config_becomes_the_fit_command_line():
    assert fit_arguments({"resume": "runs/x/version_0", "config": "a.yaml"}) == [
        "--resume",
        "runs/x/version_0",
    ]
    argv = fit_arguments({"config": "/c.yaml", "overrides": "--experiment 'two words' --seed 3"})
    assert argv == ["--config", "/c.yaml", "--experiment", "two words", "--seed", "3"]
    assert fit_arguments({"config": "", "overrides": ""}) == []


def test_launcher_quotes_node_config_and_filters_flower_logs():
    text = node_config_text({"partition-id": 0, "data-root": "/data/st marys"})
    assert text == 'partition-id=0 data-root="/data/st marys"'
    assert FLOWER_LOG.match("\x1b[92mINFO \x1b[0m:      Starting logstream")
    assert not FLOWER_LOG.match("round 1/2  clients 0,1  19s  train loss 0.744")
    assert not FLOWER_LOG.match("\x1b[91mERROR \x1b[0m:     ServerApp raised")


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def test_waiting_for_nodes_ends_in_one_line_naming_what_to_do():
    assert wait_for_nodes(FakeGrid([7, 3]), 2, 0) == [3, 7]
    with pytest.raises(UserError) as err:
        wait_for_nodes(FakeGrid([5]), 3, 0.1)
    assert str(err.value) == (
        "only 1 of 3 SuperNodes connected within 0 s: start the others (flower-supernode ...) "
        "or lower federated.clients"
    )
    with pytest.raises(UserError, match="3 SuperNodes are connected but federated.clients is 2"):
        wait_for_nodes(FakeGrid([1, 2, 3]), 2, 0)
