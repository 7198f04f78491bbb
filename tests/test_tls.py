"""The data plane over TLS: clients verify the split server with the CA from their ticket."""

from __future__ import annotations

import copy
import logging

import pytest

from simulation.launch.certificates import make_certificates
from splitfed import (
    GrpcDataPlane,
    SplitServer,
    SplitServerError,
    TLSCredentials,
    TLSError,
    make_trainer,
    run_local_epochs,
)
from tests.conftest import SGD_MOMENTUM, digits_batches, small_split

NODE = 3


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_server(certificates):
    split = small_split()
    server = SplitServer(
        trainer=make_trainer(
            "v1", server_half=copy.deepcopy(split.server_half), optimizer=SGD_MOMENTUM
        ),
        activation_shape=split.activation_shape,
        tls=TLSCredentials.from_files(
            certfile=certificates.certfile,
            keyfile=certificates.keyfile,
            ca_certfile=certificates.ca_certfile,
        ),
    )
    with server:
        yield server, server.open_round(1, [NODE]), split


def train_two_steps(server, token, split, **plane_options):
    client = split.client_copy()
    with GrpcDataPlane(
        address=server.address, node_id=NODE, server_round=1, token=token, **plane_options
    ) as plane:
        return run_local_epochs(
            split=client,
            data_plane=plane,
            train_loader=digits_batches(0, 32, batch_size=16),
            optimizer=SGD_MOMENTUM.build(client.client_parameters()),
            local_epochs=1,
        )


def test_a_client_with_the_ca_trains_over_tls(tls_server, certificates):
    server, tokens, split = tls_server
    stats = train_two_steps(
        server, tokens[NODE], split, root_certificates=certificates.ca_certfile.read_bytes()
    )
    assert stats.steps == 2 and stats.num_examples == 32
    assert server.close_round().batches == 2


def test_a_plaintext_client_cannot_talk_to_a_tls_server(tls_server):
    server, tokens, split = tls_server
    with pytest.raises(SplitServerError, match="could not reach the split server"):
        train_two_steps(server, tokens[NODE], split, connect_timeout=2.0)
    assert server.close_round().batches == 0


def test_a_server_certificate_from_another_ca_is_refused(tls_server, tmp_path):
    server, tokens, split = tls_server
    other_ca = make_certificates(tmp_path / "other").ca_certfile.read_bytes()
    with pytest.raises(SplitServerError, match="signed by the CA"):
        train_two_steps(server, tokens[NODE], split, root_certificates=other_ca, connect_timeout=2)
    assert server.close_round().batches == 0


def test_plaintext_needs_an_explicit_insecure_and_warns(caplog):
    split = small_split()
    trainer = make_trainer("v1", server_half=split.server_half, optimizer=SGD_MOMENTUM)
    with pytest.raises(ValueError, match="insecure=True"):
        SplitServer(trainer=trainer, activation_shape=split.activation_shape)
    server = SplitServer(trainer=trainer, activation_shape=split.activation_shape, insecure=True)
    with caplog.at_level(logging.WARNING, logger="flwr_splitfed"), server:
        pass
    assert any("INSECURE" in record.getMessage() for record in caplog.records)


def test_tls_material_that_is_not_pem_is_refused_with_a_fix(tmp_path, certificates):
    with pytest.raises(TLSError, match="private_key is not a PEM private key"):
        TLSCredentials(
            certificate_chain=certificates.certfile.read_bytes(),
            private_key=b"secret",
            root_certificates=certificates.ca_certfile.read_bytes(),
        )
    with pytest.raises(TLSError, match="cannot read the split server's keyfile"):
        TLSCredentials.from_files(
            certfile=certificates.certfile,
            keyfile=tmp_path / "missing.key",
            ca_certfile=certificates.ca_certfile,
        )
    credentials = TLSCredentials.from_files(
        certfile=certificates.certfile,
        keyfile=certificates.keyfile,
        ca_certfile=certificates.ca_certfile,
    )
    assert "PRIVATE" not in repr(credentials)
