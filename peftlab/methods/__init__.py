"""Built-in methods. Each folder registers itself on import; adding a method is one line here."""

from . import lora  # noqa: F401
