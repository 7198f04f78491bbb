"""Failures are loud: each reason logged in full once, and a run in which no client can finish
stops with that reason instead of completing without learning."""

from __future__ import annotations

import itertools
import logging
import textwrap
import time
from types import SimpleNamespace

import pytest
from flwr.app import Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from splitfed import SplitFedRunError
from splitfed.strategies.failures import NO_REPLY, FailureLog
from splitfed.strategies.splitfed import send_and_receive
from tests.conftest import assert_none_left, marked_environment


@pytest.fixture(autouse=True)
def task_identity():
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def replies(outcomes: dict[int, str | None]) -> list[Message]:
    """Replies of the nodes in ``outcomes``: an error with that reason, or a success (None)."""
    out = []
    for node_id, reason in outcomes.items():
        sent = Message(RecordDict(), dst_node_id=node_id, message_type="train")
        content = RecordDict({"metrics": MetricRecord({"num-examples": 1})})
        out.append(
            Message(content, reply_to=sent)
            if reason is None
            else Message(Error(code=2, reason=reason), reply_to=sent)
        )
    return out


@pytest.fixture
def warnings(caplog):
    caplog.set_level(logging.WARNING, logger="flwr")
    return caplog


def test_each_reason_is_logged_in_full_once_with_its_nodes_and_count(warnings):
    failures = FailureLog()
    outcome = {1: "ValueError: width 3 != 4", 2: "ValueError: width 3 != 4", 3: None}
    completed = failures.record(1, "train", [1, 2, 3, 4], replies(outcome))
    assert [m.metadata.src_node_id for m in completed] == [3]
    lines = [r.getMessage() for r in warnings.records]
    assert len(lines) == 2  # one line per distinct reason, the missing node's included
    assert "2 of 4 selected node(s) failed" in lines[0] and "width 3 != 4" in lines[0]
    assert "[nodes 1, 2]" in lines[0] and "failure #1" in lines[0]
    assert NO_REPLY in lines[1] and "[nodes 4]" in lines[1]
    warnings.clear()
    failures.record(2, "train", [1, 2], replies({1: "ValueError: width 3 != 4", 2: None}))
    (line,) = [r.getMessage() for r in warnings.records]
    assert "failed again with failure #1" in line and "width" not in line


def test_the_run_stops_after_rounds_in_a_row_in_which_no_client_finished():
    failures = FailureLog()
    for server_round in (1, 2):
        failures.record(server_round, "train", [1, 2], replies({1: "boom", 2: "boom"}))
        failures.check(server_round, 3)
    # A round in which one client finished starts the count again.
    failures.record(3, "train", [1, 2], replies({1: "boom", 2: None}))
    failures.check(3, 3)
    for server_round in (4, 5, 6):
        failures.record(server_round, "train", [1, 2], replies({1: "boom", 2: "boom"}))
        if server_round < 6:
            failures.check(server_round, 3)
    with pytest.raises(SplitFedRunError, match=r"3 rounds in a row \(up to round 6\).*boom \(2"):
        failures.check(6, 3)


def test_failed_evaluations_are_logged_but_do_not_stop_the_run():
    failures = FailureLog()
    for server_round in (1, 2, 3):
        failures.record(server_round, "train", [1], replies({1: None}))
        failures.record(server_round, "evaluate", [1], replies({1: "no @app.evaluate()"}))
        failures.check(server_round, 1)


BROKEN_APP = '''
"""A user's app whose clients build a client half of the wrong width."""
import torch
from flwr.app import ArrayRecord, Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import splitfed

def cut(width):
    model = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 3))
    return splitfed.split_model(model, cut=2, sample_input=torch.zeros(2, 8))

server = ServerApp()
client = ClientApp()

@server.main()
def main(grid: Grid, context: Context) -> None:
    split = cut(16)
    strategy = splitfed.SplitFed(split=split, insecure=True, max_failed_rounds=2,
                                 aggregator=FedAvg(fraction_evaluate=0.0))
    strategy.start(grid=grid, initial_arrays=ArrayRecord(split.client_state_dict()), num_rounds=5)

@client.train()
def train(msg, context):
    data = DataLoader(TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,))), batch_size=8)
    return splitfed.train_client_half(msg, context, split=cut(12), train_loader=data,
                                      optimizer=splitfed.OptimizerConfig())
'''

