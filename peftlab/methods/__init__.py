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
from . import full  # noqa: F401
from . import bitfit  # noqa: F401
from . import head_only  # noqa: F401
from . import last_layers  # noqa: F401
from . import ia3  # noqa: F401
from . import bottleneck  # noqa: F401
from . import features  # noqa: F401
from . import icl  # noqa: F401
from . import prompt_tuning  # noqa: F401
from . import prefix_tuning  # noqa: F401
from . import p_tuning  # noqa: F401
