"""Built-in methods. Each folder registers itself on import; adding a method is one line here."""

from . import lora  # noqa: F401
from . import adalora  # noqa: F401
from . import delta_lora  # noqa: F401
from . import vera  # noqa: F401
from . import lora_fa  # noqa: F401
from . import lora_plus  # noqa: F401
from . import dora  # noqa: F401
from . import qlora  # noqa: F401
from . import lora_drop  # noqa: F401
