"""Loading the compiled extension (placeholder until csrc/ lands)."""


def unavailable_reason(kind: str) -> str | None:
    return "the compiled extension is not built yet"
