"""Observers of AIS runs: chain summaries, full chain records and progress bars.

The annealing loop (:func:`pyro_mi.samplers.anneal`) records nothing; the AIS runner
(:func:`pyro_mi.bounds.ais.run_chains`) passes every step to observers called as
``observer(key, state, info)``, where ``key`` names the chunk of chains
(``(job, chunk index)``), ``state`` is the :class:`~pyro_mi.samplers.AISState` and
``info`` the :class:`~pyro_mi.samplers.StepInfo`. An observer's ``data`` (a dict keyed
by chunk) is what a checkpoint saves and restores, so a resumed run records the same.

* :class:`ChainSummary` (always on): per chain, the mean acceptance probability, the
  number of divergent transitions: memory O(C N), flat in T.
* :class:`ChainRecorder` (``record=True`` / ``--save-chains``): per-step statistics
  (T, C, N) and positions at about ``max_draws`` thinned steps, for ArviZ.
* :class:`ProgressBar`: a tqdm bar per chunk.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

STATS = ("accept_prob", "step_size", "diverging", "log_weight_increment")
#: a chain counts as diverged when more than this fraction of its transitions diverged
DIVERGED = 0.1


def record_steps(num_steps: int, max_draws: int) -> list[int]:
    """Annealing steps j (1..T) at which positions are kept: about ``max_draws`` evenly spaced, T included."""
    thin = max(1, -(-num_steps // max(1, max_draws)))
    steps = list(range(thin, num_steps + 1, thin))
    if not steps or steps[-1] != num_steps:
        steps.append(num_steps)
    return steps


class ChainSummary:
    """Running per-chain statistics: ``data[key] = {"accept_sum", "transitions", "divergences",
    "moves"}``: the summed acceptance probability (C, N) float, the number of transitions, and
    the divergent and accepted transitions (C, N) int."""

    def __init__(self):
        self.data: dict = {}

    def __call__(self, key, state, info) -> None:
        if info.hmc is None:
            return
        d = self.data.get(key)
        if d is None or state.step == 1:
            zeros = torch.zeros_like(state.log_weights)
            d = self.data[key] = {"accept_sum": zeros, "transitions": 0, "divergences": zeros.long(),
                                  "moves": zeros.long()}
        d["accept_sum"] = d["accept_sum"] + info.hmc.accept_prob
        d["transitions"] += 1
        d["divergences"] = d["divergences"] + info.hmc.diverging.long()
        d["moves"] = d["moves"] + info.hmc.accepted.long()

    def totals(self, keys) -> dict:
        """Over the chunks ``keys`` (``(job, chunk, block)``; blocks in order of their points):
        ``accept_rate`` (mean acceptance probability of all transitions), ``divergences`` (count
        of divergent transitions), ``divergent_transition_fraction`` and
        ``divergent_chain_fraction`` (the fraction of chains, per data point, that diverged in
        more than :data:`DIVERGED` of their transitions: occasional divergences at the edge of
        the leapfrog's stability are part of a well-tuned kernel and harmless, since they are
        rejected), ``stuck_chain_fraction`` (chains that never accepted a move), and per data
        point (N,) the counts ``divergent_chains`` and ``stuck_chains`` and the mean acceptance
        probability ``accept_per_point``."""
        parts = [self.data[k] for k in keys if k in self.data]
        if not parts:
            return {"accept_rate": None, "divergences": 0, "divergent_transition_fraction": 0.0,
                    "divergent_chain_fraction": 0.0, "stuck_chain_fraction": 0.0}
        acc = sum(float(p["accept_sum"].sum()) for p in parts)
        n = sum(p["transitions"] * p["accept_sum"].numel() for p in parts)
        rate = torch.cat([(p["divergences"] / p["transitions"]).reshape(-1) for p in parts])
        stuck = torch.cat([(p["moves"] == 0).reshape(-1) for p in parts])
        per_point = {}
        blocks = sorted({k[-1] for k in keys if k in self.data})
        for name, of in (("divergent_chains", lambda p: (p["divergences"] / p["transitions"] > DIVERGED).long()),
                         ("stuck_chains", lambda p: (p["moves"] == 0).long()),
                         ("accept_sum", lambda p: p["accept_sum"]), ("transitions", lambda p: p["transitions"] +
                                                                      0 * p["accept_sum"])):
            per_point[name] = torch.cat([sum(of(self.data[k]).sum(0) for k in keys if k in self.data and k[-1] == b)
                                         for b in blocks])
        per_point["accept_per_point"] = per_point.pop("accept_sum") / per_point.pop("transitions")
        return {
            "accept_rate": acc / n if n else None,
            "divergences": sum(int(p["divergences"].sum()) for p in parts),
            "divergent_transition_fraction": float(rate.double().mean()),
            "divergent_chain_fraction": float((rate > DIVERGED).double().mean()),
            "stuck_chain_fraction": float(stuck.double().mean()),
            **per_point,
        }


class ChainRecorder:
    """Full records for ArviZ: ``data[key] = {"stats": {name: (T, C, N)}, "states": (R, C, N, D)}``
    with the positions at the steps :func:`record_steps` (T, max_draws)."""

    def __init__(self, num_steps: int, max_draws: int = 100):
        self.num_steps = num_steps
        self.steps = record_steps(num_steps, max_draws)
        self._row = {j: i for i, j in enumerate(self.steps)}
        self.data: dict = {}

    def __call__(self, key, state, info) -> None:
        d = self.data.get(key)
        z = state.hmc.z
        if d is None or state.step == 1:
            T, (C, N, D) = self.num_steps, z.shape
            d = self.data[key] = {
                "stats": {
                    "accept_prob": z.new_full((T, C, N), float("nan")),
                    "step_size": z.new_full((T, C, N), float("nan")),
                    "diverging": torch.zeros((T, C, N), dtype=torch.bool, device=z.device),
                    "log_weight_increment": z.new_zeros((T, C, N)),
                },
                "states": z.new_zeros((len(self.steps), C, N, D)),
            }
        j = state.step
        s = d["stats"]
        s["log_weight_increment"][j - 1] = info.log_weight_increment
        s["step_size"][j - 1] = info.step_size
        if info.hmc is not None:
            s["accept_prob"][j - 1] = info.hmc.accept_prob
            s["diverging"][j - 1] = info.hmc.diverging
        if j in self._row:
            d["states"][self._row[j]] = z


class ProgressBar:
    """One tqdm bar over every annealing step of a run's bound-bearing chunks, all blocks
    together (``total`` of them); the pilot's steps show as the bar's postfix only."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.enabled = total, enabled
        self.key, self.bar = None, None

    def __call__(self, key, state, info) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(total=self.total, desc="AIS", leave=False, unit="step")
        if key != self.key:
            self.key = key
            self.bar.set_postfix_str(f"{key[0]} (block {key[-1] + 1})", refresh=False)
        if key[0] != "pilot":
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
