"""LoRA-drop (Zhou et al. 2024, "LoRA-drop: Efficient LoRA Parameter Pruning based on Output Evaluation").

Layers are LoRA's linear layers: for adapted layer l with base weight W_l (out, in), A_l (r, in), B_l (out, r) and
s_l = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA), y = W_l x + ΔW_l x with ΔW_l = s_l B_l A_l.

Phase 1, importance. D_s is a sample of the training rows (`sample_ratio` of them, default 10%, or `sample_steps`
global batches; stratified by label for classification, as in the paper). Plain LoRA on every target layer trains
one pass over D_s with the run's recipe. Then, in eval mode (no dropout), with X_l the inputs layer l receives on
D_s, one vector per real token position (padding excluded):
    g_l = (1 / |X_l|) Σ_{x ∈ X_l} ||ΔW_l x||_2^2          the mean squared norm of layer l's LoRA output
    I_l = g_l / Σ_j g_j                                   normalised across layers, Σ_l I_l = 1
(The paper sums over the sample instead of averaging; every layer of a decoder sees the same |X_l| positions, so
the mean rescales every g_l by the same factor and I_l does not change. Likewise, when every layer has the same s
(no rank_pattern/alpha_pattern), s^2 cancels and I_l is what ||B_l A_l x||^2 gives; when s differs, s_l is part of
what the layer adds to its output, so it counts.)

Selection. Sort the layers by I_l, descending (ties keep model order). With `threshold` T (default 0.9) keep the
first K layers, K = min{k : I_(1) + ... + I_(k) >= T}; with `top_n` keep the first top_n instead.

Sharing. The other layers share parameters. The paper gives all of them one LoRA; that needs one shape, and q_proj
(576 x 576 in SmolLM2) and v_proj (192 x 576) cannot share a B. So they are grouped by module name (the last part of
the path: q_proj, v_proj, ...) and by the shapes of A and B and by s, and each group g uses one pair (A_g, B_g),
ΔW_l = s_g B_g A_g for every l in g: e.g. all non-kept q_proj share one pair and all non-kept v_proj another. A group
is one set of tensors (its first layer's, in model order): the members' `lora_A[adapter]` / `lora_B[adapter]` hold
the same nn.Linear modules, so gradients from all members add up in it,
    ∂L/∂A_g = Σ_{l ∈ g} ∂L/∂A_l evaluated at A_l = A_g   (the same for B).
Trainable: r (in + out) per kept layer plus one pair per group, instead of one pair per layer.

Phase 2, training on all rows. It starts from the values the adapter had before phase 1 (the A of LoRA's
initialisation, B = 0; trained biases and saved heads too): the paper fine-tunes the pruned LoRA afresh, and phase 1
only measures. Kept layers train their own pair, each group its shared pair.

Where. `peftlab train` with `method: {name: lora_drop, ...}` runs all of this in the Method's `prepare` hook (see
peftlab/core/method.py and peftlab/train/prepare.py) before its main loop; it prints the table (rank, layer, score,
importance, cumulative, own/shared), saves it as output_dir/lora_drop_importance.json and adds it to the adapter's
README.md. `--resume` runs phase 1 again before loading the checkpoint: the same seed gives the same rows, steps and
selection (on the same hardware); the cost is phase 1's steps again. Without `peftlab train`:

    from peftlab.methods.lora_drop import select_layers, share_layers
    # model: a lora or lora_drop PeftModel trained a little on a sample; batches: dicts of model inputs
    table = select_layers(model, batches, threshold=0.9)          # or top_n=8
    share_layers(model, [row["layer"] for row in table if row["kept"]])
    # then (re-)initialise if wanted, and build the optimizer on the shared model

Files. Sharing is a training-time device. save_pretrained writes an ordinary LoRA file: peft_type "LORA", the four
LoRA-drop options left out of adapter_config.json, and every sharing layer's keys (`<path>.lora_A.weight`,
`<path>.lora_B.weight`) holding a copy of its group's pair. The file is as large as plain LoRA on every target
(SmolLM2-135M, r = 16 on q_proj and v_proj of 30 layers: 30 x 16 x (576 + 576 + 576 + 192) = 921,600 numbers,
3.7 MB in fp32) although fewer parameters trained. HF PEFT, vLLM and peftlab read it as LoRA; peftlab's
`PeftModel.from_pretrained` gives a `lora` adapter with separate, equal tensors per layer, which trains on as plain
LoRA (share again with share_layers if wanted).
"""

from torch import nn

from ...core.method import Method, register
from ...core.targets import ATTENTION_QV_TARGETS, Conv1D
from ..lora.combine import combine_lora
from ..lora.layer import LoraLinear
from .config import LoraDropConfig
from .select import IMPORTANCE_FILE, importance_table, layer_scores, prepare, select_layers, share_layers

METHOD = register(Method(
    name="lora_drop",
    config_cls=LoraDropConfig,
    layers=((nn.Linear, LoraLinear), (Conv1D, LoraLinear)),
    summary="LoRA-drop: a short LoRA run scores layers by mean ||B A x||^2; the least important share one pair "
            "per module name (files: LORA)",
    default_targets=ATTENTION_QV_TARGETS,
    combine=combine_lora,
    prepare=prepare,
))

__all__ = ["IMPORTANCE_FILE", "LoraDropConfig", "METHOD", "importance_table", "layer_scores", "select_layers",
           "share_layers"]
