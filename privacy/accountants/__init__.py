"""Privacy accountants behind one interface, and their registry.

Built in (``available_accountants()``):

``edgeworth``, ``edgeworth1``
    Edgeworth expansion of order 2 and 1 (estimate), after Wang et al. 2022.
``saddlepoint``
    Exponentially tilted (saddle-point) Edgeworth expansion (estimate); fedtune's default estimate.
``rdp``
    Renyi DP of the subsampled Gaussian (Mironov et al. 2019) through Opacus (upper bound).
``prv``
    Opacus' privacy random variable accountant (Gopi et al. 2021), one direction (estimate).
``pld``
    dp_accounting's privacy loss distribution accountant, pessimistic (certified upper bound); the
    fine-grid (1e-4) reference.
``pld-fast``
    The same pessimistic connect-the-dots PLD, vectorised on a grid scaled to the privacy loss
    (certified upper bound, within ~0.1% of ``pld``, 10-100x faster); fedtune's certifier.
"""

from fedtune.privacy.accountants.base import (
    Accountant,
    AccountingError,
    Kind,
    UnsupportedEventError,
    available_accountants,
    get_accountant,
    register_accountant,
)
from fedtune.privacy.accountants.edgeworth import EdgeworthAccountant
from fedtune.privacy.accountants.fast_pld import FastPLDAccountant
from fedtune.privacy.accountants.reference import PLDAccountant, PRVAccountant, RDPAccountant, to_dp_event
from fedtune.privacy.accountants.saddlepoint import SaddlePointAccountant

__all__ = [
    "Accountant",
    "AccountingError",
    "Kind",
    "UnsupportedEventError",
    "available_accountants",
    "get_accountant",
    "register_accountant",
    "EdgeworthAccountant",
    "FastPLDAccountant",
    "SaddlePointAccountant",
    "PLDAccountant",
    "PRVAccountant",
    "RDPAccountant",
    "to_dp_event",
]
