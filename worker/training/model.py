"""The base model in 4-bit (bitsandbytes) with LoRA adapters on top (peft)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from app.architectures import auto_target_modules
from app.settings import get_settings
from app.spec import JobSpec, QuantizationSpec, split_revision
from worker.training.hub import fetching

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def compute_dtype(quantization: QuantizationSpec) -> torch.dtype:
    """`auto`: bfloat16 on GPUs that support it, float16 on older ones (T4), float32 on a CPU."""
    if quantization.compute_dtype != "auto":
        return DTYPES[quantization.compute_dtype]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(base_model: str):
    name, revision = split_revision(base_model)
    with fetching("tokenizer", base_model):
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=revision, trust_remote_code=get_settings().trust_remote_code
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_quantized_model(spec: JobSpec, dtype: torch.dtype, device: str | None = None):
    """The base model with its linear layers in 4-bit, as the spec's quantization says, on
    `device` ("cpu" or "cuda"; default: this process's GPU where there is one)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    name, revision = split_revision(spec.base_model)
    q = spec.quantization
    quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )
    with fetching("base model", spec.base_model):
        model = AutoModelForCausalLM.from_pretrained(
            name,
            revision=revision,
            quantization_config=quantization_config,
            dtype=dtype,
            # Named even for the CPU: with none, transformers puts a 4-bit model on the GPU.
            device_map={"": torch.cuda.current_device() if device == "cuda" else "cpu"},
            trust_remote_code=get_settings().trust_remote_code,
        )
    repack_only_layers_that_fit(model)
    return model


# bitsandbytes' CPU repacking (0.50, `_convert_weight_packed_for_cpu`) takes output features in
# tiles of this many rows
CPU_REPACK_ROWS = 32


def repack_only_layers_that_fit(model: torch.nn.Module) -> int:
    """On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks each 4-bit layer's weights for its
    bf16 kernel at the first forward without gradients, which takes only out-features divisible
    by 32 and in-features divisible by the quantization block (stories260K's MLP, 64 -> 172 -> 64,
    failed: "N must be divisible by block_n"). The layers that don't fit keep the plain
    dequantize-then-matmul path; the others keep the fast kernel. How many were turned off."""
    turned_off = 0
    for module in model.modules():
        if not (isinstance(module, torch.nn.Linear) and getattr(module, "support_avx512bf16_for_cpu", False)):
            continue
        state = getattr(module.weight, "quant_state", None)
        blocksize = getattr(state, "blocksize", None) or 64
        if module.out_features % CPU_REPACK_ROWS or module.in_features % blocksize:
            module.support_avx512bf16_for_cpu = False  # type: ignore[assignment]
            turned_off += 1
    if turned_off:
        log.info("%d 4-bit layers keep the plain CPU path: the bf16 kernel can't take them", turned_off)
    return turned_off


def keep_4bit_layers_trainable(model: torch.nn.Module) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit layer's weights for its
    inference kernel at the first forward in eval mode without gradients (an evaluation) and
    keeps them so: later training forwards then run that kernel outside autograd and add the
    bias in place ("a view of a leaf Variable … in-place operation" once biases train). A model
    being trained keeps the autograd path throughout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            # torch types Module.__setattr__ for tensors and submodules only; a plain flag is fine
            module.support_avx512bf16_for_cpu = False  # type: ignore[assignment]


def linear_layer_names(model: torch.nn.Module) -> set[str]:
    """The names LoRA can target: each linear layer's own name (4-bit ones included), but the
    output head."""
    return {
        name.rpartition(".")[2]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }


def target_modules(spec: JobSpec, model: torch.nn.Module) -> list[str] | str:
    """What `lora.target_modules` means for this base; ValueError naming the layers that exist
    when a name matches none of them."""
    wanted = spec.lora.target_modules
    if wanted == "all-linear":
        return wanted
    kind = getattr(model.config, "model_type", "?")
    if wanted == "auto":
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFTS

        wanted = auto_target_modules(kind) or PEFTS.get(kind) or "all-linear"
        if wanted == "all-linear":
            return wanted
    names = {name for name, _ in model.named_modules()}
    unmatched = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in names)]
    if unmatched:
        raise ValueError(
            f"lora.target_modules {unmatched} match no layer of this {kind} model; its linear layers "
            f'are {sorted(linear_layer_names(model))} (or use "auto" or "all-linear")'
        )
    return list(wanted)


def load_quantized_lora_model(
    spec: JobSpec, dtype: torch.dtype, init_adapter: Path | None = None, reference_adapter: str | None = None
):
    """The 4-bit base with a new LoRA adapter as the spec says, or, from `init_adapter` (an
    earlier job's adapter or checkpoint folder), that adapter to train on; `reference_adapter`:
    also load it a second time under that name, frozen (DPO's reference)."""
    base = load_quantized_model(spec, dtype)
    modules = target_modules(spec, base) if init_adapter is None else None
    keep_4bit_layers_trainable(base)
    model = prepare_model_for_kbit_training(
        base,
        use_gradient_checkpointing=spec.training.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    if init_adapter is not None:
        if not (init_adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"init_from: the adapter of job {spec.init_from.job if spec.init_from else '?'} "
                f"({init_adapter.name}) is gone: it was deleted or its checkpoint pruned"
            )
        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
        if reference_adapter is not None:
            load_frozen_lora(model, init_adapter, reference_adapter)
        _log_trainable(model)
        return model
    lora = LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,  # type: ignore[arg-type]  # peft says int; a float scales as well
        lora_dropout=spec.lora.dropout,
        target_modules=modules,
        bias=spec.lora.bias,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    _log_trainable(model)
    return model


def load_frozen_lora(model: PeftModel, folder: Path, name: str) -> None:
    """`folder`'s LoRA weights as a second, frozen adapter `name` beside the trained one (which
    stays active). Its biases are not loaded: peft keeps one adapter with biases, and the
    trained one's are the model's own (worker.training.dpo keeps their starting values for the
    reference)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(str(folder))
    # no dropout: the reference scores the same pair the same way every time
    config.bias, config.inference_mode, config.lora_dropout = "none", True, 0.0
    model.add_adapter(name, config)
    weights = load_file(str(folder / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, {k: v for k, v in weights.items() if "lora_" in k}, adapter_name=name)
    model.set_adapter("default")


def _log_trainable(model) -> None:
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA: %d trainable of %d parameters (%.3f %%)", trainable, total, 100 * trainable / total)
