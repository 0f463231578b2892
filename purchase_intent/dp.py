"""Differential privacy: user-level DP-SGD, with Opacus's optimizer and Rényi accountant.

The guarantee is **(ε, δ)-DP per user**: adding or removing *all* of one user's training examples
(one per cutoff) changes the distribution of the trained weights by at most (ε, δ). Each step:

1. users (not examples) are Poisson-sampled, each independently with rate ``q = users_per_step /
   n_users``; of each sampled user at most ``examples_per_user`` of their examples are drawn;
2. the gradient of the user's *summed* loss over those examples is computed per user
   (``torch.func``: ``vmap(grad(...))`` over users, so the whole contribution of a user is one row);
3. Opacus's :class:`~opacus.optimizers.DPOptimizer` clips each user's gradient to
   ``max_grad_norm``, sums them, adds Gaussian noise of std ``noise_multiplier * max_grad_norm``
   and divides by the expected number of users per step, then Adam steps.

One user changes one clipped row of one step's sum, so this is the Poisson-subsampled Gaussian
mechanism at the user level; Opacus's RDP accountant composes it over the steps. The noise
multiplier is calibrated before training (``get_noise_multiplier``) so that the accountant's ε
at the end is at most the requested one; the ε actually spent is recorded.

Opacus's own per-sample hooks (``GradSampleModule``) give one gradient per *example*; summing a
user's examples before clipping is what makes the accounting user-level, hence ``torch.func``.
The model's forward runs in eval mode (no dropout; the fast embedding backward is a custom
autograd function that ``vmap`` cannot batch): DP models are built with dropout 0.

What the model sees must not leak either: callers fix the feature transform from public constants
(see ``models/classifier.py`` and ``models/baselines.py``), never from exact train statistics, or
standardise it with a DP release of the mean and scale (:mod:`purchase_intent.dp_tabular`) whose
Gaussian mechanism is one more step in the same accountant (``DPConfig.tabular_share``, see
:func:`plan`); no validation data selects or calibrates a DP model. Model-agnostic: any ``forward(batch) -> (logits,
_)`` module, or any model with a per-example loss (the self-supervised pretraining of the encoder,
:mod:`purchase_intent.models.dp_pretraining`).
"""
from __future__ import annotations

import math
import secrets
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

# the noise on one step's averaged gradient (noise_multiplier / expected users per step, in units
# of the clip norm) above which the budget is refused: the gradient would drown in noise
MAX_NOISE_RATIO = 0.1


class PrivacyBudgetError(ValueError):
    """The requested (ε, δ) is invalid or cannot be met with the data."""


@dataclass
class DPConfig:
    """How a model is trained with user-level DP-SGD (saved with the run)."""

    epsilon: float  # the budget ε per user
    delta: Optional[float] = None  # None = 1 / n_users
    max_grad_norm: float = 1.0  # clip norm C of each user's summed gradient
    users_per_step: int = 512  # expected users per step (Poisson sampling)
    examples_per_user: int = 4  # most examples of one user in one step
    epochs: float = 10.0  # expected passes over the users
    lr: float = 2e-3  # Adam on the noisy gradient
    accountant: str = "rdp"
    # share of ε for the DP release of the tabular features' mean and scale (dp_tabular.py); 0 = none
    tabular_share: float = 0.0
    # None: the noise and the users sampled at each step are drawn from the operating system's entropy, which
    # nobody can replay (the guarantee assumes them secret); an int makes them reproducible, and whoever knows
    # it (it is saved with the run) could replay the noise: for tests and experiments only
    noise_seed: Optional[int] = None


def noise_rng(cfg: DPConfig, stream: int) -> np.random.Generator:
    """The generator of one of a DP fit's secret random streams (0: the users sampled at each step,
    1: the release of the tabular statistics, 2: the seed of the training noise's torch generator): from
    ``cfg.noise_seed`` when set, else from the operating system's entropy (``secrets``), so that no seed
    saved with the run replays the noise."""
    seed = secrets.randbits(128) if cfg.noise_seed is None else int(cfg.noise_seed)
    return np.random.default_rng([seed, stream])


@dataclass
class DPPlan:
    """The noise and sampling that meet a :class:`DPConfig`'s budget on ``n_users`` users."""

    n_users: int
    delta: float
    sample_rate: float
    steps: int
    noise_multiplier: float
    # the release of the tabular statistics before training (one Gaussian mechanism, sampling rate 1)
    release_noise_multiplier: Optional[float] = None

    @property
    def expected_users(self) -> float:
        return self.sample_rate * self.n_users


