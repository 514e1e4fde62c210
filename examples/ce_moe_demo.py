#!/usr/bin/env python
"""Tiny Compressed-Experts MoE GPT trained for a few steps on CPU with expert parallelism.

    torchrun --nproc-per-node 2 examples/ce_moe_demo.py --expert-model-parallel-size 2

A 2-layer GPT with 8 experts, top-4 routing split into 2 main + 2 compressed experts, learns to
copy a repeating random sequence. Runs through megatron-core's DDP, optimizer and forward/backward
schedule; prints the loss and how far the compressed-expert tables moved from their init (ones).
"""

import argparse
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tensor-model-parallel-size", type=int, default=1)
    ap.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    ap.add_argument("--expert-model-parallel-size", type=int, default=2)
    ap.add_argument("--moe-token-dispatcher-type", choices=["allgather", "alltoall"], default="alltoall")
    ap.add_argument("--moe-ce-num-compressed", type=int, default=2)
    ap.add_argument("--moe-ce-variant", choices=["ia3", "hidden"], default="ia3")
    ap.add_argument("--train-iters", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1234)
    return ap.parse_args()


def main():
    args = parse_args()
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ce.ce import CETransformerConfig, get_gpt_ce_layer_local_spec
    from megatron_ce.runtime import init_parallel

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    init_parallel(tp=tp, pp=pp, ep=args.expert_model_parallel_size, seed=args.seed)
    rank = torch.distributed.get_rank()
    seq, vocab, micro_batch = 32, 64, 4
    config = CETransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        moe_ffn_hidden_size=128,
        num_moe_experts=8,
        moe_router_topk=4,
        moe_router_pre_softmax=True,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_ce_num_compressed=args.moe_ce_num_compressed,
        moe_ce_variant=args.moe_ce_variant,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        normalization="RMSNorm",
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=args.expert_model_parallel_size,
        sequence_parallel=tp > 1,
        use_cpu_initialization=True,
        pipeline_dtype=torch.float32,
    )
    spec = get_gpt_ce_layer_local_spec(num_experts=8, normalization="RMSNorm")
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab,
        max_sequence_length=seq,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )
    model = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=args.lr), [model])

    # Every data-parallel rank gets its own slice of a repeating pattern (the task is learnable).
    g = torch.Generator().manual_seed(args.seed + ps.get_data_parallel_rank())
    pattern = torch.randint(0, vocab, (8,), generator=torch.Generator().manual_seed(args.seed))

    def batch():
        start = torch.randint(0, 8, (micro_batch,), generator=g)
        idx = (start[:, None] + torch.arange(seq + 1)[None]) % 8
        tokens = pattern[idx]
        return dict(tokens=tokens[:, :-1], labels=tokens[:, 1:])

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        pos = torch.arange(seq).expand(micro_batch, seq)
        out = model(b["tokens"], pos, None, labels=b["labels"])

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    forward_backward = get_forward_backward_func()
    for step in range(1, args.train_iters + 1):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter([batch()]),
            model=model,
            num_microbatches=1,
            seq_length=seq,
            micro_batch_size=micro_batch,
            forward_only=False,
        )
        optimizer.step()
        if ps.is_pipeline_last_stage() and losses and rank == ps.get_pipeline_model_parallel_last_rank():
            print(f"step {step:3d} | loss {losses[0]['loss'].item():.4f}", flush=True)
    drift = max(
        (p.detach() - 1).abs().max().item() for n, p in model.named_parameters() if ".ce." in n
    )
    if rank == 0:
        print(f"compressed-expert tables moved up to {drift:.4f} from their init (1.0)")
        print("demo finished: CE MoE forward/backward with expert parallelism on CPU")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
