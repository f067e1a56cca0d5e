"""The Boolean DNF task (method.md): a seeded generator of DNF data sets and their clause maps.

`make_dnf("vars=32,clauses=8,k=3,...")` returns a `data.Dataset` whose `info` carries the clauses
(the clause map `--split clause` uses); see `DNF_DEFAULTS` for every setting. Pure: tensors in,
tensors out, nothing printed or written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Dataset, from_arrays, parse_spec, spec_string
from .errors import FPEError

MAX_VALUES = 1 << 28  # input values (float32) and literal tests (int64) generated at most: 1 and 2 GiB
MAX_CLAUSES = 1024  # planted sampling repairs clause by clause: time grows with clauses squared

DNF_DEFAULTS = {"vars": 32, "clauses": 8, "k": 3, "outputs": "or", "encoding": "pm1", "sampling": "planted",
                "positives": 0.5, "train": 4000, "test": 2000, "seed": 0}


@dataclass
class DNF:
    """Clause j is the AND of literals (variables[j, t] == signs[j, t]) for t < k; signs are 0/1 bits."""

    variables: torch.Tensor  # (clauses, k) int64 variable index of each literal
    signs: torch.Tensor  # (clauses, k) int64: 1 = the variable itself, 0 = its negation

    def satisfied(self, bits: torch.Tensor) -> torch.Tensor:
        """(n, vars) 0/1 -> (n, clauses) bool: which clauses hold."""
        return (bits[:, self.variables] == self.signs).all(dim=2)  # (n, clauses, k) -> (n, clauses)

    def groups(self) -> list[list[int]]:
        """Clause map: each variable goes to the first clause that uses it (disjoint when no overlap)."""
        seen: set[int] = set()
        out = []
        for row in self.variables.tolist():
            out.append(sorted(v for v in row if v not in seen))
            seen.update(row)
        return out


def make_clauses(n_vars: int, n_clauses: int, k: int, gen: torch.Generator) -> DNF:
    """Variables from one seeded permutation: disjoint blocks of k when vars >= clauses*k, else the
    permutation read cyclically (clause j takes perm[(j*k + t) mod vars]), so clauses share variables."""
    perm = torch.randperm(n_vars, generator=gen)  # (vars,)
    idx = (torch.arange(n_clauses)[:, None] * k + torch.arange(k)[None, :]) % n_vars  # (clauses, k)
    signs = torch.randint(0, 2, (n_clauses, k), generator=gen)
    return DNF(perm[idx], signs)


def _force(bits: torch.Tensor, dnf: DNF, rows: torch.Tensor, clause: int, value: bool, gen: torch.Generator) -> None:
    """Make `clause` true (set all its literals) or false (flip one random literal if it holds) in `rows`."""
    if value:
        bits[rows[:, None], dnf.variables[clause][None, :]] = dnf.signs[clause][None, :]
        return
    holds = rows[dnf.satisfied(bits[rows])[:, clause]]
    if holds.numel():
        t = torch.randint(0, dnf.variables.shape[1], (holds.numel(),), generator=gen)
        var = dnf.variables[clause][t]
        bits[holds, var] = 1 - dnf.signs[clause][t]


def sample_dnf(dnf: DNF, n: int, n_vars: int, cfg: dict, gen: torch.Generator) -> torch.Tensor:
    """(n, vars) 0/1 inputs. `uniform`: every bit a fair coin. `planted` (see `make_dnf`)."""
    bits = torch.randint(0, 2, (n, n_vars), generator=gen)  # (n, vars)
    if cfg["sampling"] == "uniform":
        return bits
    n_clauses = dnf.variables.shape[0]
    if cfg["outputs"] == "or":
        positive = torch.rand(n, generator=gen) < cfg["positives"]
        chosen = torch.randint(0, n_clauses, (n,), generator=gen)
        for j in range(n_clauses):
            _force(bits, dnf, torch.nonzero(positive & (chosen == j)).flatten(), j, True, gen)
        for _ in range(100):  # repair negatives; one round when clauses are disjoint
            bad = torch.nonzero(~positive & dnf.satisfied(bits).any(dim=1)).flatten()
            if not bad.numel():
                break
            for j in range(n_clauses):
                _force(bits, dnf, bad, j, False, gen)
        return bits
    for j in range(n_clauses):
        plant = torch.rand(n, generator=gen) < cfg["positives"]
        _force(bits, dnf, torch.nonzero(plant).flatten(), j, True, gen)
        _force(bits, dnf, torch.nonzero(~plant).flatten(), j, False, gen)
    return bits


def _check_dnf(cfg: dict) -> None:
    problems = [f"{key} must be >= 1, got {cfg[key]}" for key in ("vars", "clauses", "k", "train", "test") if cfg[key] < 1]
    if cfg["k"] > cfg["vars"]:
        problems.append(f"k={cfg['k']} literals per clause needs at least that many vars (vars={cfg['vars']})")
    choices = {"outputs": ("or", "clauses"), "encoding": ("pm1", "01"), "sampling": ("planted", "uniform")}
    problems += [f"{key} must be one of {'/'.join(ok)}, got {cfg[key]!r}" for key, ok in choices.items() if cfg[key] not in ok]
    if not 0 < cfg["positives"] < 1:
        problems.append(f"positives must be a fraction in (0, 1), got {cfg['positives']}")
    values = (cfg["train"] + cfg["test"]) * cfg["vars"]
    literals = max(cfg["train"], cfg["test"]) * cfg["clauses"] * cfg["k"]  # DNF.satisfied's (n, clauses, k) block
    if not problems and (values > MAX_VALUES or literals > MAX_VALUES):  # refused before any allocation
        problems.append(f"(train + test) x vars = {values:,} input values and samples x clauses x k = {literals:,} "
                        f"literal tests: fpe generates at most {MAX_VALUES:,} of each")
    if not problems and cfg["clauses"] > MAX_CLAUSES:
        problems.append(f"clauses={cfg['clauses']:,}: fpe generates at most {MAX_CLAUSES:,}")
    if problems:
        raise FPEError("dnf: " + "; ".join(problems), "e.g. dnf:vars=32,clauses=8,k=3,outputs=or,seed=0")


def make_dnf(spec: str = "") -> Dataset:
    """The Boolean DNF task from a `key=value,...` spec (defaults: `DNF_DEFAULTS`).

    Sampling `planted` balances the labels: with outputs=or, each sample is positive with probability
    `positives` (one random clause forced true, the rest random) and negatives are repaired (a random
    literal of every true clause flipped, repeated while any clause holds); with outputs=clauses, each
    clause is independently forced true with probability `positives`, else made false. Labels are
    always computed from the final inputs, so they are exact whatever the sampling did.
    """
    cfg = parse_spec(spec, DNF_DEFAULTS, "dnf")
    _check_dnf(cfg)
    gen = torch.Generator().manual_seed(cfg["seed"])
    dnf = make_clauses(cfg["vars"], cfg["clauses"], cfg["k"], gen)
    arrays = {}
    for split in ("train", "test"):
        bits = sample_dnf(dnf, cfg[split], cfg["vars"], cfg, gen)  # (n, vars)
        sat = dnf.satisfied(bits)  # (n, clauses)
        arrays[f"y_{split}"] = (sat.any(dim=1).long() if cfg["outputs"] == "or" else sat.float()).numpy()
        arrays[f"x_{split}"] = (bits * 2 - 1 if cfg["encoding"] == "pm1" else bits).float().numpy()
    info = {"generator": "fpe-dnf-v1", **cfg, "overlap": cfg["vars"] < cfg["clauses"] * cfg["k"],
            "literals": [[[v, s] for v, s in zip(vs, ss)] for vs, ss in zip(dnf.variables.tolist(), dnf.signs.tolist())],
            "groups": dnf.groups(), "positive_rate_train": float(arrays["y_train"].mean())}
    return from_arrays(spec_string("dnf", cfg), arrays, 2 if cfg["outputs"] == "or" else cfg["clauses"], info)
