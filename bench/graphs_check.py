"""On a GPU: a micro-batch replayed as a CUDA graph (worker.training.step_graphs) computes the
eager (compiled) micro-batch's loss and LoRA gradients, accumulates them in place, and a replay
on new data of the same shape computes that data's. A 2-layer model of Phi-2's shapes (random
weights), NF4, LoRA, compiled layers with checkpointing, FlexAttention, bf16, dropout off.

usage (on the GPU machine, wheels installed): python3 bench/graphs_check.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, PhiConfig

    model_dir = Path("/tmp/phi2-2layers")
    config = PhiConfig.from_json_file(str(REPO / "bench" / "phi-2-config.json"))
    config.num_hidden_layers, config.resid_pdrop = 2, 0.0
    AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16).save_pretrained(model_dir)
    os.environ["FINETUNE_LOCAL_ROOTS"] = json.dumps([str(model_dir)])

    from app.spec import JobSpec
    from worker.training.model import load_quantized_lora_model
    from worker.training.speed import SpeedPlan, apply_speed_plan, document_block_mask
    from worker.training.step_graphs import StepGraphs

    spec = JobSpec.model_validate(
        {
            "base_model": str(model_dir),
            "quantization": {"compute_dtype": "bfloat16"},
            "lora": {"dropout": 0.0},
        }
    )
    model = load_quantized_lora_model(spec, torch.bfloat16)
    model.train()
    plan = SpeedPlan(compile_layers=True, plain_4bit=True, graphs=True, mask="flex", row_multiple=128)
    apply_speed_plan(model, plan)
    lora = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)
    for param in lora:  # LoRA B starts at 0: give every tensor a gradient
        torch.nn.init.normal_(param, std=0.02)

    def batch(seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 50000, (2, 1024), generator=g)
        docs = torch.cat([torch.full((2, 600), 1), torch.full((2, 424), 2)], dim=1)
        return {"input_ids": ids.cuda(), "labels": ids.cuda(), "sequence_ids": docs.cuda()}

    def run(inputs: dict, items) -> torch.Tensor:
        mask = document_block_mask(inputs["sequence_ids"])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=inputs["input_ids"], labels=inputs["labels"], attention_mask=mask).loss
        loss.backward()
        return loss.detach()

    def grads() -> list[torch.Tensor]:
        out = [p.grad.detach().float().clone() for p in lora]
        model.zero_grad()
        return out

    def diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return max(float((x - y).norm() / y.norm().clamp_min(1e-12)) for x, y in zip(a, b, strict=True))

    graphs = StepGraphs()
    first, second = batch(1), batch(2)
    eager_loss = graphs.step(model, first, None, run).item()  # a shape's first: eager
    eager_grads = grads()
    captured_loss = graphs.step(model, first, None, run).item()  # its second: captured, replayed
    captured_grads = grads()
    replay_loss = graphs.step(model, second, None, run).item()  # new data, same shape: replayed
    replay_grads = grads()
    reference_loss = run(second, None).item()  # the same data eagerly
    reference_grads = grads()
    graphs.step(model, first, None, run)  # two replays without zeroing: the sum
    graphs.step(model, first, None, run)
    twice = grads()
    result = {
        "name": "check: CUDA graph replay vs eager",
        "graphs": graphs.describe(),
        "captured_loss_diff": abs(captured_loss - eager_loss),
        "captured_max_rel_grad_diff": diff(captured_grads, eager_grads),
        "replay_new_data_loss_diff": abs(replay_loss - reference_loss),
        "replay_new_data_max_rel_grad_diff": diff(replay_grads, reference_grads),
        "losses_of_two_batches": [eager_loss, reference_loss],
        "two_replays_accumulate_max_rel_diff": diff(twice, [2 * g for g in eager_grads]),
    }
    print("RESULT", json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
