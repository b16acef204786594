"""Selective (sparse) fine-tuning with a FISH mask (Sung, Nair and Raffel 2021, "Training Neural Networks with Fixed
Sparse Masks", NeurIPS): score every candidate weight entry by its Fisher information, keep the top ones, train only
those, with everything else frozen.

Candidates: every entry of the weights of the targeted linear layers (nn.Linear, GPT-2's Conv1D; default
"all-linear": every linear layer but the output head). Biases, norms, embeddings are not candidates.

Score (the paper's eq. 2-3, the empirical Fisher): for N training examples (x_n, y_n),
    F_θ = (1/N) Σ_n (∂ log p_θ(y_n | x_n) / ∂θ)^2              for every candidate entry θ
computed with one example per backward pass (the square of a batch-mean gradient would be another quantity), at
the current weights (W + the delta), in eval mode. log p is the model's own loss from `labels` (cross-entropy of the
label for sequence classification, as in the paper; mean next-token cross-entropy per example for causal LMs).

Selection: keep the top k = round(density x #candidates) entries over all candidates at once (scope "global", the
FISH mask: tensors that matter more get more entries) or per tensor ("per_tensor"), or every entry with F_θ >=
threshold. `rounds: k` scores, selects and trains `round_steps` steps k-1 times, then scores and selects once more
for the main training: an entry kept again keeps its trained value, a new one starts at 0, one dropped goes back to
W's own value (its change is pruned).

Training: the frozen weight W stays as it is; beside it each layer holds the adapter's sparse delta, values (k,)
trained and flat indices (k,) into W as stored (row-major; int32 below 2^31 entries), and computes with
W_eff = W + scatter(indices, values) (layer.py: W_eff is rebuilt in backward, not kept).

Why a sparse delta and not a gradient mask on W (numbers for SmolLM2-135M, candidates = all linear weights of its
top 10 blocks, 35.4M entries, density 1.74% -> k = 615,776, LoRA r=16's count, 0.46% of the model; fp32 training):
- a mask on W's gradient makes every candidate weight a trained parameter: its full-size gradient and AdamW's two
  moments stay allocated, 3 x 35.4M x 4 B = 425 MB (a bf16 or 4-bit base would also need fp32 master weights);
- the sparse delta needs values, their gradient and two moments (4 B each) and an int32 index per entry:
  5 x 615,776 x 4 B = 12.3 MB, plus one layer's dense W_eff and ∂L/∂W_eff while it computes (at most 2 x 3.5 MB).
  For a 7B Llama with all linear layers at density 0.5% it is 32M entries, 0.65 GB, against 78 GB for the masked
  full gradients and moments.
The scoring phase alone needs full-size memory: one fp32 gradient and one accumulator per candidate weight (2 x
142 MB here), freed when it ends.

Before any scoring (`get_peft_model` in Python) each candidate tensor holds a random `density` fraction of its
entries (seeded by the module's path, so every process and every load draws the same), all values 0: FISH's
random-mask baseline, a working sparse fine-tuning that is the identity at init. `peftlab train` replaces it with
the Fisher selection in the method's `prepare` phase, before the main training, prints the selected fraction per
layer and saves the table as output_dir/selective_selection.json (and in the adapter's README.md). Without
`peftlab train`:

    from peftlab.methods.selective import select
    table = select(model, batches, density=0.005)   # batches: one example each, with labels; then build the optimizer

Files: peft_type "SELECTIVE" (peftlab's own: HF PEFT has no such method), keys
`base_model.model.<path>.selective_indices` (k,) and `.selective_values` (k,); k may differ per layer, and loading
sizes the adapter to the file's k. merge adds the values into W at their indices, unmerge subtracts them.
"""

from __future__ import annotations

from torch import nn

from ...core.method import Method, register
from ...core.targets import Conv1D
from ...io import adapter_files
from .config import SelectiveConfig
from .layer import SelectiveLinear
from .select import SELECTION_FILE, fisher_scores, prepare, select, select_entries, selective_layers


def _size_to_file(model, adapter_name: str, found: dict) -> dict:
    """`Method.from_file`: give each layer the file's k (checked first: 1-D, as many values as indices, ascending
    distinct positions inside the weight), so that core's shape check and copy see matching tensors."""
    checked = []
    for path, layer in selective_layers(model, adapter_name):
        key = f"{adapter_files.KEY_PREFIX}{path}.selective_"
        idx, val = found.get(key + "indices"), found.get(key + "values")
        if idx is None or val is None:
            continue  # core's check names the missing tensor
        numel = layer.base_layer.weight.numel()
        ok = (idx.dim() == 1 and val.dim() == 1 and len(idx) == len(val) and not idx.is_floating_point()
              and (len(idx) == 0 or (int(idx[0]) >= 0 and int(idx[-1]) < numel and bool((idx[1:] > idx[:-1]).all()))))
        if not ok:
            raise adapter_files.AdapterFileError(
                f"{key}indices/values do not describe a sparse delta of {path}'s weight ({numel:,} entries): seen "
                f"indices {tuple(idx.shape)} {idx.dtype}, values {tuple(val.shape)}. They must be 1-D, equally long, "
                "integer indices ascending and distinct in [0, entries). Save the adapter again with save_pretrained.")
        checked.append((layer, idx, val))
    for layer, idx, val in checked:
        layer.set_selection(adapter_name, idx, val)
    return found


METHOD = register(Method(
    name="selective",
    config_cls=SelectiveConfig,
    layers=((nn.Linear, SelectiveLinear), (Conv1D, SelectiveLinear)),
    summary="Selective fine-tuning (FISH mask): the top `density` weight entries by Fisher score train as a sparse "
            "delta (files: SELECTIVE)",
    prepare=prepare,
    from_file=_size_to_file,
))

__all__ = ["METHOD", "SELECTION_FILE", "SelectiveConfig", "SelectiveLinear", "fisher_scores", "select",
           "select_entries", "selective_layers"]
