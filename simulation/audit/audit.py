"""Privacy audit of split learning on the embedded digits: what the split server can learn.

``python -m simulation.audit`` trains the digits CNN through the real split server on loopback
(one client holding half of the training digits; SFLV2, which with one client is centralized
training) for every cut and defense asked for, then attacks what crossed the data plane as hard
as the process that runs the split server can. That process also aggregates, so it holds the
trained client half (and, in the label-private split with shared heads, the client head), knows
the defense's mechanism, and holds *auxiliary* digits of its own (the other half of the training
set, which the client never sees) with their labels.

- **inputs**: a decoder maps smashed data back to images. It is trained on the attacker's own
  digits through the client half, with a *fresh draw* of the client's noise for every batch (the
  mechanism is known; one fixed draw would under-train it), and reconstructs one release of each
  of the client's private digits. Scored with MSE, PSNR, SSIM, a *judge* (a classifier trained on
  the auxiliary digits only: how many reconstructions it recognises as their true digit) and
  *re-identification* (how many reconstructions are nearest their own original among the
  private digits of the same class). Floors: the mean auxiliary digit (an attacker that knows
  nothing) and the class-mean digit (one that knows the labels, which the plain split sends);
- **linking and averaging**: every release of every example in every epoch is recorded (the
  audit's own record of the order tells which example each release was, for scoring only).
  Each attacked example's releases of the last ``--link-epochs`` epochs (default 8) are
  averaged and the mean decoded by a decoder trained for it (the noise's standard deviation
  divided by the square root of their number), linked two ways. The *oracle* links them by the
  true order: what the server does where it derives the order from the seed
  (``client-randomness="from-seed"``). *Linking without the order* (private randomness, the
  default): the attacker decodes every release alone and, newest epoch first, links each
  release of the last epoch to the release of the same label (the plain split sends labels;
  the label-private split does not, and all releases are candidates) nearest the mean of those
  linked so far, one-to-one within an epoch. Reported: the share of right links (chance: one
  over the number of releases with the label), the same attack straight from the last epoch
  to each earlier one (the client half changes, so older releases link worse), and SSIM, judge
  and re-identification of both averages;
- **distance correlation** (bias-corrected) of private inputs and smashed data: a diagnostic
  only, it bounds nothing;
- **labels** (label-private split), on the gradients the server receives in *every* epoch: the
  norm attack (per class, the AUC of the gradient norm for "this example has that class", the
  better direction, averaged over classes), the cosine attack (the AUC of the cosine of two
  gradients of a batch for "same label") and clustering (k-means on gradient directions, scored
  as the share of labels recovered under the best cluster-to-label match); the worst epoch is
  reported. The **head-forward attack** runs the client head the aggregator holds on the server
  half's outputs of the activations received in the last epoch; with heads kept on the clients
  the aggregator holds none and falls back to the model's initial head. The **surrogate head**
  is what no split protects against: a head the attacker trains on its own labelled auxiliary
  digits.

Accuracy is measured as the app evaluates: the plain merged model on the clean held-out digits.
``--heads-clients`` adds what keeping client heads local costs: several clients trained with
SFLV1 through the split server, heads merged (shared) or kept (local), on IID and Dirichlet
partitions. Writes ``audit.json``, ``tables.md``, ``reconstructions.png``, ``tradeoff.png``,
``labels.png``, ``linking.png`` and ``heads.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from splitfed import (
    GrpcDataPlane,
    OptimizerConfig,
    PrivacyConfig,
    SplitModel,
    SplitServer,
    make_trainer,
    run_local_epochs,
    split_model,
)
from splitfed.client import _initialise_head as initialise_client_head
from splitfed.monitor import cosine_attack_auc, roc_auc
from splitfed.privacy import ClientSecret, distance_correlation

from ..app.config import AppConfig
from ..app.models import digits_cnn
from ..app.task import evaluate_model, federated_data, model_split, test_loader, train_loader

__all__ = [
    "AuditRun",
    "Defense",
    "Trained",
    "app_accuracy",
    "attack",
    "cluster_attack_accuracy",
    "cosine_attack_auc",
    "head_forward_accuracy",
    "averaged_mechanism",
    "heads_cost",
    "link_releases",
    "linked_average",
    "linking_chance",
    "main",
    "markdown_tables",
    "norm_attack_auc",
    "reconstruction_metrics",
    "reidentification",
    "train_configuration",
    "train_decoder",
]

OPTIMIZER = OptimizerConfig(torch.optim.SGD, lr=0.05, momentum=0.9)
CLIP_NORM = 1.0
"""The clip norm of the smashed-data noise defense; the noise is ``sigma * CLIP_NORM``."""
NUM_CLASSES = 10
LINK_EPOCHS = 8
"""Releases averaged per example by the linking attacks: those of the last 8 epochs."""


# -- metrics --------------------------------------------------------------------------------------


def reconstruction_metrics(originals: np.ndarray, reconstructions: np.ndarray) -> dict[str, float]:
    """Mean MSE, PSNR (dB, data range 1, capped at 100) and SSIM of image pairs.

    Both arrays are ``(N, H, W)`` with values in [0, 1].
    """
    from skimage.metrics import structural_similarity

    originals = np.asarray(originals, dtype=np.float64)
    reconstructions = np.clip(np.asarray(reconstructions, dtype=np.float64), 0.0, 1.0)
    mse = ((originals - reconstructions) ** 2).mean(axis=(1, 2))
    psnr = np.minimum(10 * np.log10(1.0 / np.maximum(mse, 1e-10)), 100.0)
    ssim = [
        structural_similarity(a, b, data_range=1.0)
        for a, b in zip(originals, reconstructions, strict=True)
    ]
    return {"mse": float(mse.mean()), "psnr": float(psnr.mean()), "ssim": float(np.mean(ssim))}


def reidentification(
    originals: np.ndarray, reconstructions: np.ndarray, labels: np.ndarray
) -> tuple[float, float]:
    """Instance-level leakage: the share of reconstructions whose nearest (L2) image among the
    originals of the same class is their own original, and that share by chance.

    Knowing an example's class (or guessing it from a blurred reconstruction) is not the same
    as recovering the example; this counts the second. Chance is ``classes / N``.
    """
    originals = np.asarray(originals, dtype=np.float64).reshape(len(originals), -1)
    reconstructions = np.clip(np.asarray(reconstructions, dtype=np.float64), 0, 1)
    reconstructions = reconstructions.reshape(len(reconstructions), -1)
    labels = np.asarray(labels)
    hits = 0
    classes = np.unique(labels)
    for label in classes:
        rows = np.flatnonzero(labels == label)
        distances = ((reconstructions[rows, None, :] - originals[None, rows, :]) ** 2).sum(-1)
        hits += int((distances.argmin(axis=1) == np.arange(len(rows))).sum())
    return hits / len(labels), len(classes) / len(labels)


def fit_judge(images: torch.Tensor, labels: torch.Tensor) -> Any:
    """A classifier of digits trained on the attacker's auxiliary digits only."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=3000).fit(images.flatten(1).numpy(), labels.numpy())


def judge_accuracy(judge: Any, images: np.ndarray, labels: np.ndarray) -> float:
    """The share of ``images`` the judge recognises as their true digit."""
    flat = np.clip(np.asarray(images, dtype=np.float64), 0, 1).reshape(len(images), -1)
    return float((judge.predict(flat) == np.asarray(labels)).mean())