def check_budget(epsilon, delta=None) -> None:
    """Raise :class:`PrivacyBudgetError` for ε ≤ 0 (or not a number), or δ outside (0, 1)."""
    try:
        eps = float(epsilon)
    except (TypeError, ValueError):
        raise PrivacyBudgetError(f"dp_epsilon must be a number, got {epsilon!r}") from None
    if not eps > 0 or math.isnan(eps):
        raise PrivacyBudgetError(f"dp_epsilon must be > 0, got {epsilon!r} (use no dp_epsilon for a non-private model)")
    if math.isinf(eps):
        raise PrivacyBudgetError("dp_epsilon=inf is no privacy: leave dp_epsilon out for a non-private model")
    if delta is not None:
        try:
            d = float(delta)
        except (TypeError, ValueError):
            raise PrivacyBudgetError(f"dp_delta must be a number, got {delta!r}") from None
        if not 0 < d < 1:
            raise PrivacyBudgetError(f"dp_delta must be in (0, 1), got {delta!r} (default 1/n_users)")


def check_share(share) -> float:
    """``dp_tabular_share`` as a float in (0, 1), or :class:`PrivacyBudgetError`."""
    try:
        x = float(share)
    except (TypeError, ValueError):
        raise PrivacyBudgetError(f"dp_tabular_share must be a number in (0, 1), got {share!r}") from None
    if not 0 < x < 1:
        raise PrivacyBudgetError(f"dp_tabular_share must be in (0, 1) (the share of dp_epsilon spent on the "
                                 f"tabular statistics), got {share!r}")
    return x


def _epsilon(mechanisms: list[tuple[float, float, int]], delta: float) -> float:
    """The RDP accountant's ε of ``(noise_multiplier, sample_rate, steps)`` mechanisms composed."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(mechanisms)
    with warnings.catch_warnings():  # the search tries noise levels whose best order is the largest alpha
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(accountant.get_epsilon(delta=delta))


def _calibrate(target: float, delta: float, sample_rate: float, steps: int,
               before: tuple[tuple[float, float, int], ...] = ()) -> float:
    """The smallest noise multiplier (to 1% of ``target``) whose ``steps`` at ``sample_rate``, composed
    with the mechanisms ``before``, spend at most ``target``; inf when none does (as Opacus's
    ``get_noise_multiplier``, with the earlier mechanisms in the same accountant)."""
    def eps(sigma: float) -> float:
        return _epsilon([*before, (sigma, sample_rate, steps)], delta)

    low, high = 0.0, 10.0
    while eps(high) > target:
        low, high = high, 2 * high
        if high > 1e6:
            return math.inf
    for _ in range(100):  # ε is continuous in the noise: bisection gets within 1% long before this
        mid = (low + high) / 2
        e = eps(mid)
        if e <= target:
            high = mid
            if target - e < 0.01 * target:
                break
        else:
            low = mid
    return high


def plan(cfg: DPConfig, n_users: int) -> DPPlan:
    """Calibrate the noise multiplier for ``cfg`` on ``n_users`` users, or refuse.

    With ``cfg.tabular_share`` > 0 the plan also holds the noise of the release of the tabular
    statistics (:mod:`purchase_intent.dp_tabular`): calibrated so that the release alone spends
    ``tabular_share * epsilon``, and the training's noise then so that release and training composed
    in the RDP accountant spend at most ``epsilon`` (Rényi composition is tighter than adding the
    two ε, so the training gives up less than its share: at ε = 8 and share 0.1 on 7,597 users the
    training's noise did not change).

    Raises
    ------
    PrivacyBudgetError
        For an invalid budget or settings, and when meeting the budget needs so much noise that a
        step's averaged gradient would be mostly noise (``noise_multiplier / expected users per
        step > MAX_NOISE_RATIO``): the data has too few users for this ε.
    """
    check_budget(cfg.epsilon, cfg.delta)
    if not cfg.max_grad_norm > 0:
        raise PrivacyBudgetError(f"dp_max_grad_norm must be > 0, got {cfg.max_grad_norm!r}")
    if int(cfg.users_per_step) < 1 or int(cfg.examples_per_user) < 1 or not cfg.epochs > 0:
        raise PrivacyBudgetError("dp_users_per_step, dp_examples_per_user and dp_epochs must be positive")
    if n_users < 2:
        raise PrivacyBudgetError(f"differential privacy needs train examples of at least 2 users, got {n_users}")
    delta = float(cfg.delta) if cfg.delta is not None else 1.0 / n_users
    q = min(1.0, int(cfg.users_per_step) / n_users)
    steps = max(1, int(math.ceil(float(cfg.epochs) / q)))
    release = None
    if cfg.tabular_share:
        share = check_share(cfg.tabular_share)
        if cfg.accountant != "rdp":
            raise PrivacyBudgetError("the DP release of the tabular statistics is accounted with the rdp accountant")
        release = _calibrate(share * float(cfg.epsilon), delta, 1.0, 1)
        if math.isinf(release):
            raise PrivacyBudgetError(
                f"dp_tabular_share={share:g} of dp_epsilon={cfg.epsilon:g} (delta={delta:.2g}) is too small a "
                "budget for the release of the tabular statistics (tabular_scaling=\"dp\", a DP fit's default): "
                "the accountant cannot certify one Gaussian release below it; give a larger dp_epsilon or "
                "dp_tabular_share, or --param tabular_scaling=fixed (public constants, no release)")
        sigma = _calibrate(float(cfg.epsilon), delta, q, steps, before=((release, 1.0, 1),))
    else:
        from opacus.accountants.utils import get_noise_multiplier

        try:
            sigma = get_noise_multiplier(target_epsilon=float(cfg.epsilon), target_delta=delta, sample_rate=q,
                                         steps=steps, accountant=cfg.accountant,
                                         epsilon_tolerance=0.01 * cfg.epsilon)
        except ValueError:
            sigma = math.inf
    ratio = sigma / (q * n_users)
    if ratio > MAX_NOISE_RATIO:
        after = (f" after the release of the tabular statistics (dp_tabular_share={cfg.tabular_share:g})"
                 if release is not None else "")
        raise PrivacyBudgetError(
            f"dp_epsilon={cfg.epsilon:g} (delta={delta:.2g}) cannot be met with {n_users:,} train users{after}: "
            f"{steps} steps of ~{q * n_users:.0f} users need noise {sigma:.3g}x the clip norm, "
            f"{ratio:.2f} of it on the averaged gradient (at most {MAX_NOISE_RATIO}); "
            "give a larger dp_epsilon, fewer dp_epochs, or data with more users")
    return DPPlan(n_users=int(n_users), delta=delta, sample_rate=q, steps=steps, noise_multiplier=float(sigma),
                  release_noise_multiplier=release)


class UserSampler:
    """Poisson sampling of users, then at most ``k`` random examples of each sampled user.

    ``groups`` (n,) holds the user of each example (any hashable values).
    """

    def __init__(self, groups: np.ndarray, k: int, rng: np.random.Generator):
        users, inverse = np.unique(np.asarray(groups), return_inverse=True)
        self.n_users, self.k, self.rng = len(users), int(k), rng
        self.order = np.argsort(inverse, kind="stable")  # example rows grouped by user
        counts = np.bincount(inverse, minlength=self.n_users)
        self.starts, self.counts = np.concatenate([[0], np.cumsum(counts)[:-1]]), counts

    def sample(self, q: float) -> tuple[np.ndarray, np.ndarray]:
        """Rows (U, k) and weights (U, k) (0 = padding) of one step's users."""
        chosen = np.flatnonzero(self.rng.random(self.n_users) < q)
        rows = np.zeros((len(chosen), self.k), dtype=np.int64)
        weights = np.zeros((len(chosen), self.k), dtype=np.float32)
        for i, u in enumerate(chosen):
            mine = self.order[self.starts[u]:self.starts[u] + self.counts[u]]
            if len(mine) > self.k:
                mine = self.rng.choice(mine, self.k, replace=False)
            rows[i, :len(mine)], rows[i, len(mine):] = mine, mine[0]  # padding repeats a row, weight 0
            weights[i, :len(mine)] = 1.0
        return rows, weights


