"""``fedtune privacy ...``: epsilon, calibration and ledger reports from the command line."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedtune.privacy.accountants import AccountingError, available_accountants, get_accountant
from fedtune.privacy.calibration import DEFAULT_ACCOUNTANT, calibrate_noise, certifier, smallest_sigma
from fedtune.privacy.events import SubsampledGaussianEvent, check_delta, check_epsilon
from fedtune.privacy.ledger import PrivacyLedger

__all__ = ["add_parsers"]


def _accountant_list(value: str) -> list[str]:
    # names are checked by get_accountant in the handlers, so a bad one gets main's one-line error
    return [v.strip() for v in value.split(",") if v.strip()]


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``privacy epsilon|calibrate|ledger`` to the ``fedtune`` command."""
    privacy = subparsers.add_parser("privacy", help="privacy accounting: epsilon, noise calibration, ledgers")
    sub = privacy.add_subparsers(dest="privacy_command", required=True)

    eps = sub.add_parser("epsilon", help="epsilon of a Poisson-subsampled Gaussian mechanism, per accountant")
    eps.add_argument("--q", type=float, required=True, help="Poisson sampling rate in (0, 1]")
    eps.add_argument("--sigma", type=float, required=True, help="noise multiplier > 0")
    eps.add_argument("--steps", type=int, required=True, help="number of steps >= 1")
    eps.add_argument("--delta", type=float, required=True, help="delta in (0, 1)")
    eps.add_argument("--accountants", type=_accountant_list, default=None, help="comma-separated subset (default: all)")
    eps.add_argument("--json", action="store_true", help="machine-readable output")
    eps.set_defaults(handler=_epsilon)

    cal = sub.add_parser("calibrate", help="smallest noise multiplier meeting (epsilon, delta), certified with pld")
    cal.add_argument("--epsilon", type=float, required=True, help="target epsilon > 0")
    cal.add_argument("--delta", type=float, required=True, help="delta in (0, 1)")
    cal.add_argument("--q", type=float, required=True, help="Poisson sampling rate in (0, 1]")
    cal.add_argument("--steps", type=int, required=True, help="number of steps >= 1")
    cal.add_argument(
        "--accountant", default=DEFAULT_ACCOUNTANT, help=f"calibrating accountant (default {DEFAULT_ACCOUNTANT})"
    )
    cal.add_argument(
        "--accountants",
        type=_accountant_list,
        default=None,
        help="accountants for the per-accountant table (default: all)",
    )
    cal.add_argument("--json", action="store_true", help="machine-readable output")
    cal.set_defaults(handler=_calibrate)

    led = sub.add_parser("ledger", help="per-client table and composed epsilon of a privacy ledger")
    led.add_argument("path", help="ledger JSON file (e.g. OUT/ledger.json)")
    led.add_argument("--accountant", default=None, help="re-check with this accountant (default: the ledger's)")
    led.add_argument("--delta", type=float, default=None, help="report at this delta (default: the ledger's)")
    led.add_argument("--json", action="store_true", help="machine-readable output")
    led.set_defaults(handler=_ledger)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4f}"
    return "-" if value is None else str(value)


