"""The project's one error type for bad user input.

It sits below every folder (errors <- weights <- flux <- lora <- training <- toys), so each can raise it.
The Cog server turns it into a failed prediction with this message; the server keeps serving.
"""


class UserInputError(ValueError):
    """Bad input from a user. The message names the field, the value and what is allowed."""

    def __init__(self, field: str, value: object, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}: got {_short(value)}; {allowed}")


def _short(value: object, limit: int = 120) -> str:
    """An excerpt of what the user sent: errors never echo a long value back (a pasted file, say)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"
