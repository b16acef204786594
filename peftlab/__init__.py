"""peftlab: parameter-efficient fine-tuning of pretrained transformers.

The API keeps HF PEFT's names: `LoraConfig`, `get_peft_model`, `PeftModel.from_pretrained`,
`print_trainable_parameters`, `save_pretrained`, `add_adapter`, `set_adapter`, `merge_and_unload`.
"""

from .core.config import AdapterConfig, ConfigError, TaskType
from .core.method import Method, get_method, register, registered_methods
from .core.model import PeftModel, get_peft_model
from .io.adapter_files import AdapterFileError
from .methods.adalora.config import AdaLoraConfig
from .methods.bitfit import BitFitConfig
from .methods.bottleneck.config import BottleneckConfig
from .methods.delta_lora.config import DeltaLoraConfig
from .methods.dora.config import DoraConfig
from .methods.features.config import FeaturesConfig
from .methods.full import FullConfig
from .methods.head_only import HeadOnlyConfig
from .methods.icl.config import IclConfig
from .methods.last_layers import LastLayersConfig
from .methods.ia3.config import IA3Config
from .methods.lora import LoraConfig
from .methods.lora_drop.config import LoraDropConfig
from .methods.lora_fa.config import LoraFaConfig
from .methods.lora_plus.config import LoraPlusConfig
from .methods.p_tuning.config import PromptEncoderConfig
from .methods.prefix_tuning.config import PrefixTuningConfig
from .methods.prompt_tuning.config import PromptTuningConfig
from .methods.qlora.config import QLoraConfig
from .methods.vera.config import VeraConfig

PeftConfig = AdapterConfig  # PEFT's name for the base config

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig", "AdapterConfig", "AdapterFileError", "ConfigError", "DeltaLoraConfig", "DoraConfig",
    "LoraConfig", "LoraDropConfig", "LoraFaConfig", "LoraPlusConfig", "Method", "PeftConfig", "PeftModel",
    "QLoraConfig", "VeraConfig", "TaskType", "get_method", "get_peft_model", "register", "registered_methods",
    "BottleneckConfig", "IA3Config",
    "FeaturesConfig", "IclConfig",
    "PromptTuningConfig", "PrefixTuningConfig", "PromptEncoderConfig",
    "FullConfig", "LastLayersConfig", "HeadOnlyConfig", "BitFitConfig",
]
