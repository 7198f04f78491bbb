"""The ClientApp: trains and evaluates its client half on its own data, through the split
server."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from splitfed import DataPlaneTicket, SplitModel, evaluate_client_half, train_client_half

from .config import AppConfig
from .task import digits_split, partition_loader, round_shuffle_seed

app = ClientApp()


def _split(config: AppConfig) -> SplitModel:
    # Built on the meta device: the client holds only its own parts, never the server half.
    return digits_split(
        cut=config.cut,
        server_cut=config.server_cut if config.label_private else None,
        batch_norm=config.batch_norm,
        client_side=True,
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: every batch of the local epochs goes through the split server."""
    config = AppConfig.from_run_config(context.run_config)
    partition_id = int(context.node_config["partition-id"])
    server_round = DataPlaneTicket.from_message(msg).server_round
    train_loader = partition_loader(
        partition_id=partition_id,
        num_partitions=int(context.node_config["num-partitions"]),
        batch_size=config.batch_size,
        partitioner=config.partitioner,
        alpha=config.dirichlet_alpha,
        seed=config.seed,
        shuffle_seed=round_shuffle_seed(config.seed, server_round, partition_id),
        test_fraction=config.test_fraction,
    )
    privacy = config.privacy()
    return train_client_half(
        msg,
        context,
        split=_split(config),
        train_loader=train_loader,
        optimizer=config.client_optimizer,
        local_epochs=config.local_epochs,
        reset_optimizer=config.reset_client_optimizer,
        privacy=privacy if privacy.enabled else None,
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation: the merged model on this client's share of the held-out data."""
    config = AppConfig.from_run_config(context.run_config)
    loader = partition_loader(
        partition_id=int(context.node_config["partition-id"]),
        num_partitions=int(context.node_config["num-partitions"]),
        batch_size=config.batch_size,
        partitioner=config.partitioner,
        alpha=config.dirichlet_alpha,
        seed=config.seed,
        test_fraction=config.test_fraction,
        subset="test",
    )
    return evaluate_client_half(msg, context, split=_split(config), loader=loader)
