"""Privacy accounting for fedtune: events, accountants, calibration and the per-client ledger.

Every epsilon fedtune prints comes from here. Spending is described as frozen data
(:class:`SubsampledGaussianEvent`); accountants (:func:`get_accountant`) turn it into epsilon and say
whether the number is an ``estimate`` or a certified ``upper-bound``. See docs/privacy.md.
"""

from fedtune.privacy.accountants import (
    Accountant,
    AccountingError,
    UnsupportedEventError,
    available_accountants,
    get_accountant,
    register_accountant,
)
from fedtune.privacy.calibration import Calibration, calibrate_noise, smallest_sigma
from fedtune.privacy.events import Composition, SubsampledGaussianEvent, as_composition
from fedtune.privacy.ledger import BudgetCheck, LedgerEntry, PrivacyLedger

__all__ = [
    "Accountant",
    "AccountingError",
    "BudgetCheck",
    "Calibration",
    "Composition",
    "LedgerEntry",
    "PrivacyLedger",
    "SubsampledGaussianEvent",
    "UnsupportedEventError",
    "as_composition",
    "available_accountants",
    "calibrate_noise",
    "get_accountant",
    "register_accountant",
    "smallest_sigma",
]
