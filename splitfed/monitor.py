"""A live estimate, round by round, of what the split server could reconstruct of clients' inputs.

The process that runs the split server also aggregates: after each round it holds the merged
client half, knows the clients' defense (the run config states it) and may hold inputs of its
own from the same domain (public or auxiliary data). :class:`LeakageMonitor` does with these
what such a server could do: it trains a decoder from the client half's released activations
(with fresh draws of the configured clipping and noise) back to the inputs, on part of the
auxiliary inputs, and attacks the rest, which stand in for the clients' private examples:

- **re-identification**: the share of held-out examples whose reconstruction is nearer their
  own original than any other held-out example (of the same label, when labels are given: the
  plain split sends them); chance is one over the candidates;
- **explained variance** of the held-out inputs by their reconstructions (1 is exact, 0 is no
  better than the mean input).

In the label-private split the labels stay on the clients, and the process also holds the
server half (and, with ``client_heads="shared"``, the merged client head). Given the auxiliary
inputs' labels, the monitor then also attacks the held-out examples' labels:

- **head-forward**: the share labelled by running the head this process holds on the server
  half's outputs (shared heads only);
- **surrogate head**: the share labelled by a linear head trained on the other auxiliary
  examples' server-half outputs, as a server with labelled data of the task can;
- **cosine AUC** of the gradients at the server half's output (what clients send up, with the
  configured label noise), computed through the held head or, with local heads, the surrogate:
  how well the cosine of two gradients of one client-sized batch tells whether their examples
  share a label (0.5 is chance).

The decoder keeps training from round to round, as an attacker's would. The estimate is made on
the server's own data with a small decoder and few steps, so it bounds nothing: an offline
attack with more data and steps gets more (``python -m simulation.audit``). It tracks how leakage
moves while the run trains, and a threshold turns it into a warning or a stop. It costs the
split server's process ``steps_per_round`` decoder steps a measured round, timed in
``leakage-monitor-seconds``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from logging import INFO, WARNING

import torch
from flwr.supercore import log
from torch import nn

from ._state import modes_kept, seeded
from .privacy import PrivacyConfig

__all__ = ["LEAKAGE_ACTIONS", "LeakageEstimate", "LeakageMonitor", "cosine_attack_auc", "roc_auc"]

LEAKAGE_ACTIONS = ("warn", "stop")
"""What :class:`LeakageMonitor` does when re-identification is above its threshold."""

_MIN_HELD_OUT = 4


@dataclass(frozen=True)
class LeakageEstimate:
    """One round's leakage estimate (see :class:`LeakageMonitor`).

    Attributes
    ----------
    server_round : int
        The round after which the client half was attacked.
    reidentification : float
        Share of held-out auxiliary examples re-identified from one release each.
    chance : float
        Re-identification by guessing: the mean of one over each example's candidates.
    explained_variance : float
        ``1 - sum((reconstruction - input)^2) / sum((input - mean input)^2)`` on the held-out
        examples.
    seconds : float
        Wall time of this estimate (the forward passes, the decoder's and the surrogate head's
        steps).
    exceeded : bool
        Whether ``reidentification`` is above the monitor's ``threshold``, or the labels
        recovered above its ``label_threshold``.
    label_head_forward : float | None (default: None)
        Share of held-out labels the head this process holds recovers (label-private split with
        shared heads).
    label_surrogate : float | None (default: None)
        Share of held-out labels recovered by a head trained on the other auxiliary examples
        (label-private split).
    label_chance : float | None (default: None)
        Labels recovered by guessing the most common held-out label.
    label_cosine_auc : float | None (default: None)
        ROC AUC of the cosine attack on the gradients at the server half's output (0.5 is
        chance).
    """

    server_round: int
    reidentification: float
    chance: float
    explained_variance: float
    seconds: float
    exceeded: bool
    label_head_forward: float | None = None
    label_surrogate: float | None = None
    label_chance: float | None = None
    label_cosine_auc: float | None = None

    @property
    def labels_recovered(self) -> float | None:
        """The most labels any of the label attacks recovered, ``None`` where none ran."""
        shares = [s for s in (self.label_head_forward, self.label_surrogate) if s is not None]
        return max(shares) if shares else None

    def metrics(self) -> dict[str, float]:
        """The estimate as a round's metrics (``leakage-`` keys; label keys where measured)."""
        metrics = {
            "leakage-reidentification": self.reidentification,
            "leakage-reidentification-chance": self.chance,
            "leakage-explained-variance": self.explained_variance,
            "leakage-monitor-seconds": self.seconds,
        }
        for key, value in (
            ("leakage-label-head-forward", self.label_head_forward),
            ("leakage-label-surrogate", self.label_surrogate),
            ("leakage-label-chance", self.label_chance),
            ("leakage-label-cosine-auc", self.label_cosine_auc),
        ):
            if value is not None:
                metrics[key] = value
        return metrics


