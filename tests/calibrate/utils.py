"""Tiny OLMoE-CE models and batches for the calibration tests (top-level: pickled into ranks)."""

from typing import Dict, List

import torch

VOCAB, SEQ = 128, 16


def tiny_hf_config(layers: int = 1, experts: int = 8, topk: int = 4) -> Dict:
    from transformers import OlmoeConfig

    return OlmoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=4, num_experts=experts,
                       num_experts_per_tok=topk, max_position_embeddings=64, eos_token_id=0, pad_token_id=1,
                       initializer_range=0.2).to_dict()


def build(cfg: Dict, k_a: int, variant: str = "ia3", seed: int = 0, **overrides):
    """OLMoE GPTModel (logits gathered) from a fixed seed: the same weights whatever k_a or layout."""
    from megatron.core import tensor_parallel

    from megatron_ce.models.olmoe import build_olmoe_model

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return build_olmoe_model(cfg, moe_ce_num_compressed=k_a, moe_ce_variant=variant, parallel_output=False,
                             **overrides)


def batches(seed: int, n: int = 3, b: int = 2, seq: int = SEQ) -> List[Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(0, VOCAB, (b, seq), generator=g),
             "position_ids": torch.arange(seq).expand(b, seq).clone()} for _ in range(n)]


def moe_layers(model) -> list:
    return [layer.mlp for layer in model.decoder.layers]


def make_experts_identical(model, router_scale: float = 1.0) -> None:
    """Every expert of a layer gets expert 0's weights (SequentialMLP); router weights scaled."""
    with torch.no_grad():
        for moe in moe_layers(model):
            experts = [list(e.parameters()) for e in moe.experts.local_experts]
            for params in experts[1:]:
                for p, p0 in zip(params, experts[0]):
                    p.copy_(p0)
            moe.router.weight.mul_(router_scale)


def moe_io(model, layer_index: int, data) -> List:
    """(input, output) of one MoE layer of `model` for each batch (forward hook: no calibration code)."""
    seen = []
    handle = model.decoder.layers[layer_index].mlp.register_forward_hook(
        lambda m, args, out: seen.append((args[0].detach().clone(), out[0].detach().clone())))
    try:
        with torch.no_grad():
            for batch in data:
                model(batch["tokens"], batch["position_ids"], None)
    finally:
        handle.remove()
    return seen


def rel_error_vs_reference(model, reference, layer_index: int, data) -> float:
    """||y_model - y_ref|| / ||y_ref|| of one MoE layer, both fed the inputs `model` gives it; `reference`
    is a model with CE off (megatron-core's own MoELayer, full top-k) and the same weights."""
    num = den = 0.0
    ref_layer = reference.decoder.layers[layer_index].mlp
    with torch.no_grad():
        for x, y in moe_io(model, layer_index, data):
            y_ref = ref_layer(x)[0]
            num += (y - y_ref).pow(2).sum().item()
            den += y_ref.pow(2).sum().item()
    return (num / den) ** 0.5


def reference_model(model, cfg: Dict, **overrides):
    """The same weights with CE off (k_a = 0): megatron-core's MoELayer with the full top-k."""
    ref = build(cfg, 0, **overrides)
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
    assert all(".mlp.ce." in k for k in unexpected) and not [k for k in missing if "_extra_state" not in k]
    return ref.eval()


def theta_tensors(model) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".mlp.ce." in k}


def other_tensors(model) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if ".mlp.ce." not in k and isinstance(v, torch.Tensor)}


def write_hf_olmoe(path, vocab: int = 1024, seed: int = 0) -> None:
    """A tiny random OLMoE saved by transformers (2 layers, 8 experts top-4), with a tokenizer."""
    import shutil
    from pathlib import Path

    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = tiny_hf_config(layers=2)
    cfg.update(vocab_size=vocab)
    cfg.pop("architectures", None)
    torch.manual_seed(seed)
    OlmoeForCausalLM(OlmoeConfig(**{k: v for k, v in cfg.items() if k != "model_type"})).save_pretrained(path)
    tok = Path(__file__).resolve().parents[2] / "examples" / "data" / "tokenizer"
    for f in tok.iterdir():
        shutil.copy(f, Path(path) / f.name)


def load_safetensors_dir(path) -> Dict[str, torch.Tensor]:
    import glob
    import os

    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(os.path.join(str(path), "*.safetensors"))):
        out.update(load_file(f))
    return out
