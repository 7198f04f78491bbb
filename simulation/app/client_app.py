"""The ClientApp: trains and evaluates its client half on its own data, through the split
server."""

from __future__ import annotations

import logging

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from splitfed import DataPlaneTicket, evaluate_client_half, train_client_half
from splitfed.privacy import ClientSecret

from . import fedavg
from .config import AppConfig
from .task import (
    batch_spec,
    federated_data,
    model_split,
    test_loader,
    train_loader,
    whole_model,
)

app = ClientApp()

logger = logging.getLogger("flwr_splitfed")
_warned_from_seed: list[bool] = []


def client_secret(config: AppConfig, context: Context, *, partition_id: int) -> ClientSecret:
    """This client's randomness (batch order, noise): its own secret, or, with
    ``client-randomness = "from-seed"``, one the run config's seed and the partition give."""
    if config.client_randomness == "from-seed":
        if not _warned_from_seed:
            _warned_from_seed.append(True)
            logger.warning(
                "PRIVACY: client-randomness='from-seed': every client's batch order and noise "
                "follow from the run config, which the server knows; it can link the releases "
                "of each example and subtract the noise. Use it for experiments only"
            )
        return ClientSecret.from_value(f"from-seed:{config.seed}:{partition_id}")
    return ClientSecret.from_context(context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: every batch of the local epochs goes through the split server (in a
    local-loss run, every ``send-every``-th one, while the client trains on the auxiliary head
    that ``model_split`` adds and the ticket asks for)."""
    config = AppConfig.from_run_config(context.run_config)
    partition_id = int(context.node_config["partition-id"])
    data = federated_data(config, num_partitions=int(context.node_config["num-partitions"]))
    secret = client_secret(config, context, partition_id=partition_id)
    # The batch order of "from-seed" is round_shuffle_seed's, which the tests' references use.
    order_secret = None if config.client_randomness == "from-seed" else secret
    if config.variant == fedavg.FEDAVG:
        server_round = int(msg.content["config"]["server-round"])
        return fedavg.train_reply(
            msg,
            whole_model(config, data),
            loader=train_loader(
                config,
                data,
                partition_id=partition_id,
                server_round=server_round,
                secret=order_secret,
            ),
            batch=batch_spec(data),
            optimizer=config.client_optimizer,
            local_epochs=config.local_epochs,
        )
    privacy = config.privacy()
    return train_client_half(
        msg,
        context,
        # Built on the meta device: the client holds only its own parts, never the server half.
        split=model_split(config, data, client_side=True),
        train_loader=train_loader(
            config,
            data,
            partition_id=partition_id,
            server_round=DataPlaneTicket.from_message(msg).server_round,
            secret=order_secret,
        ),
        batch=batch_spec(data),
        optimizer=config.client_optimizer,
        local_epochs=config.local_epochs,
        reset_optimizer=config.reset_client_optimizer,
        privacy=privacy if privacy.enabled else None,
        secret=secret,
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation: the merged model on this client's share of the held-out data."""
    config = AppConfig.from_run_config(context.run_config)
    data = federated_data(config, num_partitions=int(context.node_config["num-partitions"]))
    loader = test_loader(config, data, partition_id=int(context.node_config["partition-id"]))
    if config.variant == fedavg.FEDAVG:
        return fedavg.evaluate_reply(
            msg, whole_model(config, data), loader=loader, batch=batch_spec(data)
        )
    return evaluate_client_half(
        msg,
        context,
        split=model_split(config, data, client_side=True),
        loader=loader,
        batch=batch_spec(data),
    )
