#!/usr/bin/env python3
"""peft + transformers LoRA training step on random tokens: the peer of `cargo bench --bench train_step`.

    python3 benches/peer/peft_step.py --config CONFIG.json [--batch 4] [--len 256] [--rank 8]
        [--targets q_proj,v_proj|all] [--dropout 0.05] [--steps 20] [--checkpointing]

The same loop as ours: a bf16 model of the config's shapes with random weights (sdpa attention), LoRA with
alpha = 2 × rank, loss on every position, AdamW (lr 1e-4, no weight decay), gradient clipping at 1.0. Prints the
mean step time over --steps after one warm-up step, training tokens/s and torch's peak allocated memory
(weights included), in the same words as train_step.
"""
import argparse
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--len", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--checkpointing", action="store_true")
    a = p.parse_args()

    with open(a.config) as f:
        raw = json.load(f)
    config = AutoConfig.for_model(**raw)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):  # random weights made on the card: seconds, not the CPU's minute
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if a.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = "all-linear" if a.targets == "all" else a.targets.split(",")
    lora = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=a.dropout, target_modules=targets,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    model.train()

    gen = torch.Generator(device="cuda").manual_seed(7)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(a.steps + 1):
        ids = torch.randint(0, config.vocab_size, (a.batch, a.len), device="cuda", generator=gen)
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step > 0:
            times.append(time.perf_counter() - t)
    mean = statistics.mean(times)
    sd = statistics.stdev(times) if len(times) > 1 else 0.0
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"peft {a.config} on cuda (bf16), batch {a.batch} × {a.len}, r {a.rank}, targets {a.targets}, "
          f"dropout {a.dropout}{', checkpointing' if a.checkpointing else ''}: {trainable} trainable; "
          f"step {mean * 1e3:.1f} ± {sd * 1e3:.1f} ms, {a.batch * a.len / mean:.0f} training tok/s; "
          f"peak GPU allocated {peak:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
