"""Worker for the Trainer's loss-count question under FSDP2: ``torchrun --nproc_per_node=2
trainer_probe_worker.py OUT``. Rank 0's first micro-batch has every label masked, rank 1's none:
each rank asks its micro-batches in turn, and FSDP's forwards gather across ranks, so the ranks
must ask in step (rank 0 asking two and rank 1 one hung in the gathers). Writes each rank's
answer and the micro-batches it asked to OUT.rank."""

import datetime
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from odelora.integrations.trainer import ODELoRATrainer


def main(out: str) -> None:
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=48, max_position_embeddings=32)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(output_dir=f"{out}.dir{rank}", per_device_train_batch_size=4, max_steps=1, gradient_accumulation_steps=2,
                             learning_rate=0.1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = ODELoRATrainer(model=model, args=args)
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    trainer.model = trainer.model_wrapped = model  # as the Trainer holds an FSDP2 model
    g = torch.Generator().manual_seed(rank)

    def micro_batch(masked):
        ids = torch.randint(0, 60, (4, 10), generator=g)
        return {"input_ids": ids, "labels": torch.full_like(ids, -100) if masked else ids.clone()}

    asked = []
    ask = trainer._loss_divides_by_count
    trainer._loss_divides_by_count = lambda b: asked.append(1) or ask(b)
    trainer.get_batch_samples(iter([micro_batch(rank == 0), micro_batch(False)]), 2, torch.device("cpu"))
    with open(f"{out}.{rank}", "w") as fh:
        json.dump(dict(answer=trainer._loss_counts, asked=len(asked)), fh)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # skip the process group's teardown, which aborted now and then ("terminate called without an active exception")


if __name__ == "__main__":
    main(sys.argv[1])