BROKEN_PYPROJECT = """
[project]
name = "broken-app"
version = "1.0.0"

[tool.flwr.app]
publisher = "someone"

[tool.flwr.app.components]
serverapp = "broken_app:server"
clientapp = "broken_app:client"
"""


@pytest.mark.slow
def test_a_run_whose_clients_all_fail_stops_with_the_reason_and_fails(tmp_path):
    from simulation.launch.simulation_engine import run_app

    app = tmp_path / "broken_app_dir"
    app.mkdir()
    (app / "broken_app.py").write_text(textwrap.dedent(BROKEN_APP))
    (app / "pyproject.toml").write_text(BROKEN_PYPROJECT)
    with marked_environment() as marker:
        result = run_app(
            app_dir=app,
            num_supernodes=4,
            clients_at_once=2,
            output_dir=tmp_path / "out",
            echo=False,
            timeout=600,
        )
    assert_none_left(marker, "the failing run")
    # Flower's own status says the run failed, with the reason.
    assert result.status == "finished:failed", result.failure_report()
    assert "no client finished its training in 2 rounds in a row" in result.details
    assert "the state does not fit this split's client side: 0.weight (16, 8) into (12, 8)" in (
        result.details
    )
    log = result.log
    assert log.count("(failure #1)") == 1 and log.count("failed again with failure #1") == 1
    assert "[ROUND 3/5]" not in log
    # Each of the two ClientApp processes shows the traceback once, the ServerApp's stop once;
    # every other failure is one line.
    assert log.count("Traceback (most recent call last)") <= 3, log[-3000:]
    assert log.count("failed again: CutError") >= 4
    assert len(log.splitlines()) < 200, len(log.splitlines())


class _ScriptedGrid:
    """Replies become visible at set times after the push (a stand-in for a SuperLink)."""

    def __init__(self, arrival_seconds: list[float]) -> None:
        self.arrival_seconds = arrival_seconds
        self.pull_times: list[float] = []

    def push_messages(self, messages):
        self.start = time.monotonic()
        self.ids = [str(i) for i, _ in enumerate(messages)]
        return self.ids

    def pull_messages(self, pending):
        now = time.monotonic() - self.start
        self.pull_times.append(now)
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
            for i, at in zip(self.ids, self.arrival_seconds, strict=True)
            if i in pending and at <= now
        ]


def test_replies_are_pulled_soon_after_they_arrive_and_the_pause_is_bounded():
    grid = _ScriptedGrid([0.5, 0.52, 0.8])
    replies = send_and_receive(grid, [object()] * 3, timeout=10)
    assert len(replies) == 3
    # The last reply is seen within the longest pause (0.1 s) of its arrival, not a fixed 3 s.
    assert grid.pull_times[-1] < 0.8 + 0.1 + 0.05
    gaps = [b - a for a, b in itertools.pairwise(grid.pull_times)]
    assert max(gaps) < 0.1 + 0.05
    # After a pull that brought a reply the pause starts again from 5 ms.
    first_hit = next(i for i, t in enumerate(grid.pull_times) if t >= 0.5)
    assert gaps[first_hit] < 0.05


def test_pulling_stops_at_the_timeout_with_the_replies_so_far():
    grid = _ScriptedGrid([0.0, 60.0])
    started = time.monotonic()
    replies = send_and_receive(grid, [object()] * 2, timeout=0.3)
    assert len(replies) == 1
    assert time.monotonic() - started < 0.3 + 0.15