class _Forward(nn.Module):
    """``fn(net, batch) -> logits`` as a module, so that ``functional_call`` can swap ``net``'s weights."""

    def __init__(self, net: nn.Module, fn: Callable[[nn.Module, dict], torch.Tensor]):
        super().__init__()
        self.net, self.fn = net, fn

    def forward(self, batch: dict) -> torch.Tensor:
        return self.fn(self.net, batch)


def train_dp(model: nn.Module, data: dict[str, np.ndarray], groups: np.ndarray, cfg: DPConfig, dp_plan: DPPlan,
             collate: Callable[[dict, np.ndarray], dict[str, torch.Tensor]], seed: int = 0,
             progress: bool = False, logits: Optional[Callable[[nn.Module, dict], torch.Tensor]] = None,
             loss: Optional[Callable[[nn.Module, dict], torch.Tensor]] = None) -> dict:
    """Train ``model`` in place with user-level DP-SGD; return the privacy record.

    ``data`` holds equal-length arrays with ``"label"``; ``collate(data, rows)`` turns rows into a
    batch for ``model(batch) -> (logits, _)``, or for ``logits(model, batch)`` when given (the same
    function written with ops that ``vmap`` batches natively, for speed), whose BCE against the
    labels is the loss. A self-supervised model gives ``loss(model, batch) -> (k,)`` instead: the
    loss of each of the batch's k rows (one user's), and ``data`` needs no ``"label"``; ``collate``
    may then draw the objective's random masks (with torch's generator, outside ``vmap``). The
    record (JSON-safe) has the accountant's ``epsilon`` spent, the requested ``epsilon_target``,
    ``delta``, the noise and sampling, and ``unit: "user"``.
    """
    from opacus.accountants import create_accountant
    from opacus.optimizers import DPOptimizer

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    sampler = UserSampler(groups, cfg.examples_per_user, noise_rng(cfg, 0))  # which users: secret, as the noise
    if sampler.n_users != dp_plan.n_users:
        raise ValueError(f"the plan is for {dp_plan.n_users} users, the data has {sampler.n_users}")
    model.eval()  # dropout is 0 in DP models; eval mode keeps every op batchable by vmap
    call = _Forward(model, loss or logits or (lambda net, batch: net(batch)[0]))
    names = [n for n, p in call.named_parameters() if p.requires_grad]
    params = dict(call.named_parameters())
    buffers = dict(call.named_buffers())
    labels = np.asarray(data["label"], dtype=np.float32) if loss is None else np.zeros(len(groups), np.float32)
    generator = torch.Generator().manual_seed(int(noise_rng(cfg, 2).integers(2 ** 63)))  # the noise: secret
    opt = DPOptimizer(torch.optim.Adam([params[n] for n in names], lr=cfg.lr),
                      noise_multiplier=dp_plan.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
                      expected_batch_size=max(1, int(round(dp_plan.expected_users))), loss_reduction="mean",
                      generator=generator)
    accountant = create_accountant(cfg.accountant)
    if dp_plan.release_noise_multiplier is not None:  # the tabular statistics, released before training
        accountant.step(noise_multiplier=dp_plan.release_noise_multiplier, sample_rate=1.0)

    def user_loss(p: dict, batch: dict, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        z = functional_call(call, ({**buffers, **p},), (batch,))  # (k,) logits (or losses) of one user's examples
        per_example = z.float() if loss is not None else F.binary_cross_entropy_with_logits(z.float(), y,
                                                                                          reduction="none")
        return (per_example * w).sum()

    per_user = vmap(grad(user_loss), in_dims=(None, 0, 0, 0))
    # attention as plain matmuls (vmap batches them; the fused CPU kernel runs in a loop over users)
    with warnings.catch_warnings(), sdpa_kernel(SDPBackend.MATH):
        warnings.filterwarnings("ignore", message="There is a performance drop")
        frozen = {n: p.detach() for n, p in params.items() if n in names}
        for step in range(dp_plan.steps):
            rows, w = sampler.sample(dp_plan.sample_rate)  # (U, k)
            U, k = rows.shape
            if U == 0:  # an empty Poisson draw still takes a step: noise only
                grads = {n: params[n].new_zeros((0, *params[n].shape)) for n in names}
            else:
                batch = collate(data, rows.ravel())
                batch = {key: v.reshape(U, k, *v.shape[1:]) for key, v in batch.items()}  # (U, k, ...)
                y = torch.from_numpy(labels[rows])  # (U, k)
                for n in names:
                    frozen[n] = params[n].detach()
                grads = per_user(frozen, batch, y, torch.from_numpy(w))  # name -> (U, *shape)
            for n in names:
                params[n].grad_sample = grads[n]
            opt.step()
            opt.zero_grad(set_to_none=True)
            accountant.step(noise_multiplier=dp_plan.noise_multiplier, sample_rate=dp_plan.sample_rate)
            if progress and (step + 1) % max(1, dp_plan.steps // 10) == 0:
                print(f"DP step {step + 1}/{dp_plan.steps}: {U} users, "
                      f"epsilon so far {accountant.get_epsilon(delta=dp_plan.delta):.3f}", flush=True)
    for n in names:
        params[n].grad_sample = None
        params[n].summed_grad = None
    eps = float(accountant.get_epsilon(delta=dp_plan.delta))
    return {"unit": "user", "guarantee": f"({eps:.3g}, {dp_plan.delta:.2g})-DP per user",
            "epsilon": eps, "epsilon_target": float(cfg.epsilon), "delta": dp_plan.delta,
            "accountant": cfg.accountant, "mechanism": "DP-SGD (Opacus DPOptimizer), Poisson-sampled users, "
            "per-user clipping of the summed gradient",
            "noise_multiplier": dp_plan.noise_multiplier, "sample_rate": dp_plan.sample_rate,
            "steps": dp_plan.steps, "n_users": dp_plan.n_users, "config": asdict(cfg),
            "noise": ("drawn from the operating system's entropy (not replayable)" if cfg.noise_seed is None else
                      "seeded by noise_seed (replayable by whoever knows it: not for data that must stay private)"),
            **({"release_noise_multiplier": dp_plan.release_noise_multiplier,
                "release_epsilon_alone": _epsilon([(dp_plan.release_noise_multiplier, 1.0, 1)], dp_plan.delta)}
               if dp_plan.release_noise_multiplier is not None else {}),
            "seconds": round(time.perf_counter() - t0, 2)}