class LeakageMonitor:
    """Estimate after each round how much the merged client half's activations reveal of the
    inputs (and, in the label-private split, what the process recovers of the labels), as the
    split server's own process could; warn or stop above a threshold.

    Pass it to :class:`~splitfed.SplitFed` (``leakage_monitor=``); the strategy calls
    :meth:`measure` after each merged round and adds the estimate to the round's metrics.

    Parameters
    ----------
    auxiliary_inputs : torch.Tensor
        Inputs the server holds from the clients' domain (public or its own data, never the
        clients'), batch first, as the client half takes them. A share of them
        (``holdout_fraction``) is attacked, the rest trains the decoder.
    auxiliary_labels : torch.Tensor | None (default: None)
        Their class ids. In a split that sends labels (the plain split), re-identification
        picks among held-out examples of the same class, as an attacker who receives them can;
        in the label-private split (:meth:`bind` with a ``server_half``) the labels are what the
        label attacks try to recover, and re-identification does not use them.
    privacy : PrivacyConfig | None (default: None)
        The clients' defense; the decoder trains on fresh draws of its clipping and noise, and
        each held-out example is attacked from one draw (one release).
    threshold : float | None (default: None)
        Re-identification above this share is reported as a ``PRIVACY`` warning, and stops the
        run with ``action="stop"``; ``None`` only measures.
    label_threshold : float | None (default: None)
        The same for the share of labels recovered (the more of head-forward and surrogate
        head) in the label-private split; needs ``auxiliary_labels``. The surrogate head is
        about as accurate as the model on the auxiliary data: a server that holds labelled data
        of the task recovers labels whatever the split (docs/privacy.md).
    action : str (default: "warn")
        ``"warn"`` or ``"stop"`` (the strategy ends the run after the round that crossed).
    every : int (default: 1)
        Measure the merged rounds whose number is a multiple of this, and the last round.
    steps_per_round : int (default: 200)
        Decoder steps per measured round, on batches of ``batch_size`` auxiliary examples.
    batch_size : int (default: 64)
        Decoder batch size.
    client_batch_size : int (default: 32)
        The clients' batch size: the client half runs on the auxiliary inputs in batches of
        about this size, so that batch statistics (BatchNorm) are those of a client's release.
    max_examples : int (default: 1024)
        The most auxiliary inputs kept (a random subset beyond, logged): the activations of all
        of them are held while a round is measured.
    learning_rate : float (default: 1e-3)
        The decoder's Adam learning rate.
    holdout_fraction : float (default: 0.25)
        Share of the auxiliary inputs attacked rather than trained on.
    decoder : nn.Module | None (default: None)
        Maps a batch of activations to a batch of inputs, on the CPU in float32 (the monitor
        brings the activations there, wherever the client half runs). ``None``: a multilayer
        perceptron (activations flattened, one hidden layer of 512, outputs shaped as the
        inputs).
    seed : int (default: 0)
        Seeds the held-out choice, the decoder's batches and its noise draws.
    """

    def __init__(
        self,
        *,
        auxiliary_inputs: torch.Tensor,
        auxiliary_labels: torch.Tensor | None = None,
        privacy: PrivacyConfig | None = None,
        threshold: float | None = None,
        label_threshold: float | None = None,
        action: str = "warn",
        every: int = 1,
        steps_per_round: int = 200,
        batch_size: int = 64,
        client_batch_size: int = 32,
        max_examples: int = 1024,
        learning_rate: float = 1e-3,
        holdout_fraction: float = 0.25,
        decoder: nn.Module | None = None,
        seed: int = 0,
    ) -> None:
        if (
            not isinstance(auxiliary_inputs, torch.Tensor)
            or not auxiliary_inputs.is_floating_point()
            or auxiliary_inputs.dim() < 2
        ):
            raise TypeError(
                "auxiliary_inputs must be a floating-point tensor of inputs, batch first, as "
                f"the client half takes them; got {_describe(auxiliary_inputs)}. The monitor "
                "feeds the client half one tensor: build the model so that its forward takes one"
            )
        if not torch.isfinite(auxiliary_inputs).all():
            raise ValueError("auxiliary_inputs hold NaN or infinite values; drop those examples")
        if auxiliary_labels is not None and (
            not isinstance(auxiliary_labels, torch.Tensor)
            or auxiliary_labels.dim() != 1
            or auxiliary_labels.is_floating_point()
            or auxiliary_labels.is_complex()
        ):
            raise TypeError(
                "auxiliary_labels must be a 1-D tensor of class ids (one int per input, not "
                f"one-hot); got {_describe(auxiliary_labels)}"
            )
        if auxiliary_labels is not None and len(auxiliary_labels) != len(auxiliary_inputs):
            raise ValueError(
                f"auxiliary_labels has {len(auxiliary_labels)} entries for "
                f"{len(auxiliary_inputs)} auxiliary inputs; give one label per input"
            )
        if not 0 < holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1); got {holdout_fraction}")
        for name, share in (("threshold", threshold), ("label_threshold", label_threshold)):
            if share is not None and not 0 <= share <= 1:
                raise ValueError(f"{name} is a share of examples in [0, 1] or None; got {share}")
        if label_threshold is not None and auxiliary_labels is None:
            raise ValueError(
                "label_threshold needs auxiliary_labels: the label attacks are scored against "
                "them; pass the auxiliary inputs' class ids, or leave label_threshold=None"
            )
        if action not in LEAKAGE_ACTIONS:
            raise ValueError(f"action={action!r} is not known; use 'warn' or 'stop'")
        for name, value in (
            ("every", every),
            ("steps_per_round", steps_per_round),
            ("batch_size", batch_size),
            ("client_batch_size", client_batch_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1; got {value}")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be positive; got {learning_rate}")
        self._generator = torch.Generator().manual_seed(seed)
        kept = min(len(auxiliary_inputs), max_examples)
        held_out = int(round(kept * holdout_fraction))
        if held_out < _MIN_HELD_OUT or kept - held_out < 1:
            raise ValueError(
                f"holdout_fraction={holdout_fraction} of {kept} auxiliary inputs holds out "
                f"{held_out} and trains on {kept - held_out}; at least {_MIN_HELD_OUT} must be "
                "held out and one left to train on: pass more inputs (or raise max_examples)"
            )
        order = torch.randperm(len(auxiliary_inputs), generator=self._generator)[:kept]
        if kept < len(auxiliary_inputs):
            log(
                INFO,
                "[SplitFed] leakage monitor: %d of %d auxiliary inputs kept (max_examples)",
                kept,
                len(auxiliary_inputs),
            )
        self.privacy = privacy or PrivacyConfig()
        self.threshold = threshold
        self.label_threshold = label_threshold
        self.action = action
        self.every = every
        self.steps_per_round = steps_per_round
        self.batch_size = batch_size
        self.client_batch_size = client_batch_size
        self.learning_rate = learning_rate
        self.history: list[LeakageEstimate] = []
        self._seed = seed
        # Kept on the CPU with the decoder: the client half may be anywhere, its activations
        # come back here.
        self._inputs = auxiliary_inputs.detach()[order].float().cpu()
        # int64, as cross_entropy and bincount take class ids.
        self._labels = (
            auxiliary_labels.detach()[order].cpu().long() if auxiliary_labels is not None else None
        )
        self._held_out = torch.arange(held_out)
        self._train = torch.arange(held_out, kept)
        self._decoder = decoder
        self._optimizer: torch.optim.Optimizer | None = None
        self._candidates = self._same_label_mask(labels_sent=True)
        # The label-private split's attacks (bind with a server half).
        self._label_private = False
        self._surrogate: nn.Module | None = None
        self._surrogate_optimizer: torch.optim.Optimizer | None = None

    def stops(self, estimate: LeakageEstimate | None) -> bool:
        """Whether ``estimate`` ends the run: above the threshold with ``action="stop"``."""
        return self.action == "stop" and estimate is not None and estimate.exceeded

    def due(self, server_round: int, num_rounds: int) -> bool:
        """Whether ``server_round``, if merged, is measured (a multiple of ``every``, or the
        last)."""
        return server_round % self.every == 0 or server_round == num_rounds

    def bind(
        self,
        client_half: nn.Module,
        *,
        activation_shape: tuple[int, ...],
        server_half: nn.Module | None = None,
    ) -> None:
        """Check that the client half takes the auxiliary inputs and releases
        ``activation_shape``, and build the default decoder for it.

        Pass the ``server_half`` of a label-private split (one whose client heads compute the
        loss): the labels then stay on the clients, so re-identification does not use them, and
        :meth:`measure` attacks the labels through that server half (given
        ``auxiliary_labels``).
        """
        try:
            activations = self._released(client_half, self._inputs[:2])
        except _NotATensor as err:
            raise ValueError(
                f"the client half turns auxiliary_inputs into {_describe(err.value)}, not a "
                "tensor of activations; the monitor attacks a client half with one output"
            ) from None
        except Exception as err:
            raise ValueError(
                f"the client half cannot run on auxiliary_inputs of shape "
                f"{tuple(self._inputs.shape)} ({type(err).__name__}: {err}); give the inputs the "
                "client half takes, batch first (they are moved to the client half's device)"
            ) from err
        if tuple(activations.shape[1:]) != tuple(activation_shape):
            raise ValueError(
                f"the client half turns auxiliary_inputs into {_describe(activations)}, not the "
                f"split's activations of shape {tuple(activation_shape)}; give the inputs the "
                "clients train on"
            )
        if self._decoder is None:
            # Initialised from the monitor's seed, leaving the process's random state alone:
            # watching a run must not change it.
            with seeded(self._seed, torch.device("cpu")):
                self._decoder = nn.Sequential(
                    nn.Flatten(),
                    nn.Linear(math.prod(activation_shape), 512),
                    nn.ReLU(),
                    nn.Linear(512, math.prod(self._inputs.shape[1:])),
                    nn.Unflatten(1, tuple(self._inputs.shape[1:])),
                )
        self._optimizer = torch.optim.Adam(self._decoder.parameters(), lr=self.learning_rate)
        if server_half is None and self.label_threshold is not None:
            raise ValueError(
                "label_threshold applies to the label-private split (bind with its server_half); "
                "this split sends the labels to the server: leave label_threshold=None"
            )
        self._label_private = server_half is not None
        self._candidates = self._same_label_mask(labels_sent=not self._label_private)
        if server_half is not None:
            self._bind_label_attacks(server_half, activations)

    def _bind_label_attacks(self, server_half: nn.Module, activations: torch.Tensor) -> None:
        try:
            outputs = _eval_outputs(server_half, activations)
        except Exception as err:
            raise ValueError(
                f"the server half cannot run on the client half's activations "
                f"({type(err).__name__}: {err}); bind the server half of the same split"
            ) from err
        if self._labels is None:
            log(
                WARNING,
                "[SplitFed] leakage monitor: label-private split without auxiliary_labels: the "
                "labels' leakage is not estimated; pass the auxiliary inputs' class ids",
            )
            return
        with seeded(self._seed, torch.device("cpu")):
            self._surrogate = nn.Sequential(
                nn.Flatten(), nn.Linear(math.prod(outputs.shape[1:]), int(self._labels.max()) + 1)
            )
        self._surrogate_optimizer = torch.optim.Adam(self._surrogate.parameters(), lr=1e-2)

    def measure(
        self,
        server_round: int,
        client_half: nn.Module,
        *,
        server_half: nn.Module | None = None,
        client_head: nn.Module | None = None,
    ) -> LeakageEstimate:
        """Attack ``client_half`` (the round's merged one): train the decoder further, then
        re-identify the held-out examples from one release each. Logs the estimate, and a
        ``PRIVACY`` warning above a threshold.

        In the label-private split, also attack the held-out labels through ``server_half``
        (the round's) and ``client_head`` (the merged head this process holds; ``None`` where
        the heads stay on the clients). Neither module is changed.
        """
        if self._decoder is None or self._optimizer is None:
            raise RuntimeError("bind() the monitor to the split before measure()")
        if (server_half is not None) != self._label_private:
            raise ValueError(
                "measure() takes the server half exactly when bind() was given one (the "
                "label-private split); pass the same kind of split to both"
            )
        started = time.perf_counter()
        released = self._released(client_half)
        labels = (
            self._attack_labels(released, server_half, client_head)
            if server_half is not None and self._surrogate is not None
            else {}
        )
        self._train_decoder(released[self._train])
        self._decoder.eval()
        with torch.no_grad():
            held_out = self._inputs[self._held_out]
            reconstructions = self._decoder(self._release(released[self._held_out]))
        self._decoder.train()
        reidentified, chance = self._reidentify(held_out, reconstructions)
        residual = (reconstructions - held_out).pow(2).sum()
        spread = (held_out - held_out.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
        estimate = LeakageEstimate(
            server_round=server_round,
            reidentification=reidentified,
            chance=chance,
            explained_variance=float(1 - residual / spread),
            seconds=time.perf_counter() - started,
            exceeded=False,
            **labels,
        )
        estimate = dataclasses.replace(estimate, exceeded=self._exceeds(estimate))
        self.history.append(estimate)
        log(
            INFO,
            "[SplitFed] leakage after round %d: re-identification %.3f (chance %.3f), explained "
            "variance %.3f, from %d held-out auxiliary examples (%.2f s)",
            server_round,
            estimate.reidentification,
            estimate.chance,
            estimate.explained_variance,
            len(self._held_out),
            estimate.seconds,
        )
        recovered = estimate.labels_recovered
        if recovered is not None:
            log(
                INFO,
                "[SplitFed] labels after round %d: recovered %s (most common label %.3f); "
                "cosine AUC of the output gradients %.3f",
                server_round,
                _recovered_text(estimate),
                estimate.label_chance,
                estimate.label_cosine_auc,
            )
        stopping = "; stopping the run" if self.action == "stop" else ""
        if self.threshold is not None and estimate.reidentification > self.threshold:
            log(
                WARNING,
                "PRIVACY: after round %d the split server re-identifies %.3f of held-out examples "
                "from their activations, above the threshold %.3f (chance %.3f)%s. Cut deeper, "
                "or raise the smashed-data clipping and noise (docs/privacy.md)",
                server_round,
                estimate.reidentification,
                self.threshold,
                estimate.chance,
                stopping,
            )
        if self.label_threshold is not None and (recovered or 0.0) > self.label_threshold:
            log(
                WARNING,
                "PRIVACY: after round %d the split server's process recovers held-out labels "
                "(%s), above the label threshold %.3f (most common label %.3f)%s. Keep the "
                "client heads on the clients (client_heads='local'); against a server with "
                "labelled data of the task no split keeps labels private (docs/privacy.md)",
                server_round,
                _recovered_text(estimate),
                self.label_threshold,
                estimate.label_chance,
                stopping,
            )
        return estimate

    def _exceeds(self, estimate: LeakageEstimate) -> bool:
        recovered = estimate.labels_recovered
        return (self.threshold is not None and estimate.reidentification > self.threshold) or (
            self.label_threshold is not None
            and recovered is not None
            and recovered > self.label_threshold
        )

    # -- the attack ------------------------------------------------------------------------------

    def _released(self, client_half: nn.Module, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """``inputs``' (default: every auxiliary input's) activations as clients release them,
        as float32 on the CPU: in training mode (dropout, batch statistics), in batches of about
        ``client_batch_size``, on the client half's device. The module's buffers and mode and
        the process's random state are left as they were: watching a run does not change it."""
        inputs = self._inputs if inputs is None else inputs
        device = _device_of(client_half)
        buffers = {name: value.clone() for name, value in client_half.named_buffers()}
        # Nearly equal batches: a last batch of one example would break batch statistics.
        batches = torch.tensor_split(inputs, max(1, len(inputs) // self.client_batch_size))
        seed = int(torch.randint(2**62, (), generator=self._generator))
        try:
            with torch.no_grad(), modes_kept(client_half, training=True), seeded(seed, device):
                released = []
                for batch in batches:
                    activations = client_half(batch.to(device))
                    if not isinstance(activations, torch.Tensor):
                        raise _NotATensor(activations)
                    released.append(activations.float().cpu())
                return torch.cat(released)
        finally:
            with torch.no_grad():
                for name, value in client_half.named_buffers():
                    value.copy_(buffers[name])

    def _release(self, activations: torch.Tensor) -> torch.Tensor:
        """One fresh draw of the clients' mechanism (the identity without clipping)."""
        return self.privacy.protect_smashed(activations, generator=self._generator)

    def _train_decoder(self, released: torch.Tensor) -> None:
        assert self._decoder is not None and self._optimizer is not None
        targets = self._inputs[self._train]
        for _ in range(self.steps_per_round):
            batch = torch.randint(
                len(targets), (min(self.batch_size, len(targets)),), generator=self._generator
            )
            loss = nn.functional.mse_loss(
                self._decoder(self._release(released[batch])), targets[batch]
            )
            self._optimizer.zero_grad()
            loss.backward()
            self._optimizer.step()

    def _same_label_mask(self, *, labels_sent: bool) -> torch.Tensor:
        """``[i, j]``: whether held-out example j is a candidate for reconstruction i."""
        count = len(self._held_out)
        if self._labels is None or not labels_sent:
            return torch.ones(count, count, dtype=torch.bool)
        labels = self._labels[self._held_out]
        return labels[:, None] == labels[None, :]

    def _reidentify(
        self, originals: torch.Tensor, reconstructions: torch.Tensor
    ) -> tuple[float, float]:
        distances = torch.cdist(reconstructions.flatten(1).double(), originals.flatten(1).double())
        distances = distances.masked_fill(~self._candidates, math.inf)
        hits = distances.argmin(dim=1) == torch.arange(len(originals))
        chance = (1.0 / self._candidates.sum(dim=1).double()).mean()
        return float(hits.double().mean()), float(chance)

    # -- the label attacks (label-private split) -------------------------------------------------

    def _attack_labels(
        self, released: torch.Tensor, server_half: nn.Module, client_head: nn.Module | None
    ) -> dict[str, float]:
        """Head-forward, surrogate head and cosine attacks on the held-out labels, from one
        release of every auxiliary input through the server half."""
        assert self._labels is not None and self._surrogate is not None
        outputs = _eval_outputs(server_half, self._release(released))
        self._train_surrogate(outputs[self._train], self._labels[self._train])
        held_out, labels = outputs[self._held_out], self._labels[self._held_out]
        estimate = {"label_chance": float(labels.bincount().max()) / len(labels)}
        with torch.no_grad():
            predicted = self._surrogate(held_out).argmax(dim=1)
        estimate["label_surrogate"] = float((predicted == labels).double().mean())
        if client_head is not None:
            logits = _eval_outputs(client_head, held_out)
            if int(labels.max()) >= logits.shape[1]:
                raise ValueError(
                    f"auxiliary_labels go up to {int(labels.max())}, but the client head has "
                    f"{logits.shape[1]} outputs; give labels of the clients' classes"
                )
            predicted = logits.argmax(dim=1)
            estimate["label_head_forward"] = float((predicted == labels).double().mean())
        head = client_head if client_head is not None else self._surrogate
        gradients = self._output_gradients(head, held_out, labels)
        # Each client-sized batch noised as a client noises its own (to the batch's mean norm).
        batch_ids = torch.arange(len(labels)) * max(1, len(labels) // self.client_batch_size)
        batch_ids = batch_ids // len(labels)
        for batch in torch.unique(batch_ids):
            rows = batch_ids == batch
            gradients[rows] = self.privacy.protect_output_gradient(
                gradients[rows], generator=self._generator
            )
        estimate["label_cosine_auc"] = cosine_attack_auc(gradients, labels, batch_ids)
        return estimate

    def _train_surrogate(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        assert self._surrogate is not None and self._surrogate_optimizer is not None
        for _ in range(self.steps_per_round):
            loss = nn.functional.cross_entropy(self._surrogate(features), labels)
            self._surrogate_optimizer.zero_grad()
            loss.backward()
            self._surrogate_optimizer.step()

    @staticmethod
    def _output_gradients(
        head: nn.Module, outputs: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Each example's gradient of the cross-entropy at the server half's output, through
        ``head`` in eval mode: what a client sends up. The head's gradients are not touched."""
        device = _device_of(head)
        with modes_kept(head, training=False):
            leaf = outputs.to(device, _dtype_of(head)).requires_grad_(True)
            logits = head(leaf)
            loss = nn.functional.cross_entropy(logits.float(), labels.to(device), reduction="sum")
            (gradient,) = torch.autograd.grad(loss, leaf)
        return gradient.detach().float().cpu()


def cosine_attack_auc(
    gradients: torch.Tensor, labels: torch.Tensor, batch_ids: torch.Tensor
) -> float:
    """The cosine attack: how well the cosine of two gradients of the same batch tells whether
    their examples share a label (ROC AUC over all pairs within batches; 0.5 where all pairs
    agree or all differ: nothing to tell apart)."""
    directions = nn.functional.normalize(gradients.flatten(1).double(), dim=1)
    scores, same = [], []
    for batch in torch.unique(batch_ids):
        rows = (batch_ids == batch).nonzero().flatten()
        first, second = rows[torch.triu_indices(len(rows), len(rows), offset=1)]
        scores.append((directions[first] * directions[second]).sum(dim=1))
        same.append(labels[first] == labels[second])
    return roc_auc(torch.cat(scores), torch.cat(same))


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for the ``positive`` examples (the Mann-Whitney
    statistic, ties counted half); 0.5 where one class is absent."""
    scores, positive = scores.detach().cpu(), positive.detach().cpu().bool()
    if not torch.isfinite(scores).all():
        raise ValueError("roc_auc takes finite scores; these hold NaN or infinite values")
    positives = int(positive.sum())
    negatives = len(positive) - positives
    if positives == 0 or negatives == 0:
        return 0.5
    order = scores.argsort()
    _, group, counts = torch.unique_consecutive(
        scores[order], return_inverse=True, return_counts=True
    )
    last = counts.cumsum(0).double()
    ranks = torch.empty(len(scores), dtype=torch.float64)
    ranks[order] = ((last - counts + 1 + last) / 2)[group]  # a tie's mean rank
    u = ranks[positive].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


_EVAL_BATCH = 256
"""Examples per forward pass where the result does not depend on the batch (eval mode): bounds
the memory of a large server half."""


def _eval_outputs(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``module``'s outputs for ``inputs`` in eval mode, on its device and in its dtype, back as
    float32 on the CPU; its modes are left as they were."""
    device, dtype = _device_of(module), _dtype_of(module)
    outputs = []
    with torch.no_grad(), modes_kept(module, training=False):
        for batch in torch.split(inputs, _EVAL_BATCH):
            output = module(batch.to(device, dtype))
            if not isinstance(output, torch.Tensor):
                raise _NotATensor(output)
            outputs.append(output.float().cpu())
    return torch.cat(outputs)


def _recovered_text(estimate: LeakageEstimate) -> str:
    parts = [f"{estimate.label_surrogate:.3f} by a head trained on labelled auxiliary data"]
    if estimate.label_head_forward is not None:
        parts.insert(0, f"{estimate.label_head_forward:.3f} by the client head this process holds")
    return ", ".join(parts)


class _NotATensor(Exception):
    def __init__(self, value: object) -> None:
        super().__init__(type(value).__name__)
        self.value = value


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _dtype_of(module: nn.Module) -> torch.dtype:
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