def _epsilon(args: argparse.Namespace) -> int:
    event = SubsampledGaussianEvent(args.q, args.sigma, args.steps)
    delta = check_delta(args.delta)
    rows = []
    for name in args.accountants or available_accountants():
        acc = get_accountant(name)
        start = time.perf_counter()
        try:
            eps: float | None = acc.get_epsilon(event, delta)
            error = None
        except (AccountingError, OverflowError) as err:
            eps, error = None, str(err)
        rows.append(
            {
                "name": name,
                "epsilon": eps,
                "kind": acc.kind,
                "seconds": time.perf_counter() - start,
                **({"error": error} if error else {}),
            }
        )
    if args.json:
        print(
            json.dumps(
                {
                    "q": event.sampling_rate,
                    "sigma": event.noise_multiplier,
                    "steps": event.steps,
                    "delta": delta,
                    "accountants": rows,
                },
                indent=2,
            )
        )
    else:
        print(
            f"epsilon at delta = {delta:g} for q = {event.sampling_rate:g}, "
            f"sigma = {event.noise_multiplier:g}, steps = {event.steps}"
        )
        print(
            _table(
                ["accountant", "epsilon", "kind", "seconds"],
                [[r["name"], r["epsilon"], r["kind"], r["seconds"]] for r in rows],
            )
        )
        print("upper-bound: a certified guarantee; estimate: an approximation with no certified error bound.")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    target = check_epsilon(args.epsilon)
    delta = check_delta(args.delta)
    SubsampledGaussianEvent(args.q, 1.0, args.steps)
    chosen = calibrate_noise(target, delta, args.q, args.steps, accountant=args.accountant)
    cert = certifier()
    per: list[dict[str, Any]] = []
    for name in args.accountants or available_accountants():
        try:
            sigma = smallest_sigma(get_accountant(name), target, delta, args.q, args.steps)
            per.append(
                {
                    "name": name,
                    "sigma": sigma,
                    "certified_epsilon": cert.get_epsilon(SubsampledGaussianEvent(args.q, sigma, args.steps), delta),
                }
            )
        except (AccountingError, OverflowError) as err:
            per.append({"name": name, "sigma": None, "certified_epsilon": None, "error": str(err)})
    if args.json:
        print(
            json.dumps(
                {
                    "epsilon": target,
                    "delta": delta,
                    "q": args.q,
                    "steps": args.steps,
                    "sigma": chosen.sigma,
                    "sigma_estimate": chosen.sigma_estimate,
                    "accountant": chosen.accountant,
                    "certified_epsilon": chosen.certified_epsilon,
                    "per_accountant": per,
                },
                indent=2,
            )
        )
    else:
        print(f"noise multiplier for epsilon = {target:g}, delta = {delta:g}, q = {args.q:g}, steps = {args.steps}")
        print(
            _table(
                ["accountant", "sigma", f"certified epsilon ({certifier().name})"],
                [[p["name"], p["sigma"], p["certified_epsilon"]] for p in per],
            )
        )
        verdict = "meets" if chosen.certified_epsilon is not None and chosen.certified_epsilon <= target else "MISSES"
        print(
            f"\nchosen: sigma = {chosen.sigma:.4f} ({chosen.accountant} asked for {chosen.sigma_estimate:.4f}; "
            f"certified pld epsilon {chosen.certified_epsilon:.4f} {verdict} the target)"
        )
        over = [
            p["name"]
            for p in per
            if p["certified_epsilon"] is not None and p["certified_epsilon"] > target * (1 + 1e-6)
        ]
        if over:
            print(
                f"warning: the sigma asked for by {', '.join(over)} does NOT meet the target under the certified bound"
            )
    return 0


def _ledger_path(path: str) -> Path:
    """``path`` itself, or the ledger.json of a run (or client state) folder."""
    given = Path(path)
    if given.is_dir():
        if (given / "ledger.json").is_file():
            return given / "ledger.json"
        raise ValueError(f"{path} is a folder without a ledger.json; pass a ledger file or the --out folder of a run")
    return given  # PrivacyLedger.load says if it is missing


def _ledger(args: argparse.Namespace) -> int:
    args.path = str(_ledger_path(args.path))
    ledger = PrivacyLedger.load(args.path)
    if args.delta is not None:
        ledger.delta = check_delta(args.delta)
    name = args.accountant or ledger.accountant
    rows = ledger.report(name)
    composed = ledger.composed_epsilon()
    client_level = ledger.client_level_epsilon()
    if args.json:
        print(
            json.dumps(
                {
                    "delta": ledger.delta,
                    "accountant": name,
                    "clients": rows,
                    "composed_epsilon": composed,
                    "client_level_epsilon": client_level,
                    "server_events": [{"round": r, **e.to_dict()} for r, e in ledger.server_events().items()],
                },
                indent=2,
            )
        )
        return 0
    print(f"privacy ledger {args.path}: {len(rows)} clients, delta = {ledger.delta:g}")
    print(
        _table(
            ["client", "rounds", "steps", "examples", f"epsilon ({name})", "epsilon (certified)"],
            [[r["id"], r["rounds"], r["steps"], r["examples"], r["epsilon"], r["epsilon_certified"]] for r in rows],
        )
    )
    released = sum(1 for r in rows if r.get("releases"))
    if released:
        print(
            f"\n{released} client(s) also released their label counts once (round 0, logit adjustment); "
            "the epsilons compose it with their rounds"
        )
    print(
        f"\ncomposed record-level epsilon (max over clients, certified): {composed:.4f}"
        "  -- protects one training example"
    )
    if client_level is not None:
        releases = len(ledger.server_events())
        print(
            f"client-level epsilon (server noise over {releases} rounds, certified): {client_level:.4f}"
            "  -- protects a client's whole contribution"
        )
    return 0
