"""The one error type a user sees: what went wrong, where, and what to do about it."""

from __future__ import annotations

# Exit codes, one meaning each (the README's table lists them).
EXIT_OK, EXIT_BUDGET, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


class PipelineError(Exception):
    """Bad input or a failed step, phrased for the person running the tool.

    ``where`` names the file and key, layer, op or device; ``hint`` says what to do. The CLI prints these
    without a traceback and exits with ``exit_code`` (2 for bad input by default).
    """

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None,
                 exit_code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:
        parts = [self.message]
        if self.where:
            parts.append(f"  where: {self.where}")
        if self.hint:
            parts.append(f"  hint: {self.hint}")
        return "\n".join(parts)


class BudgetFailure(PipelineError):
    """A target was produced but missed one of its budgets (exit code 1)."""

    def __init__(self, message: str, **kw):
        kw.setdefault("exit_code", 1)
        super().__init__(message, **kw)


class DevicesUnreachable(PipelineError):
    """A device could not be reached, so nothing was measured there (exit code 4): not a budget miss."""

    def __init__(self, message: str, **kw):
        kw.setdefault("exit_code", EXIT_UNREACHABLE)
        super().__init__(message, **kw)


def all_of(errors: list[PipelineError]) -> PipelineError:
    """Several problems found in one pass (a recipe's mistakes) as one error that lists each, numbered, with its
    own where and hint: the user fixes them all in one go, not one per run."""
    if len(errors) == 1:
        return errors[0]
    body = "\n".join(f"{i}. " + str(e).replace("\n", "\n   ") for i, e in enumerate(errors, 1))
    return PipelineError(f"{len(errors)} problems:\n{body}", exit_code=max(e.exit_code for e in errors))
