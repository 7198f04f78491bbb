"""The ClientApp: trains its client half on its own digits, through the split server."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from splitfed import train_client_half

from .config import AppConfig
from .task import (
    digits_label_private_split,
    digits_split,
    partition_loader,
    round_shuffle_seed,
)

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: every batch of the local epochs goes through the split server."""
    config = AppConfig.from_run_config(context.run_config)
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    server_round = int(msg.content.config_records["splitfed"]["server-round"])
    train_loader = partition_loader(
        partition_id=partition_id,
        num_partitions=num_partitions,
        batch_size=config.batch_size,
        partitioner=config.partitioner,
        alpha=config.dirichlet_alpha,
        seed=config.seed,
        shuffle_seed=round_shuffle_seed(config.seed, server_round, partition_id),
        test_fraction=config.test_fraction,
    )
    if config.label_private:
        split = digits_label_private_split(
            cut=config.cut, server_cut=config.server_cut, batch_norm=config.batch_norm
        )
        client_half, client_head = split.client_half, split.client_head
    else:
        client_half = digits_split(cut=config.cut, batch_norm=config.batch_norm).client_half
        client_head = None
    privacy = config.privacy()
    return train_client_half(
        msg,
        context,
        client_half=client_half,
        client_head=client_head,
        privacy=privacy if privacy.enabled else None,
        train_loader=train_loader,
        optimizer=config.client_optimizer,
        local_epochs=config.local_epochs,
        reset_optimizer=config.reset_client_optimizer,
    )