def link_releases(
    queries: np.ndarray,
    candidates: np.ndarray,
    query_labels: np.ndarray | None = None,
    candidate_labels: np.ndarray | None = None,
    *,
    one_to_one: bool = True,
) -> np.ndarray:
    """For each query release, the index of the candidate release an attacker links it to: the
    nearest (L2) among the candidates of the same label (all candidates where labels are
    ``None``).

    With ``one_to_one`` (an epoch holds each example once) the links within a label are a
    minimum-cost one-to-one assignment; queries left over link to their nearest candidate.
    """
    from scipy.optimize import linear_sum_assignment

    queries = np.asarray(queries, dtype=np.float64).reshape(len(queries), -1)
    candidates = np.asarray(candidates, dtype=np.float64).reshape(len(candidates), -1)
    if query_labels is None or candidate_labels is None:
        query_labels, candidate_labels = np.zeros(len(queries)), np.zeros(len(candidates))
    query_labels, candidate_labels = np.asarray(query_labels), np.asarray(candidate_labels)
    links = np.full(len(queries), -1)
    for label in np.unique(query_labels):
        rows = np.flatnonzero(query_labels == label)
        pool = np.flatnonzero(candidate_labels == label)
        if len(pool) == 0:
            # No candidate of this label: the nearest of any label, one-to-one no longer holds.
            pool = np.arange(len(candidates))
        distances = (
            (queries[rows] ** 2).sum(1)[:, None]
            - 2 * queries[rows] @ candidates[pool].T
            + (candidates[pool] ** 2).sum(1)[None, :]
        )
        nearest = distances.argmin(axis=1)
        links[rows] = pool[nearest]
        if one_to_one:
            assigned, to = linear_sum_assignment(distances)
            links[rows[assigned]] = pool[to]
    return links


