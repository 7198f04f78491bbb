"""The client side of the benchmark: a client process, and a ClientApp that takes one Flower
message per batch. Kept apart from :mod:`simulation.benchmark` so that client processes import
only this."""

from __future__ import annotations

import time
from multiprocessing.connection import Connection

import torch
from torch import nn

from splitfed import GrpcDataPlane, OptimizerConfig, run_local_epochs

from .models import WORKLOADS, batches, synthetic_partition

__all__ = ["OPTIMIZER", "client_process", "per_message_client_app", "unsplit_seconds"]

OPTIMIZER = OptimizerConfig(torch.optim.SGD, lr=0.01, momentum=0.9)


def client_process(
    conn: Connection, workload_name: str, client: int, samples: int, quick: bool
) -> None:
    """One client: waits for a round's ticket, trains its client half through the split server,
    sends the client half back; on ``"unsplit"``, times one pass of the unsplit model over the
    same data in this process, for the same client's baseline. Ends on ``None``."""
    torch.set_num_threads(1)
    workload = WORKLOADS[workload_name]
    split = workload.split()
    client_half = split.client_half
    inputs, labels = synthetic_partition(workload, client=client, samples=samples)
    data = batches(inputs, labels, workload.batch_size)
    conn.send("ready")
    while (ticket := conn.recv()) is not None:
        if ticket == "unsplit":
            conn.send(unsplit_seconds(workload.build(), data))
            continue
        address, node_id, server_round, token, state, compression = ticket
        client_half.load_state_dict(state)
        optimizer = OPTIMIZER.build(client_half.parameters())
        with GrpcDataPlane(
            address=address,
            node_id=node_id,
            server_round=server_round,
            token=token,
            compression=compression,
        ) as plane:
            stats = run_local_epochs(
                split=split, data_plane=plane, train_loader=data, optimizer=optimizer
            )
        conn.send((client_half.state_dict(), stats.num_examples, stats.steps, stats.seconds))


def unsplit_seconds(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Seconds to train ``model`` one pass over ``data`` with this process's torch threads."""
    optimizer = OPTIMIZER.build(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    started = time.perf_counter()
    for inputs, labels in data:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(inputs), labels).backward()
        optimizer.step()
    return time.perf_counter() - started


_PENDING: dict[int, tuple[torch.Tensor, torch.optim.Optimizer, nn.Module, int]] = {}
"""Per node, in the ClientApp's process: the activations whose gradient is on its way."""


def per_message_client_app(workload_name: str):
    from flwr.app import Array, ArrayRecord, Message, RecordDict  # noqa: PLC0415
    from flwr.clientapp import ClientApp  # noqa: PLC0415

    app = ClientApp()

    @app.train()
    def step(msg: Message, context) -> Message:  # noqa: ANN001
        torch.set_num_threads(1)
        workload = WORKLOADS[workload_name]
        node = context.node_id
        if node not in _PENDING:
            client_half = workload.split().client_half
            inputs, labels = synthetic_partition(workload, client=0, samples=4096)
            _PENDING[node] = (None, OPTIMIZER.build(client_half.parameters()), client_half, 0)
            _PENDING[f"data{node}"] = batches(inputs, labels, workload.batch_size)
        activations, optimizer, client_half, index = _PENDING[node]
        record = msg.content.array_records["gradient"]
        if activations is not None and "gradient" in record:
            optimizer.zero_grad(set_to_none=True)
            activations.backward(torch.from_numpy(record["gradient"].numpy()))
            optimizer.step()
        data = _PENDING[f"data{node}"]
        inputs, labels = data[index % len(data)]
        activations = client_half(inputs)
        _PENDING[node] = (activations, optimizer, client_half, index + 1)
        reply = ArrayRecord(
            {
                "activations": Array(activations.detach().numpy()),
                "labels": Array(labels.numpy()),
            }
        )
        return Message(RecordDict({"batch": reply}), reply_to=msg)

    return app
