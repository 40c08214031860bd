"""The errors of the evaluation package.

Each is a ``ValueError``: the user's to fix, with a message that names the flag or file at
fault. Library functions raise them; only the command lines turn them into an exit status
(``dynamax_jax.cli.run_cli`` prints ``python -m eval.X: error: MESSAGE`` and exits with 2).

    EvalError            any of the below
    ├── SettingsError    a flag's value cannot be used (checked before any model loads)
    ├── OutputError      --out cannot take this command's results
    │   └── RunFileError a file in --out is not a readable run JSON (also a DataError)
    ├── CalibrationError eval.calibrate: bad levels, or too few prompts for the guarantee
    └── BudgetError      eval.budget: bad targets or static layers
"""

from __future__ import annotations

from dynamax_jax.io import DataError


class EvalError(ValueError):
    """A user error of an evaluation command."""


class SettingsError(EvalError):
    """A flag's value cannot be used; the message names the flag."""


class OutputError(EvalError):
    """The output directory cannot take this command's results: it cannot be written, or it
    holds results this run could not share a report with."""


class RunFileError(OutputError, DataError):
    """A file in the output directory is not a readable run JSON; the message names it."""


class CalibrationError(EvalError):
    """Bad calibration settings or a calibration set too small for the guarantee asked."""


class BudgetError(EvalError):
    """Bad compute-budget settings (targets, static layers) for the model and its exits."""


__all__ = ["BudgetError", "CalibrationError", "EvalError", "OutputError", "RunFileError", "SettingsError"]
