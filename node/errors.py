"""Errors shown to volunteers and written into outcomes: one line each."""


def one_line(error: BaseException) -> str:
    """``Type: message`` on a single line (hivemind messages often embed newlines and Go logs)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