def linked_average(
    releases: list[np.ndarray], labels: list[np.ndarray] | None = None, *, one_to_one: bool = True
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Averaging without the order: link each release of the last epoch in ``releases`` (one
    array per epoch, in arrival order) to one release of every earlier epoch, newest first, the
    query being the mean of the releases linked so far (it gets less noisy as it grows).

    Returns the mean of each chain (one row per release of the last epoch) and the links: for
    each earlier epoch, the index of the release each chain took from it.
    """
    last = np.asarray(releases[-1], dtype=np.float64).reshape(len(releases[-1]), -1)
    total, count = last.copy(), 1
    links: list[np.ndarray] = [np.empty(0, dtype=int)] * (len(releases) - 1)
    for epoch in range(len(releases) - 2, -1, -1):
        candidates = np.asarray(releases[epoch], dtype=np.float64).reshape(len(releases[epoch]), -1)
        links[epoch] = link_releases(
            total / count,
            candidates,
            None if labels is None else labels[-1],
            None if labels is None else labels[epoch],
            one_to_one=one_to_one,
        )
        total += candidates[links[epoch]]
        count += 1
    return total / count, links


def linking_chance(query_labels: np.ndarray, candidate_labels: np.ndarray) -> float:
    """The share of links a guess among the same-label candidates hits: the mean of one over
    the number of candidates with the query's label."""
    counts = {label: int((candidate_labels == label).sum()) for label in np.unique(query_labels)}
    return float(np.mean([1 / max(counts[label], 1) for label in query_labels]))


def norm_attack_auc(gradients: torch.Tensor, labels: torch.Tensor) -> float:
    """The norm attack: for each class, how well the gradient norm tells that class from the
    rest (ROC AUC, the better direction), averaged over the classes present."""
    norms = gradients.flatten(1).norm(dim=1)
    scores = []
    for label in torch.unique(labels):
        positive = labels == label
        if positive.all():
            continue
        auc = roc_auc(norms, positive)
        scores.append(max(auc, 1 - auc))
    return float(np.mean(scores)) if scores else 0.5


def cluster_attack_accuracy(
    gradients: torch.Tensor, labels: torch.Tensor, *, num_classes: int = NUM_CLASSES, seed: int = 0
) -> float:
    """Clustering: k-means (one cluster per class) on the directions of the gradients; the share
    of examples whose cluster maps to their label under the best one-to-one matching.

    The server needs no labels to cluster; a handful of labelled examples names the clusters.
    Random clusters score a little above ``1 / num_classes``.
    """
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans

    directions = nn.functional.normalize(gradients.flatten(1).double(), dim=1).numpy()
    clusters = KMeans(n_clusters=num_classes, n_init=4, random_state=seed).fit_predict(directions)
    labels_np = labels.numpy()
    confusion = np.zeros((num_classes, max(num_classes, int(labels_np.max()) + 1)))
    np.add.at(confusion, (clusters, labels_np), 1)
    rows, cols = linear_sum_assignment(-confusion)
    return float(confusion[rows, cols].sum() / len(labels_np))


@torch.no_grad()
def head_forward_accuracy(
    head: nn.Module, server_half: nn.Module, activations: torch.Tensor, labels: torch.Tensor
) -> float:
    """The head-forward attack: the share of private labels recovered by running a client head
    on the server half's outputs of the activations the server received."""
    modes = head.training, server_half.training
    head.eval()
    server_half.eval()
    try:
        predicted = head(server_half(activations)).argmax(dim=1)
    finally:
        head.train(modes[0])
        server_half.train(modes[1])
    return float((predicted == labels).float().mean())


def app_accuracy(split: SplitModel, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Test accuracy as the app measures it: the plain merged model, in eval mode, on clean
    held-out data (no defense runs at evaluation)."""
    return evaluate_model(split.full_model(), images, labels)[1]


# -- what is audited ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Defense:
    """One defense setting, written ``name`` or ``name:value`` on the command line."""

    name: str = "none"
    value: float = 0.0
    extra: float = 0.0

    KINDS = ("none", "clip", "noise", "nopeek", "label-noise", "local-heads", "dp")

    @classmethod
    def parse(cls, text: str) -> Defense:
        name, *values = text.split(":")
        if name not in cls.KINDS or len(values) > 2:
            raise argparse.ArgumentTypeError(
                f"defense {text!r}: use none, clip:C, noise:SIGMA, nopeek:WEIGHT, "
                "label-noise:MULTIPLIER, local-heads:MULTIPLIER or dp:NOISE:CLIP"
            )
        numbers = [float(v) for v in values] + [0.0, 0.0]
        return cls(name, numbers[0], numbers[1])

    @property
    def label_private(self) -> bool:
        return self.name in ("label-noise", "local-heads")

    @property
    def client_heads(self) -> str:
        """Label-private split: whether the head reaches the aggregator (``"shared"``)."""
        return "local" if self.name == "local-heads" else "shared"

    def privacy(self) -> PrivacyConfig:
        if self.name == "clip":
            return PrivacyConfig(smashed_clip_norm=self.value)
        if self.name == "noise":
            return PrivacyConfig(smashed_clip_norm=CLIP_NORM, smashed_noise_multiplier=self.value)
        if self.name == "nopeek":
            return PrivacyConfig(nopeek_weight=self.value)
        if self.label_private:
            return PrivacyConfig(label_noise_multiplier=self.value)
        if self.name == "dp":
            return PrivacyConfig(dp_noise_multiplier=self.value, dp_max_grad_norm=self.extra)
        return PrivacyConfig()

    def __str__(self) -> str:
        if self.name == "none":
            return "none"
        if self.name == "dp":
            return f"dp:{self.value:g}:{self.extra:g}"
        return f"{self.name}:{self.value:g}"


@dataclass
class AuditRun:
    """The figures of one (cut, defense, seed)."""

    cut: str
    defense: str
    label_private: bool
    seed: int
    test_accuracy: float
    mse: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    judge_accuracy: float | None = None
    reidentification: float | None = None
    dcor: float | None = None
    norm_auc: float | None = None
    cosine_auc: float | None = None
    cluster_accuracy: float | None = None
    norm_auc_by_epoch: list[float] = field(default_factory=list)
    cosine_auc_by_epoch: list[float] = field(default_factory=list)
    cluster_accuracy_by_epoch: list[float] = field(default_factory=list)
    head_forward_accuracy: float | None = None
    surrogate_head_accuracy: float | None = None
    smashed_epsilon_per_release: float | None = None
    smashed_epsilon: float | None = None
    dp_epsilon: float | None = None
    linking_accuracy: float = math.nan
    linking_chance: float = math.nan
    linking_accuracy_by_epoch: list[float] = field(default_factory=list)
    linked_ssim: float = math.nan
    linked_judge_accuracy: float = math.nan
    linked_reidentification: float = math.nan
    oracle_linked_ssim: float = math.nan
    oracle_linked_judge_accuracy: float = math.nan
    oracle_linked_reidentification: float = math.nan
    seconds: float = 0.0


class _LabelLog:
    """An iterable of batches that remembers what it handed out, in order: the labels and, for
    scoring only, which examples (the audit's own knowledge of the order; the server has none)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.batch_size = loader.batch_size
        self.labels: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []
        self.epoch = -1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.epoch += 1
        for images, labels, indices in self.loader:
            self.labels.append(labels.clone())
            self.indices.append(indices.clone())
            yield images, labels


class _Recorder:
    """Between the training loop and the data plane: keeps what the server receives.

    Every release of the activations is stored by epoch and example (``releases[epoch,
    example]``, flattened), so one tensor of ``epochs x examples x width`` bounds the memory; the
    gradients sent up (label-private split) are kept per step.
    """

    def __init__(self, plane: GrpcDataPlane, loader: _LabelLog, examples: int, epochs: int):
        self.plane = plane
        self.loader = loader
        self.examples, self.epochs = examples, epochs
        self.releases: torch.Tensor | None = None
        self.output_gradients: list[torch.Tensor] = []

    def _record(self, activations: torch.Tensor) -> None:
        flat = activations.detach().flatten(1)
        if self.releases is None:
            self.releases = torch.full((self.epochs, self.examples, flat.shape[1]), math.nan)
        self.releases[self.loader.epoch, self.loader.indices[-1]] = flat.to(self.releases.dtype)

    def exchange(self, step, activations, labels):
        self._record(activations)
        return self.plane.exchange(step, activations, labels)

    def forward_server_half(self, step, activations):
        self._record(activations)
        return self.plane.forward_server_half(step, activations)

    def backward_server_half(self, step, output_gradient):
        self.output_gradients.append(output_gradient.detach().clone())
        return self.plane.backward_server_half(step, output_gradient)

    def arrival_orders(self) -> list[torch.Tensor]:
        """For each epoch, the examples in the order their releases arrived (ground truth)."""
        per_epoch = len(self.loader.indices) // self.epochs
        return [
            torch.cat(self.loader.indices[e * per_epoch : (e + 1) * per_epoch])
            for e in range(self.epochs)
        ]

    def close(self) -> None:
        self.plane.close()


@dataclass(frozen=True)
class _Digits:
    """The app's digits as tensors: the train split, the held-out split."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_digits() -> _Digits:
    data = federated_data(AppConfig())
    train = data.train_split()[:]
    return _Digits(train["image"], train["label"], *data.central_test())


def private_and_auxiliary(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the client's digits and of the attacker's (disjoint halves of the train split)."""
    data = load_digits()
    order = torch.randperm(
        len(data.train_labels), generator=torch.Generator().manual_seed(1000 + seed)
    )
    return order[: len(order) // 2], order[len(order) // 2 :]


def digits_split(*, cut: str, server_cut: str | None = None) -> SplitModel:
    return split_model(
        digits_cnn(), cut=cut, server_cut=server_cut, sample_input=torch.zeros(2, 1, 8, 8)
    )


def _train(split, defense: Defense, images, labels, *, epochs: int, seed: int):
    """Train through the real split server on loopback; return what the server received."""
    label_private = defense.label_private
    privacy = defense.privacy()
    privacy.validate(label_private=label_private, client_half=split.client_half)
    trainer = make_trainer("v2", server_half=split.server_half, optimizer=OPTIMIZER)
    server = SplitServer(
        trainer=trainer,
        activation_shape=split.activation_shape,
        activation_dtype=split.activation_dtype,
        insecure=True,  # loopback, in this process
        label_private=label_private,
        output_shape=split.output_shape,
    )
    secret = ClientSecret.from_value(f"audit-client:{seed}")
    loader = _LabelLog(
        DataLoader(
            TensorDataset(images, labels, torch.arange(len(labels))),
            batch_size=16,
            shuffle=True,
            generator=secret.generator("shuffle"),
        )
    )
    optimizer = OPTIMIZER.build(split.client_parameters())
    with server:
        tokens = server.open_round(1, [1])
        with (
            GrpcDataPlane(
                address=server.address, node_id=1, server_round=1, token=tokens[1]
            ) as plane,
            privacy.training(
                split,
                optimizer,
                batch_size=loader.batch_size,
                generator=secret.generator("dp-sgd-noise"),
            ) as (trained, step_optimizer),
        ):
            recorder = _Recorder(plane, loader, len(labels), epochs)
            run_local_epochs(
                split=trained,
                data_plane=recorder,
                train_loader=loader,
                optimizer=step_optimizer,
                local_epochs=epochs,
                privacy=privacy,
                generator=secret.generator("noise"),
            )
        server.close_round()
    return privacy, recorder, loader


@torch.no_grad()
def _clean_smashed(split: SplitModel, images: torch.Tensor) -> torch.Tensor:
    return split.client_half(images)


def train_decoder(
    clean: torch.Tensor,
    targets: torch.Tensor,
    privacy: PrivacyConfig,
    *,
    epochs: int,
    seed: int,
    fresh_draws: bool = True,
) -> nn.Module:
    """Train a decoder (MLP) from defended activations to images on the attacker's own digits.

    Parameters
    ----------
    clean : Tensor
        The client half's activations of the attacker's digits (it holds the client half).
    targets : Tensor
        Those digits, ``(N, 1, 8, 8)``.
    privacy : PrivacyConfig
        The client's mechanism, which the attacker knows.
    fresh_draws : bool (default: True)
        Draw the mechanism's noise anew for every batch; ``False`` trains on one fixed draw (a
        weaker attacker).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    fixed = None if fresh_draws else privacy.protect_smashed(clean, generator=generator)
    width = clean[0].numel()
    decoder = nn.Sequential(
        nn.Flatten(), nn.Linear(width, 256), nn.ReLU(), nn.Linear(256, 64), nn.Sigmoid()
    )
    optimizer = torch.optim.Adam(decoder.parameters(), lr=2e-3)
    flat_targets = targets.flatten(1)
    for _ in range(epochs):
        order = torch.randperm(len(clean), generator=generator)
        for start in range(0, len(order), 32):
            rows = order[start : start + 32]
            inputs = (
                privacy.protect_smashed(clean[rows], generator=generator)
                if fixed is None
                else fixed[rows]
            )
            loss = nn.functional.mse_loss(decoder(inputs), flat_targets[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return decoder.eval()


def _label_attacks(run: AuditRun, recorder: _Recorder, loader: _LabelLog, epochs: int, seed: int):
    """Norm, cosine and clustering attacks on every epoch's gradients; the worst epoch counts."""
    per_epoch = len(recorder.output_gradients) // epochs
    for epoch in range(epochs):
        steps = slice(epoch * per_epoch, (epoch + 1) * per_epoch)
        gradients = torch.cat(recorder.output_gradients[steps])
        batch_labels = loader.labels[steps]
        labels = torch.cat(batch_labels)
        batch_ids = torch.cat([torch.full((len(b),), i) for i, b in enumerate(batch_labels)])
        run.norm_auc_by_epoch.append(norm_attack_auc(gradients, labels))
        run.cosine_auc_by_epoch.append(cosine_attack_auc(gradients, labels, batch_ids))
        run.cluster_accuracy_by_epoch.append(cluster_attack_accuracy(gradients, labels, seed=seed))
    run.norm_auc = max(run.norm_auc_by_epoch)
    run.cosine_auc = max(run.cosine_auc_by_epoch)
    run.cluster_accuracy = max(run.cluster_accuracy_by_epoch)


def averaged_mechanism(privacy: PrivacyConfig, releases: int) -> PrivacyConfig:
    """The mechanism the mean of ``releases`` independent releases of one example went through:
    the same clipping, the noise's standard deviation divided by the square root of their
    number (what a decoder of averaged releases is trained on)."""
    if releases < 1:
        raise ValueError(f"releases must be at least 1; got {releases}")
    sigma = privacy.smashed_noise_multiplier / math.sqrt(releases)
    return dataclasses.replace(privacy, smashed_noise_multiplier=sigma)


def _linking_attacks(
    run: AuditRun,
    decoder: nn.Module,
    judge: Any,
    recorder: _Recorder,
    labels: torch.Tensor,
    originals: np.ndarray,
    *,
    decoder_data: tuple[torch.Tensor, torch.Tensor],
    privacy: PrivacyConfig,
    decoder_epochs: int,
    seed: int,
    fresh_draws: bool,
    link_epochs: int,
    labels_sent: bool,
) -> None:
    """Average each attacked example's releases of the last ``link_epochs`` epochs and decode
    the mean with a decoder trained for it (the noise shrunk by the square root of their
    number), the releases linked by the true order (the oracle: the server derives the order
    from the seed) or by the attacker itself (private randomness: for each release of the last
    epoch, one release of each earlier epoch, the nearest decoded one of the same label, linked
    one-to-one). The attacked examples are the first ``len(originals)`` of the client's; the
    true order scores the links only."""
    releases, epochs = recorder.releases, recorder.epochs
    if releases is None or epochs < 2:
        return
    attack_examples = len(originals)
    attacked_labels = labels[:attack_examples].numpy()
    k = min(link_epochs, epochs)
    recent = releases[-k:]
    averaged_decoder = (
        train_decoder(
            *decoder_data,
            averaged_mechanism(privacy, k),
            epochs=decoder_epochs,
            seed=seed,
            fresh_draws=fresh_draws,
        )
        if privacy.smashed_noise_multiplier > 0
        else decoder
    )
    with torch.no_grad():
        # The attacker links on each release decoded alone.
        decoded = decoder(recent.flatten(0, 1)).view(k, recent.shape[1], -1).double().numpy()
    orders = [order.numpy() for order in recorder.arrival_orders()[-k:]]
    # What the server sees: each epoch's releases in arrival order, with the labels in the
    # plain split (none in the label-private split).
    seen = [decoded[e][orders[e]] for e in range(k)]
    seen_labels = [labels.numpy()[order] for order in orders] if labels_sent else None

    def score(mean_releases: torch.Tensor) -> tuple[float, float, float]:
        with torch.no_grad():
            images = averaged_decoder(mean_releases).view(originals.shape).numpy()
        return (
            reconstruction_metrics(originals, images)["ssim"],
            judge_accuracy(judge, images, attacked_labels),
            reidentification(originals, images, attacked_labels)[0],
        )

    (
        run.oracle_linked_ssim,
        run.oracle_linked_judge_accuracy,
        run.oracle_linked_reidentification,
    ) = score(recent[:, :attack_examples].mean(0))
    _, links = linked_average(seen, seen_labels)
    last = orders[-1]
    # Each chain as examples: the one each linked release came from, and the last epoch's.
    chains = np.stack([orders[e][links[e]] for e in range(k - 1)] + [last])
    run.linking_accuracy = float((chains[:-1] == last).mean())
    query_labels = labels.numpy()[last] if labels_sent else np.zeros(len(last))
    run.linking_chance = linking_chance(query_labels, query_labels)
    position = np.argsort(last)[:attack_examples]  # each attacked example's chain
    linked = recent[torch.arange(k)[:, None], torch.from_numpy(chains[:, position])].mean(0)
    run.linked_ssim, run.linked_judge_accuracy, run.linked_reidentification = score(linked)
    # Each earlier epoch's releases linked straight to the last epoch's (older epochs were
    # released by an earlier client half), decoded alone.
    with torch.no_grad():
        all_decoded = decoder(releases.flatten(0, 1)).view(epochs, -1, decoded.shape[-1])
    orders_all = [order.numpy() for order in recorder.arrival_orders()]
    features = [all_decoded[e].double().numpy()[orders_all[e]] for e in range(epochs)]
    run.linking_accuracy_by_epoch = [
        float(
            (
                orders_all[e][
                    link_releases(
                        features[-1],
                        features[e],
                        labels.numpy()[orders_all[-1]] if labels_sent else None,
                        labels.numpy()[orders_all[e]] if labels_sent else None,
                    )
                ]
                == orders_all[-1]
            ).mean()
        )
        for e in range(epochs - 1)
    ]


def _surrogate_head(split: SplitModel, aux_images, aux_labels, *, seed: int) -> nn.Module:
    """A head the attacker trains on its own labelled digits, through the halves it holds."""
    torch.manual_seed(seed)
    with torch.no_grad():
        features = split.server_half(split.client_half(aux_images))
    head = nn.Linear(features.shape[1], NUM_CLASSES)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.01)
    for _ in range(300):
        loss = nn.functional.cross_entropy(head(features), aux_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head


@dataclass
class Trained:
    """One configuration after training: the split and what the server received."""

    cut: str
    defense: Defense
    seed: int
    epochs: int
    split: SplitModel
    privacy: PrivacyConfig
    recorder: _Recorder
    loader: _LabelLog
    initial_head: nn.Module | None


def train_configuration(cut: str, defense: Defense, seed: int, *, epochs: int) -> Trained:
    """Train the client's digits through the split server with ``defense``."""
    data = load_digits()
    private, _ = private_and_auxiliary(seed)
    images, labels = data.train_images[private], data.train_labels[private]
    torch.manual_seed(seed)
    split = digits_split(cut=cut, server_cut="relu3" if defense.label_private else None)
    initial_head = copy.deepcopy(split.client_head)
    if defense.client_heads == "local" and split.client_head is not None:
        # As train_client_half does for a head kept on the client: its first weights come from
        # the client's secret, not from the model the server built.
        secret = ClientSecret.from_value(f"audit-client:{seed}")
        initialise_client_head(split.client_head, secret.seed("client-head"))
    privacy, recorder, loader = _train(split, defense, images, labels, epochs=epochs, seed=seed)
    return Trained(cut, defense, seed, epochs, split, privacy, recorder, loader, initial_head)


def audit_one(
    cut: str,
    defense: Defense,
    seed: int,
    *,
    epochs: int,
    decoder_epochs: int,
    attack_examples: int,
    fresh_draws: bool = True,
    link_epochs: int = LINK_EPOCHS,
) -> tuple[AuditRun, np.ndarray | None]:
    """Train one configuration and attack it; return its figures and some reconstructions."""
    started = time.perf_counter()
    trained = train_configuration(cut, defense, seed, epochs=epochs)
    run, reconstructions = attack(
        trained,
        decoder_epochs=decoder_epochs,
        attack_examples=attack_examples,
        fresh_draws=fresh_draws,
        link_epochs=link_epochs,
    )
    run.seconds = time.perf_counter() - started
    return run, reconstructions


def attack(
    trained: Trained,
    *,
    decoder_epochs: int,
    attack_examples: int,
    fresh_draws: bool = True,
    link_epochs: int = LINK_EPOCHS,
) -> tuple[AuditRun, np.ndarray]:
    """Every attack on one trained configuration; its figures and some reconstructions."""
    cut, defense, seed, epochs = trained.cut, trained.defense, trained.seed, trained.epochs
    split, privacy, recorder, loader = (
        trained.split,
        trained.privacy,
        trained.recorder,
        trained.loader,
    )
    initial_head = trained.initial_head
    data = load_digits()
    private, aux = private_and_auxiliary(seed)
    images, labels = data.train_images[private], data.train_labels[private]
    aux_images, aux_labels = data.train_images[aux], data.train_labels[aux]
    run = AuditRun(
        cut=cut,
        defense=str(defense),
        label_private=defense.label_private,
        seed=seed,
        test_accuracy=app_accuracy(split, data.test_images, data.test_labels),
    )
    epsilons = privacy.epsilons(releases=epochs, dp_steps=epochs)
    run.smashed_epsilon_per_release = epsilons.get("smashed-epsilon-per-release")
    run.smashed_epsilon = epsilons.get("smashed-epsilon")
    run.dp_epsilon = epsilons.get("dp-epsilon")
    for module in (*split.client_modules(), split.server_half):
        module.eval()
    attacked, attacked_labels = images[:attack_examples], labels[:attack_examples]
    # One release of each attacked digit, drawn with noise the attacker does not know.
    release = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        released = privacy.protect_smashed(_clean_smashed(split, attacked), generator=release)
        run.dcor = float(distance_correlation(attacked[:256], released[:256]))
    clean_aux = _clean_smashed(split, aux_images)
    decoder = train_decoder(
        clean_aux,
        aux_images,
        privacy,
        epochs=decoder_epochs,
        seed=seed,
        fresh_draws=fresh_draws,
    )
    with torch.no_grad():
        reconstructions = decoder(released).view(-1, 8, 8).numpy()
    originals = attacked[:, 0].numpy()
    scores = reconstruction_metrics(originals, reconstructions)
    run.mse, run.psnr, run.ssim = scores["mse"], scores["psnr"], scores["ssim"]
    judge = fit_judge(aux_images, aux_labels)
    run.judge_accuracy = judge_accuracy(judge, reconstructions, attacked_labels.numpy())
    run.reidentification = reidentification(originals, reconstructions, attacked_labels.numpy())[0]
    _linking_attacks(
        run,
        decoder,
        judge,
        recorder,
        labels,
        originals,
        decoder_data=(clean_aux, aux_images),
        privacy=privacy,
        decoder_epochs=decoder_epochs,
        seed=seed,
        fresh_draws=fresh_draws,
        link_epochs=link_epochs,
        labels_sent=not defense.label_private,
    )
    if defense.label_private:
        _label_attacks(run, recorder, loader, epochs, seed)
        # Every activation received in the last epoch (each example once), with its label.
        assert recorder.releases is not None
        received = recorder.releases[-1].view(-1, *split.activation_shape)
        received_labels = labels
        # The aggregator holds the client's head when heads are shared; otherwise its best
        # guess is the head of the model it built (the client drew its own).
        head = split.client_head if defense.client_heads == "shared" else initial_head
        run.head_forward_accuracy = head_forward_accuracy(
            head, split.server_half, received, received_labels
        )
        surrogate = _surrogate_head(split, aux_images, aux_labels, seed=seed)
        run.surrogate_head_accuracy = head_forward_accuracy(
            surrogate, split.server_half, received, received_labels
        )
    return run, reconstructions[:10]


def floor_metrics(attack_examples: int, seed: int) -> dict[str, float]:
    """What an attacker gets without the activations: every private digit reconstructed as the
    mean auxiliary digit (it knows nothing) or as the mean auxiliary digit of its class (it
    knows the labels, as in the plain split)."""
    data = load_digits()
    private, aux = private_and_auxiliary(seed)
    originals = data.train_images[private][:attack_examples, 0].numpy()
    labels = data.train_labels[private][:attack_examples].numpy()
    aux_images, aux_labels = data.train_images[aux], data.train_labels[aux]
    mean = np.broadcast_to(aux_images[:, 0].mean(dim=0).numpy(), originals.shape)
    class_means = np.stack([aux_images[aux_labels == c, 0].mean(dim=0).numpy() for c in labels])
    judge = fit_judge(aux_images, aux_labels)
    floor = reconstruction_metrics(originals, mean)
    label_known = reconstruction_metrics(originals, class_means)
    rate, chance = reidentification(originals, class_means, labels)
    return {
        **floor,
        "judge_accuracy": judge_accuracy(judge, mean, labels),
        "judge_accuracy_on_originals": judge_accuracy(judge, originals, labels),
        "class_mean_judge_accuracy": judge_accuracy(judge, class_means, labels),
        "class_mean_mse": label_known["mse"],
        "class_mean_psnr": label_known["psnr"],
        "class_mean_ssim": label_known["ssim"],
        "class_mean_reidentification": rate,
        "reidentification_chance": chance,
    }


# -- what keeping client heads local costs --------------------------------------------------------


def heads_cost(
    *, heads: str, partitioner: str, seed: int, clients: int, rounds: int
) -> dict[str, float]:
    """Train the app's label-private digits task (SFLV1, its default optimizers, batch size and
    local epochs) on ``clients`` partitions through the split server, merging the client heads
    with FedAvg (``heads="shared"``) or keeping each on its client (``"local"``).

    Returns the mean over clients of the accuracy on the central held-out digits and on each
    client's own held-out share (the app's federated evaluation): with shared heads every client
    has the merged model, with local heads its own head on the merged halves.
    """
    config = AppConfig.from_run_config(
        {"seed": seed, "partitioner": partitioner, "label-private": True}
    )
    data = federated_data(config, num_partitions=clients)
    torch.manual_seed(seed)
    split = model_split(config, data, client_side=False)
    parts = [split.client_copy() for _ in range(clients)]
    optimizers = [config.client_optimizer.build(p.client_parameters()) for p in parts]
    secrets_ = [ClientSecret.from_value(f"heads:{seed}:{node}") for node in range(clients)]
    trainer = make_trainer("v1", server_half=split.server_half, optimizer=config.server_optimizer)
    server = SplitServer.for_split(split, trainer=trainer, insecure=True)
    half_keys = set(split.client_half.state_dict())
    shared_keys = set(split.client_state_dict()) if heads == "shared" else half_keys
    global_state = {k: v for k, v in split.client_state_dict().items() if k in shared_keys}
    if heads == "local":
        for part, secret in zip(parts, secrets_, strict=True):
            initialise_client_head(part.client_head, secret.seed("client-head"))
    with server:
        for server_round in range(1, rounds + 1):
            nodes = list(range(clients))
            tokens = server.open_round(server_round, nodes)
            examples = []
            for node, part, optimizer in zip(nodes, parts, optimizers, strict=True):
                part.load_client_state_dict({**part.client_state_dict(), **global_state})
                loader = train_loader(
                    config,
                    data,
                    partition_id=node,
                    server_round=server_round,
                    secret=secrets_[node],
                )
                with GrpcDataPlane(
                    address=server.address,
                    node_id=node,
                    server_round=server_round,
                    token=tokens[node],
                ) as plane:
                    stats = run_local_epochs(
                        split=part,
                        data_plane=plane,
                        train_loader=loader,
                        optimizer=optimizer,
                        local_epochs=config.local_epochs,
                    )
                examples.append(stats.num_examples)
            server.close_round()
            states = [p.client_state_dict() for p in parts]
            global_state = _weighted_mean(
                [{k: s[k] for k in shared_keys} for s in states], examples
            )
            copies = trainer.client_copies(nodes)
            trainer.load_merged(_weighted_mean([copies[n].state_dict() for n in nodes], examples))
    test_inputs, test_labels = data.central_test()
    central, own = [], []
    for node, part in enumerate(parts):
        part.load_client_state_dict({**part.client_state_dict(), **global_state})
        model = nn.Sequential(part.client_half, trainer.server_half, part.client_head)
        central.append(evaluate_model(model, test_inputs, test_labels)[1])
        batches = list(test_loader(config, data, partition_id=node))
        inputs = torch.cat([b[data.input_key] for b in batches])
        labels = torch.cat([b[data.label_key] for b in batches])
        own.append(evaluate_model(model, inputs, labels)[1])
    return {
        "central_accuracy": statistics.fmean(central),
        "own_share_accuracy": statistics.fmean(own),
    }


def _weighted_mean(
    states: list[dict[str, torch.Tensor]], weights: list[int]
) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {
        key: sum(s[key].double() * (w / total) for s, w in zip(states, weights, strict=True)).to(
            states[0][key].dtype
        )
        for key in states[0]
    }


# -- report ---------------------------------------------------------------------------------------

_FIGURES = (
    "test_accuracy",
    "mse",
    "psnr",
    "ssim",
    "judge_accuracy",
    "reidentification",
    "dcor",
    "norm_auc",
    "cosine_auc",
    "cluster_accuracy",
    "head_forward_accuracy",
    "surrogate_head_accuracy",
    "smashed_epsilon_per_release",
    "smashed_epsilon",
    "dp_epsilon",
    "linking_accuracy",
    "linking_chance",
    "linked_ssim",
    "linked_judge_accuracy",
    "linked_reidentification",
    "oracle_linked_ssim",
    "oracle_linked_judge_accuracy",
    "oracle_linked_reidentification",
)
_BY_EPOCH = ("norm_auc_by_epoch", "cosine_auc_by_epoch", "cluster_accuracy_by_epoch")
_SERIES = (*_BY_EPOCH, "linking_accuracy_by_epoch")


def _measured(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def summarize(runs: list[AuditRun], floor: dict[str, float]) -> dict:
    """Mean and standard deviation over seeds per (cut, defense), and the goals."""
    groups: dict[tuple[str, str], list[AuditRun]] = {}
    for run in runs:
        groups.setdefault((run.cut, run.defense), []).append(run)
    summary = []
    for (cut, defense), members in groups.items():
        row: dict = {"cut": cut, "defense": defense, "label_private": members[0].label_private}
        row["seeds"] = len(members)
        for key in _FIGURES:
            values = [getattr(m, key) for m in members if _measured(getattr(m, key))]
            if values:
                row[key] = statistics.fmean(values)
                row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        for key in _SERIES:
            series = [getattr(m, key) for m in members if getattr(m, key)]
            if series:
                row[key] = [statistics.fmean(values) for values in zip(*series, strict=True)]
        summary.append(row)

    def baseline(cut: str, label_private: bool) -> dict | None:
        return next(
            (
                r
                for r in summary
                if r["cut"] == cut
                and r["label_private"] == label_private
                and r["defense"] in ("none", "label-noise:0")
            ),
            None,
        )

    goals: dict[str, list] = {"reconstruction": [], "labels": []}
    for row in summary:
        base = baseline(row["cut"], row["label_private"])
        if base is None or row is base:
            continue
        drop = base["test_accuracy"] - row["test_accuracy"]
        if not row["label_private"]:
            chance = floor["reidentification_chance"]

            def met(
                *attacks: str, row: dict[str, Any] = row, drop: float = drop, chance: float = chance
            ) -> bool:
                # At most 2x chance re-identification, the judge no better than on the class
                # means, within 2 points of the undefended accuracy, against every attack named
                # ("" is the one-release attack).
                return bool(
                    all(
                        row.get(f"{a}reidentification", 0.0) <= 2 * chance
                        and row.get(f"{a}judge_accuracy", 0.0) <= floor["class_mean_judge_accuracy"]
                        for a in attacks
                    )
                    and drop <= 0.02
                )

            goals["reconstruction"].append(
                {
                    "cut": row["cut"],
                    "defense": row["defense"],
                    "ssim_over_class_mean_floor": row["ssim"] - floor["class_mean_ssim"],
                    "judge_accuracy": row["judge_accuracy"],
                    "reidentification_over_chance": row["reidentification"] / chance,
                    "linked_reidentification_over_chance": row.get(
                        "linked_reidentification", math.nan
                    )
                    / chance,
                    "oracle_linked_reidentification_over_chance": row.get(
                        "oracle_linked_reidentification", math.nan
                    )
                    / chance,
                    "accuracy_drop": drop,
                    # With private randomness: one release, and releases the attacker linked.
                    "met": met("", "linked_"),
                    # With an order the server derives ("from-seed"): also the oracle's links.
                    "met_if_order_derivable": met("", "linked_", "oracle_linked_"),
                }
            )
        else:
            goals["labels"].append(
                {
                    "cut": row["cut"],
                    "defense": row["defense"],
                    "norm_auc": row["norm_auc"],
                    "cosine_auc": row["cosine_auc"],
                    "cluster_accuracy": row["cluster_accuracy"],
                    "head_forward_accuracy": row["head_forward_accuracy"],
                    "accuracy_drop": drop,
                    "met": bool(
                        row["norm_auc"] <= 0.6
                        and row["cosine_auc"] <= 0.6
                        and row["head_forward_accuracy"] <= 0.2
                        and drop <= 0.01
                    ),
                }
            )
    return {"summary": summary, "goals": goals}


def summarize_heads(results: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per (partitioner, heads)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for result in results:
        groups.setdefault((result["partitioner"], result["heads"]), []).append(result)
    rows = []
    for (partitioner, heads), members in groups.items():
        row: dict = {"partitioner": partitioner, "heads": heads, "seeds": len(members)}
        for key in ("central_accuracy", "own_share_accuracy"):
            values = [m[key] for m in members]
            row[key] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def _pm(row: dict, key: str, digits: int = 3) -> str:
    if key not in row:
        return "-"
    return f"{row[key]:.{digits}f} ± {row.get(key + '_std', 0.0):.{digits}f}"


def markdown_tables(report: dict) -> str:
    """The report's figures as markdown tables (what docs/privacy.md quotes)."""
    floor = report["floor"]
    lines = [
        f"Seeds: {report['settings']['seeds']}; mean ± standard deviation over them.",
        "",
        "Floors (no activations used): mean auxiliary digit SSIM "
        f"{floor['ssim']:.3f}, judge {floor['judge_accuracy']:.3f}; class-mean digit (labels "
        f"known) SSIM {floor['class_mean_ssim']:.3f}, judge "
        f"{floor['class_mean_judge_accuracy']:.3f}, re-identification "
        f"{floor['class_mean_reidentification']:.3f}; re-identification chance "
        f"{floor['reidentification_chance']:.3f}; the judge on the originals "
        f"{floor['judge_accuracy_on_originals']:.3f}.",
        "",
        "| cut | defense | test accuracy | SSIM | judge | re-identification | PSNR (dB) | dCor "
        "| epsilon per release |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["summary"]:
        if row["label_private"]:
            continue
        epsilon = row.get("smashed_epsilon_per_release")
        lines.append(
            f"| {row['cut']} | {row['defense']} | {_pm(row, 'test_accuracy')} "
            f"| {_pm(row, 'ssim')} | {_pm(row, 'judge_accuracy', 2)} "
            f"| {_pm(row, 'reidentification', 2)} | {row['psnr']:.2f} | {row['dcor']:.2f} "
            f"| {'-' if epsilon is None else f'{epsilon:,.0f}'} |"
        )
    linked = [r for r in report["summary"] if not r["label_private"] and "linked_ssim" in r]
    if linked:
        releases = report["settings"].get("link_epochs", LINK_EPOCHS)
        epochs = report["settings"]["epochs"]
        lines += [
            "",
            f"Releases of the last {releases} epochs averaged per example: linked by the "
            "attacker (private randomness) or by the true order (oracle: the order derived from "
            "the seed); one release for comparison.",
            "",
            f"| cut | defense | linking accuracy (chance) | linking, epoch 1 / {epochs - 1} "
            "| SSIM one / linked / oracle | judge one / linked / oracle "
            "| re-identification one / linked / oracle |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for row in linked:
            by_epoch = row.get("linking_accuracy_by_epoch", [])
            first_last = f"{by_epoch[0]:.2f} / {by_epoch[-1]:.2f}" if by_epoch else "-"
            three = {
                key: " / ".join(f"{row[a + key]:.{d}f}" for a in ("", "linked_", "oracle_linked_"))
                for key, d in (("ssim", 3), ("judge_accuracy", 2), ("reidentification", 2))
            }
            lines.append(
                f"| {row['cut']} | {row['defense']} | {_pm(row, 'linking_accuracy', 2)} "
                f"({row['linking_chance']:.3f}) | {first_last} | {three['ssim']} "
                f"| {three['judge_accuracy']} | {three['reidentification']} |"
            )
    lines += [
        "",
        "| defense | heads | test accuracy | norm AUC | cosine AUC | clustering | cosine AUC "
        "epoch 1 / last | head-forward | surrogate head |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["summary"]:
        if not row["label_private"]:
            continue
        heads = "local" if row["defense"].startswith("local-heads") else "shared"
        by_epoch = row.get("cosine_auc_by_epoch", [])
        first_last = f"{by_epoch[0]:.2f} / {by_epoch[-1]:.2f}" if by_epoch else "-"
        lines.append(
            f"| {row['defense']} | {heads} | {_pm(row, 'test_accuracy')} "
            f"| {_pm(row, 'norm_auc', 2)} | {_pm(row, 'cosine_auc', 2)} "
            f"| {_pm(row, 'cluster_accuracy', 2)} | {first_last} "
            f"| {_pm(row, 'head_forward_accuracy')} | {_pm(row, 'surrogate_head_accuracy')} |"
        )
    if report.get("heads"):
        lines += [
            "",
            "| partitioner | client heads | accuracy, central test set "
            "| accuracy, own test share |",
            "|---|---|---:|---:|",
        ]
        for row in report["heads"]:
            lines.append(
                f"| {row['partitioner']} | {row['heads']} | {_pm(row, 'central_accuracy')} "
                f"| {_pm(row, 'own_share_accuracy')} |"
            )
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(
    out: Path,
    originals: np.ndarray,
    reconstructions: dict[str, np.ndarray],
    summary: list[dict],
    floor: dict[str, float],
    heads: list[dict],
) -> list[Path]:
    """Write the report's pictures to ``out``; return their paths."""
    plt = _pyplot()
    written = []

    rows = ["original", *reconstructions]
    figure, axes = plt.subplots(
        len(rows), 10, figsize=(10, 1.05 * len(rows)), squeeze=False, layout="constrained"
    )
    for r, name in enumerate(rows):
        images = originals if name == "original" else reconstructions[name]
        for c in range(10):
            axis = axes[r][c]
            axis.imshow(images[c], cmap="gray_r", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    figure.suptitle("Private digits (top) and the decoder attack's reconstructions (one release)")
    written.append(out / "reconstructions.png")
    figure.savefig(written[-1], dpi=110)
    plt.close(figure)

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.6), layout="constrained")
    plain = [r for r in summary if not r["label_private"]]
    for cut in sorted({r["cut"] for r in plain}):
        members = sorted((r for r in plain if r["cut"] == cut), key=lambda r: r["ssim"])
        for axis, key in ((left, "ssim"), (middle, "reidentification")):
            axis.errorbar(
                [r[key] for r in members],
                [r["test_accuracy"] for r in members],
                xerr=[r[f"{key}_std"] for r in members],
                yerr=[r["test_accuracy_std"] for r in members],
                marker="o",
                label=f"cut after {cut}",
            )
            for r in members:
                axis.annotate(r["defense"], (r[key], r["test_accuracy"]), fontsize=6)
    left.axvline(floor["ssim"], color="grey", linestyle="--", label="mean-image floor")
    left.axvline(floor["class_mean_ssim"], color="black", linestyle=":", label="class-mean floor")
    left.set_xlabel("decoder attack SSIM, one release (lower leaks less)")
    left.set_ylabel("test accuracy (the app's evaluation)")
    left.set_title("Inputs: accuracy against reconstruction")
    left.legend(fontsize=7)
    chance = floor["reidentification_chance"]
    middle.axvline(chance, color="grey", linestyle="--", label="chance")
    middle.axvline(2 * chance, color="black", linestyle=":", label="2x chance")
    middle.set_xlabel("re-identification (own original nearest among same class)")
    middle.set_title("Inputs: accuracy against re-identification")
    middle.legend(fontsize=7)
    labelled = sorted((r for r in summary if r["label_private"]), key=lambda r: r["defense"])
    for key, marker in (
        ("cosine_auc", "o"),
        ("norm_auc", "s"),
        ("cluster_accuracy", "^"),
        ("head_forward_accuracy", "x"),
    ):
        right.scatter(
            [r[key] for r in labelled],
            [r["test_accuracy"] for r in labelled],
            marker=marker,
            label=key.replace("_", " "),
        )
    for r in labelled:
        right.annotate(r["defense"], (r["head_forward_accuracy"], r["test_accuracy"]), fontsize=6)
    right.set_xlabel("label attack (AUC, or share of labels recovered), worst epoch")
    right.set_title("Labels (label-private split)")
    right.legend(fontsize=7)
    written.append(out / "tradeoff.png")
    figure.savefig(written[-1], dpi=110)
    plt.close(figure)

    if labelled:
        figure, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
        for axis, key in zip(axes, _BY_EPOCH, strict=True):
            for r in labelled:
                if key in r:
                    axis.plot(range(1, len(r[key]) + 1), r[key], marker=".", label=r["defense"])
            axis.set_xlabel("epoch")
            axis.set_title(key.replace("_by_epoch", "").replace("_", " "))
            axis.legend(fontsize=7)
        figure.suptitle("Label attacks on each epoch's gradients (mean over seeds)")
        written.append(out / "labels.png")
        figure.savefig(written[-1], dpi=110)
        plt.close(figure)

    linked = [row for row in plain if "linked_reidentification" in row]
    if linked:
        figure, (left, right) = plt.subplots(1, 2, figsize=(15, 5), layout="constrained")
        defenses = sorted({row["defense"] for row in linked})
        cuts = sorted({row["cut"] for row in linked})
        for row in linked:
            series = row.get("linking_accuracy_by_epoch", [])
            left.plot(
                range(1, len(series) + 1),
                series,
                marker=".",
                color=f"C{defenses.index(row['defense']) % 10}",
                linestyle=("-", "--", ":", "-.")[cuts.index(row["cut"]) % 4],
                label=f"{row['cut']} {row['defense']}",
            )
        left.axhline(linked[0]["linking_chance"], color="grey", linestyle="--", label="chance")
        left.set_xlabel("epoch linked to the last epoch's releases")
        left.set_ylabel("linking accuracy")
        left.set_title("Linking without the order: nearest decoded release of the same label")
        left.legend(fontsize=6, ncol=2)
        x = np.arange(len(linked))
        for offset, prefix, name in (
            (-0.27, "", "one release"),
            (0.0, "linked_", "linked by the attacker"),
            (0.27, "oracle_linked_", "linked by the true order"),
        ):
            right.bar(
                x + offset,
                [row[f"{prefix}reidentification"] for row in linked],
                0.27,
                yerr=[row.get(f"{prefix}reidentification_std", 0.0) for row in linked],
                label=name,
            )
        right.axhline(2 * floor["reidentification_chance"], color="black", linestyle=":")
        right.set_xticks(
            x,
            [f"{row['cut']} {row['defense']}" for row in linked],
            fontsize=7,
            rotation=60,
            ha="right",
        )
        right.set_ylabel("re-identification")
        right.set_title("Releases averaged (dotted: 2x chance)")
        right.legend(fontsize=7)
        written.append(out / "linking.png")
        figure.savefig(written[-1], dpi=110)
        plt.close(figure)

    if heads:
        figure, axis = plt.subplots(figsize=(7, 4), layout="constrained")
        names = [f"{r['partitioner']}\n{r['heads']} heads" for r in heads]
        x = np.arange(len(heads))
        for offset, key in ((-0.2, "central_accuracy"), (0.2, "own_share_accuracy")):
            axis.bar(
                x + offset,
                [r[key] for r in heads],
                0.4,
                yerr=[r[f"{key}_std"] for r in heads],
                label=key.replace("_", " "),
            )
        axis.set_xticks(x, names, fontsize=8)
        axis.set_ylim(0.5, 1.0)
        axis.set_ylabel("test accuracy (mean over clients)")
        axis.set_title("Label-private split: client heads merged or kept on the clients")
        axis.legend(fontsize=7)
        written.append(out / "heads.png")
        figure.savefig(written[-1], dpi=110)
        plt.close(figure)
    return written


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m simulation.audit",
        description="Attack what the split server sees on the digits task, per cut and defense.",
    )
    parser.add_argument("--cuts", default="relu1,pool", help="cut layers (default: relu1,pool)")
    parser.add_argument(
        "--defenses",
        default="none,noise:0.05,noise:0.1,noise:0.2,nopeek:2",
        help="plain-split defenses: none, clip:C, noise:SIGMA (clip norm 1), nopeek:WEIGHT, "
        "dp:NOISE:CLIP",
    )
    parser.add_argument(
        "--label-defenses",
        default="label-noise:0,label-noise:0.5,local-heads:0,local-heads:0.5",
        help="label-private split (cut at pool, server to relu3): label-noise:MULTIPLIER (heads "
        "shared), local-heads:MULTIPLIER (heads kept on the clients)",
    )
    parser.add_argument("--seeds", default="0,1,2", help="seeds (default: 0,1,2)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs (default: 15)")
    parser.add_argument("--decoder-epochs", type=int, default=30)
    parser.add_argument("--attack-examples", type=int, default=300)
    parser.add_argument(
        "--link-epochs",
        type=int,
        default=LINK_EPOCHS,
        help=f"releases averaged per example by the linking attacks: those of the last N epochs "
        f"(default: {LINK_EPOCHS})",
    )
    parser.add_argument(
        "--fixed-draw",
        action="store_true",
        help="train the decoder on one fixed noise draw (the weaker attacker of earlier audits)",
    )
    parser.add_argument(
        "--heads-clients",
        type=int,
        default=0,
        help="clients of the heads experiment (shared against local heads); 0 skips it",
    )
    parser.add_argument("--heads-rounds", type=int, default=10)
    parser.add_argument("--heads-partitioners", default="iid,dirichlet")
    parser.add_argument("--out", default="outputs/audit", help="folder for the report and plots")
    parser.add_argument(
        "--quick", action="store_true", help="one seed, few configurations and epochs"
    )
    parser.add_argument(
        "--tables-only",
        action="store_true",
        help="summarize the runs of the audit.json already in --out again (floors, goals) and "
        "write tables.md; trains nothing",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.tables_only:
        # Summaries, floors and goals again from the runs already measured.
        report = json.loads((out / "audit.json").read_text())
        settings = report["settings"]
        first_seed = int(str(settings["seeds"]).split(",")[0])
        report["floor"] = floor_metrics(settings["attack_examples"], first_seed)
        runs = [AuditRun(**run) for run in report["runs"]]
        report.update(summarize(runs, report["floor"]))
        report["heads"] = summarize_heads(report.get("heads_runs", []))
        (out / "audit.json").write_text(json.dumps(report, indent=2, default=_json_number))
        (out / "tables.md").write_text(markdown_tables(report))
        print(f"wrote {out / 'audit.json'} and {out / 'tables.md'}")
        return report
    if args.quick:
        args.cuts, args.defenses, args.label_defenses = (
            "pool",
            "none,noise:0.1",
            "label-noise:0,local-heads:0",
        )
        args.seeds, args.epochs, args.decoder_epochs, args.attack_examples = "0", 3, 5, 100
        args.heads_clients, args.heads_rounds = min(args.heads_clients, 2), 1
        args.heads_partitioners = "iid"
    library_logger = logging.getLogger("flwr_splitfed")
    saved_level, threads = library_logger.level, torch.get_num_threads()
    library_logger.setLevel(logging.ERROR)  # loopback, warnings known
    # Small models: one thread is fastest, and much faster on a busy machine.
    torch.set_num_threads(1)
    try:
        return _run(args, argv, out)
    finally:
        library_logger.setLevel(saved_level)
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, argv: list[str] | None, out: Path) -> dict:
    cuts = [c for c in args.cuts.split(",") if c]
    defenses = [Defense.parse(d) for d in args.defenses.split(",") if d]
    label_defenses = [Defense.parse(d) for d in args.label_defenses.split(",") if d]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    settings = [(cut, d) for cut in cuts for d in defenses] + [("pool", d) for d in label_defenses]

    runs: list[AuditRun] = []
    shown: dict[str, np.ndarray] = {}
    for seed in seeds:
        for cut, defense in settings:
            run, reconstructions = audit_one(
                cut,
                defense,
                seed,
                epochs=args.epochs,
                decoder_epochs=args.decoder_epochs,
                attack_examples=args.attack_examples,
                fresh_draws=not args.fixed_draw,
                link_epochs=args.link_epochs,
            )
            runs.append(run)
            if seed == seeds[0] and not defense.label_private:
                shown[f"{cut} {defense}"] = reconstructions
            print(
                f"seed {seed} cut {cut:6s} {str(defense):16s} acc {run.test_accuracy:.4f} "
                f"ssim {run.ssim:.3f} judge {run.judge_accuracy:.3f} "
                f"reid {run.reidentification:.3f} dcor {run.dcor:.3f} "
                f"linking {run.linking_accuracy:.3f} (chance {run.linking_chance:.3f}) linked "
                f"ssim/judge/reid {run.linked_ssim:.3f}/{run.linked_judge_accuracy:.3f}/"
                f"{run.linked_reidentification:.3f} oracle {run.oracle_linked_ssim:.3f}/"
                f"{run.oracle_linked_judge_accuracy:.3f}/{run.oracle_linked_reidentification:.3f}"
                + (
                    f" norm-auc {run.norm_auc:.3f} cos-auc {run.cosine_auc:.3f} "
                    f"cluster {run.cluster_accuracy:.3f} head-forward "
                    f"{run.head_forward_accuracy:.3f} surrogate {run.surrogate_head_accuracy:.3f}"
                    if run.label_private
                    else ""
                )
                + f" ({run.seconds:.1f} s)",
                flush=True,
            )
    heads_results = []
    if args.heads_clients > 0:
        for seed in seeds:
            for partitioner in [p for p in args.heads_partitioners.split(",") if p]:
                for heads in ("shared", "local"):
                    started = time.perf_counter()
                    result = heads_cost(
                        heads=heads,
                        partitioner=partitioner,
                        seed=seed,
                        clients=args.heads_clients,
                        rounds=args.heads_rounds,
                    )
                    heads_results.append(
                        {"partitioner": partitioner, "heads": heads, "seed": seed, **result}
                    )
                    print(
                        f"heads seed {seed} {partitioner:9s} {heads:6s} central "
                        f"{result['central_accuracy']:.4f} own share "
                        f"{result['own_share_accuracy']:.4f} "
                        f"({time.perf_counter() - started:.1f} s)",
                        flush=True,
                    )
    floor = floor_metrics(args.attack_examples, seeds[0])
    heads_summary = summarize_heads(heads_results)
    report = {
        "command": " ".join(
            ["python -m simulation.audit", *(sys.argv[1:] if argv is None else argv)]
        ),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "clip_norm": CLIP_NORM,
        "floor": floor,
        **summarize(runs, floor),
        "heads": heads_summary,
        "runs": [asdict(run) for run in runs],
        "heads_runs": heads_results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(report, indent=2, default=_json_number))
    (out / "tables.md").write_text(markdown_tables(report))
    data = load_digits()
    private, _ = private_and_auxiliary(seeds[0])
    originals = data.train_images[private[:10], 0].numpy()
    pictures = plot(out, originals, shown, report["summary"], floor, heads_summary)
    print(
        f"floors: mean image ssim {floor['ssim']:.3f}, class mean ssim "
        f"{floor['class_mean_ssim']:.3f}, judge on mean image {floor['judge_accuracy']:.3f}, "
        f"re-identification chance {floor['reidentification_chance']:.3f}"
    )
    for kind, rows in report["goals"].items():
        for row in rows:
            print(f"goal {kind}: {row}")
    print(f"wrote {out / 'audit.json'}, " + ", ".join(str(p) for p in pictures))
    return report


def _json_number(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


if __name__ == "__main__":
    main()
