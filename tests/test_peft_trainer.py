"""PEFT pair discovery, create_odelora_optimizer, resume with PEFT adapters, and the transformers Trainer."""

import io
import math

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model  # noqa: E402

from odelora import ODELoRA  # noqa: E402
from odelora.integrations.peft import create_odelora_optimizer, lora_pairs, partition  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 32)
        self.head = torch.nn.Linear(32, 3)
        self.calls = 0

    def forward(self, ids=None, labels=None):
        self.calls += 1
        h = self.emb(ids).mean(1)
        logits = self.head(torch.relu(self.fc2(torch.relu(self.fc1(h)))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return out


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (n, 6), generator=g)
    return ids, ids[:, 0] % 3


def test_scalings_and_rules_from_modules():
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2", "emb"], rank_pattern={"fc2": 2},
                     alpha_pattern={"fc2": 6}, modules_to_save=["head"])
    model = get_peft_model(Net(), cfg)
    part = partition(model)
    scales = {p.name.split(".")[-1].split("[")[0]: (p.scale, p.rank) for p in part.pairs}
    assert scales == {"fc1": (8 / 4, 4), "fc2": (6 / 2, 2)}
    reasons = {n.split(".")[-2] if "lora_embedding" in n else n: why for n, _, why in part.others}
    assert any("embedding LoRA" == why for why in reasons.values())
    assert any("head" in n for n, _, _ in part.others)
    # rsLoRA: alpha / sqrt(r)
    m2 = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"], use_rslora=True))
    assert lora_pairs(m2)[0].scale == pytest.approx(8 / 2)
    # pairs are found by module: every B multiplies its own A inside one layer
    for p in part.pairs:
        assert p.B.shape[1] == p.A.shape[0]


def test_multiple_adapters_and_dora():
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=4, target_modules=["fc1"]), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=8, target_modules=["fc1", "fc2"]))
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    names = sorted(p.name for p in lora_pairs(model))
    assert len(names) == 3 and sum("[b]" in n for n in names) == 2
    with pytest.warns(UserWarning, match=r"4 trainable LoRA factor\(s\) of adapters other than \['a'\].*left as they are"):
        part = partition(model, adapter="a")
    assert [p.name for p in part.pairs] == ["base_model.model.fc1[a]"]
    assert len(part.left) == 4 and not any("lora_" in n for n, _, _ in part.others)  # b's factors: not in the companion
    with pytest.raises(ValueError, match=r"no LoRA adapter\(s\) \['zzz'\]; the model's adapters: \['a', 'b'\]"):
        partition(model, adapter="zzz")
    for p in model.base_model.model.fc2.parameters():  # b exists, but its fc2 pair is frozen and fc1's half
        p.requires_grad_(False)
    model.base_model.model.fc1.lora_A["b"].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"adapter\(s\) \['b'\] have no pair with both factors trainable.*set_adapter"):
        partition(model, adapter="b")
    dora = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=4, target_modules=["fc1"], use_dora=True))
    part = partition(dora)
    assert len(part.pairs) == 1 and any(why == "DoRA magnitude vector" for _, _, why in part.others)


def test_the_summary_names_pairs_frozen_when_the_optimizer_is_built():
    """A LoRA layer frozen at build time is not in the optimizer (as in torch's optimizers): the
    summary says so, since unfreezing it later does not make it train."""
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    for p in model.base_model.model.fc2.parameters():
        p.requires_grad_(False)
    opt = create_odelora_optimizer(model, lr=0.1)
    assert [p.name for p in opt.pairs] == ["base_model.model.fc1[default]"]
    assert opt.partition.frozen == ["base_model.model.fc2[default]"]
    assert ("1 LoRA pair is frozen (inactive adapters, frozen layers: base_model.model.fc2[default]) and not in the "
            "optimizer: unfrozen later, it stays as it is until the optimizer is built again") in opt.partition.summary()
    assert "frozen" not in create_odelora_optimizer(get_peft_model(Net(), LoraConfig(r=4, target_modules=["fc1"])), lr=0.1).partition.summary()
    model = get_peft_model(Net(), LoraConfig(r=4, target_modules=["fc1"], modules_to_save=["head"]))
    opt = create_odelora_optimizer(model, lr=0.1, decay=[])
    ids, y = data(8)
    model(ids=ids, labels=y)["loss"].backward()
    head = next(p for n, p in model.named_parameters() if n.endswith("modules_to_save.default.bias"))
    head.grad[0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"non-finite gradient of base_model\.model\.head\.modules_to_save\.default\.bias"):
        opt.step()


def test_half_frozen_and_frozen_adapters_are_named():
    """A LoRA layer with one factor frozen (LoRA-FA) is no pair for the flow: its trainable factor
    goes to the companion under its own label, with a warning; a model whose adapters are all
    frozen, or that has none, gets an error saying which."""
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    model.base_model.model.fc1.lora_A["default"].weight.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"1 LoRA layer\(s\) with one factor frozen \(base_model.model.fc1\[default\]\)"):
        part = partition(model)
    assert [p.name for p in part.pairs] == ["base_model.model.fc2[default]"]
    assert [(n.split(".")[-3], why) for n, _, why in part.others] == [("lora_B", "LoRA factor whose partner lora_A is frozen")]
    model.base_model.model.fc2.lora_A["default"].weight.requires_grad_(False)  # LoRA-FA: every lora_A frozen
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="every LoRA layer has one factor frozen.*AdamW"):
        create_odelora_optimizer(model, lr=0.1)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"LoRA adapters \(default\) have no pair with both factors trainable"):
        create_odelora_optimizer(model, lr=0.1)
    with pytest.raises(ValueError, match="no LoRA layers; wrap it with peft.get_peft_model"):
        create_odelora_optimizer(Net(), lr=0.1)


def test_create_odelora_optimizer_trains_everything_trainable_and_resumes():
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], modules_to_save=["head"]))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = create_odelora_optimizer(model, lr=0.5, method="heun", companion_lr=1e-2)
    ids, y = data()

    def closure():
        opt.zero_grad()
        loss = model(ids=ids, labels=y)["loss"]
        loss.backward()
        return loss

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
    l0 = float(opt.step(closure).detach())
    sched.step()
    for _ in range(4):
        opt.step(closure)
        sched.step()
    assert opt.param_groups[-1]["lr"] == pytest.approx(1e-2 / 6)  # the scheduler reaches the companion
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n].detach(), v) for n, v in trainable.items() if "lora_B" in n or "modules_to_save" in n)
    assert all(torch.equal(after[n].detach(), v) for n, v in frozen.items())
    # save adapter + optimizer state mid-run, reload into a fresh model, continue identically
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(),
                "weights": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}, buf)
    for _ in range(3):
        opt.step(closure)
        sched.step()
    expect = {n: p.detach().clone() for n, p in model.named_parameters()}
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    torch.manual_seed(0)
    model2 = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], modules_to_save=["head"]))
    with torch.no_grad():
        for n, p in model2.named_parameters():
            if n in ck["weights"]:
                p.copy_(ck["weights"][n])
    opt2 = create_odelora_optimizer(model2, lr=0.5, method="heun", companion_lr=1e-2)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda k: 1.0 / (1 + k))  # torch's order: scheduler, then states
    opt2.load_state_dict(ck["opt"])
    sched2.load_state_dict(ck["sched"])

    def closure2():
        opt2.zero_grad()
        loss = model2(ids=ids, labels=y)["loss"]
        loss.backward()
        return loss

    for _ in range(3):
        opt2.step(closure2)
        sched2.step()
    for n, p in model2.named_parameters():
        assert torch.equal(p.detach(), expect[n]), n
    assert float(closure().detach()) < l0


def test_peft_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"])
    model = get_peft_model(Net(), cfg)
    opt = create_odelora_optimizer(model, lr=0.3)
    ids, y = data()
    for _ in range(3):
        opt.zero_grad()
        model(ids=ids, labels=y)["loss"].backward()
        opt.step()
    model.save_pretrained(tmp_path / "adapter")
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    for _ in range(2):
        opt.zero_grad()
        model(ids=ids, labels=y)["loss"].backward()
        opt.step()
    expect = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    torch.manual_seed(0)
    from peft import PeftModel

    model2 = PeftModel.from_pretrained(Net(), tmp_path / "adapter", is_trainable=True)
    opt2 = create_odelora_optimizer(model2, lr=0.3)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for _ in range(2):
        opt2.zero_grad()
        model2(ids=ids, labels=y)["loss"].backward()
        opt2.step()
    got = {n: p.detach() for n, p in model2.named_parameters() if "lora_" in n}
    assert got.keys() == expect.keys() and all(torch.equal(got[n], expect[n]) for n in got)


def test_fsdp_flat_parameters_get_a_clear_error():
    B = torch.nn.Parameter(torch.zeros(8))
    B._is_flat_param = True
    with pytest.raises(NotImplementedError, match="FSDP"):
        ODELoRA([(B, torch.nn.Parameter(torch.zeros(2, 4)))])


def test_tied_embedding_and_head_lora_is_refused():
    """PEFT's ensure_weight_tying=True makes lm_head's LoRA factors and the embedding's LoRA
    tensors two Parameters over one storage: the embedding's went to the companion, whose step the
    pair's commit then overwrote (its gradient was lost, companion_lr had no effect). Refused with
    the way out; untied LoRA trains."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def model(tie: bool):
        torch.manual_seed(0)
        base = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=16))
        return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["wte", "lm_head"], ensure_weight_tying=tie))

    with pytest.raises(ValueError, match=r"wte\.lora_embedding_[AB]\.default shares memory with pair .*lm_head.*ensure_weight_tying=False"):
        create_odelora_optimizer(model(True), lr=0.1)
    untied = model(False)
    opt = create_odelora_optimizer(untied, lr=0.1)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    untied(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert float(untied.base_model.model.lm_head.lora_B["default"].weight.abs().max()) > 0


def test_merged_adapters_are_refused_until_unmerged():
    """After merge_adapter() the forward reads the base weights only: the factors got no gradient
    and the step failed saying that no pair had one, without naming the merge."""
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=False))
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"merged into their base weights \(.*fc1\[default\].*unmerge_adapter\(\)"):
        create_odelora_optimizer(model, lr=0.1)
    model.unmerge_adapter()
    assert len(create_odelora_optimizer(model, lr=0.1).pairs) == 2
    model.add_adapter("b", LoraConfig(r=2, target_modules=["fc1"]))
    model.base_model.merge_adapter(["default"])  # fc1 now runs its base layer alone, adapter b's factors unread too
    with pytest.raises(ValueError, match=r"merged into their base weights \(.*fc1\[default\]"):
        create_odelora_optimizer(model, lr=0.1, adapter="b")


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, ids, y):
        self.ids, self.y = ids, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"ids": self.ids[i], "labels": self.y[i]}


def recorded_losses(trainer) -> list[float]:
    """The losses of every ``compute_loss`` call the trainer makes from now on (one per RK stage)."""
    losses, compute = [], trainer.compute_loss

    def recorded(*a, **k):
        out = compute(*a, **k)
        losses.append(float(out.detach()))
        return out

    trainer.compute_loss = recorded
    return losses


@pytest.mark.parametrize("method,stages", [("euler", 1), ("rk4", 4)])
def test_trainer_trains_with_odelora_and_logs_statistics(method, stages, tmp_path):
    from transformers import TrainingArguments

    from odelora.integrations.trainer import ODELoRATrainer

    torch.manual_seed(0)
    net = Net()
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], modules_to_save=["head"]))
    ids, y = data(96)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=32, max_steps=12, learning_rate=0.5,
                             logging_steps=4, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             lr_scheduler_type="constant")
    trainer = ODELoRATrainer(model=model, args=args, train_dataset=ListDataset(ids, y),
                             odelora_kwargs=dict(method=method, companion_lr=1e-2))
    net.calls = 0
    losses = recorded_losses(trainer)
    trainer.train()
    assert net.calls == 12 * stages  # one forward per RK stage
    assert trainer.odelora.last_step.loss == pytest.approx(losses[-stages], rel=1e-6)  # the first stage's, from the Trainer
    logs = [h for h in trainer.state.log_history if "odelora_nfe_per_step" in h]
    assert len(logs) == 3 and all(h["odelora_nfe_per_step"] == stages for h in logs)
    assert all(h["odelora_h"] == 0.5 and 0 <= h["odelora_imbalance"] < 1 for h in logs)  # drift before retraction
    from odelora import imbalance

    assert all(float(imbalance(p.B.detach(), p.A.detach())) < 1e-5 for p in lora_pairs(model))  # rebalanced
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert trainer.odelora is trainer.optimizer.optimizer and trainer.odelora.stats.nfe == 12 * stages
    assert logs[-1]["odelora_nfe_total"] == 12 * stages and trainer.odelora.last_step.nfe == stages


def test_trainer_stages_share_dropout_masks_and_take_a_given_optimizer(tmp_path):
    """With lora_dropout the RK stages of one step must evaluate one function (the same masks; the
    stage losses at h -> 0 agree), also for an ODELoRA passed as optimizers=(opt, None)."""
    from transformers import TrainingArguments

    from odelora.integrations.trainer import ODELoRATrainer

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["fc1", "fc2"]))
    with torch.no_grad():  # B != 0, so that dropout on the LoRA branch changes the loss
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    ids, y = data(32)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=32, max_steps=2, learning_rate=1e-12,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, lr_scheduler_type="constant",
                             max_grad_norm=0.0)
    opt = create_odelora_optimizer(model, lr=1e-12, method="rk4")
    trainer = ODELoRATrainer(model=model, args=args, train_dataset=ListDataset(ids, y), optimizers=(opt, None))
    losses = recorded_losses(trainer)
    trainer.train()
    assert opt.stats.nfe == 8 and len(losses) == 8  # 2 steps x 4 stages
    for step in (losses[:4], losses[4:]):
        assert max(step) - min(step) < 1e-6 * abs(step[0]), losses
    assert abs(losses[0] - losses[4]) > 1e-3  # the next step draws new masks
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        ODELoRATrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=2, report_to=[],
                                                           use_cpu=True), train_dataset=ListDataset(ids, y), optimizers=(opt, None))


class KwargsNet(Net):
    """Net whose forward takes ``**kwargs``, as transformers' models do, with a mean loss that ignores them."""

    def forward(self, ids=None, labels=None, **kwargs):
        return super().forward(ids, labels)


def _assert_batch_8x2_steps_as_batch_16(tmp_path, trainer_class):
    """Three Euler steps of batch 16 and of batch 8 with 2 accumulation steps move a KwargsNet's
    factors alike; returns the second trainer."""
    from transformers import TrainingArguments

    ids, y = data(64)
    finals = []
    for batch, accumulate in ((16, 1), (8, 2)):
        torch.manual_seed(0)
        model = get_peft_model(KwargsNet(), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
        args = TrainingArguments(output_dir=str(tmp_path / str(batch)), per_device_train_batch_size=batch, max_steps=3,
                                 gradient_accumulation_steps=accumulate, learning_rate=0.5, report_to=[], save_strategy="no",
                                 use_cpu=True, disable_tqdm=True, lr_scheduler_type="constant", max_grad_norm=0.0)
        trainer = trainer_class(model=model, args=args, train_dataset=ListDataset(ids, y))
        trainer.train()
        finals.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
    moved = max(float(p.abs().max()) for n, p in finals[0].items() if "lora_B" in n)
    assert moved > 1e-3
    assert max(float((finals[0][n] - finals[1][n]).abs().max()) for n in finals[0]) < 1e-6 * max(1.0, moved)
    return trainer


def test_trainer_accumulated_steps_equal_one_batch_for_models_taking_loss_kwargs(tmp_path):
    """Batch 8 x 2 accumulation steps moves the factors as batch 16 does (one Euler step is
    ``-lr`` times the mean gradient), also for a model whose forward takes ``**kwargs``, to which
    the Trainer would otherwise leave the accumulation's division."""
    from transformers import TrainingArguments

    from odelora.integrations.trainer import ODELoRATrainer

    trainer = _assert_batch_8x2_steps_as_batch_16(tmp_path, ODELoRATrainer)
    model, (ids, y) = trainer.model, data(64)
    assert trainer._loss_counts is False and not trainer.model_accepts_loss_kwargs  # the model's mean ignores the count
    with pytest.raises(ValueError, match="fp16 loss scaling"):
        ODELoRATrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), fp16=True, report_to=[], use_cpu=True),
                       train_dataset=ListDataset(ids, y), odelora_kwargs=dict(method="rk4"))


def test_a_subclass_loss_that_divides_by_the_label_count_is_given_it(tmp_path):
    """transformers' way to customize the loss: override ``compute_loss``, normalize by
    ``num_items_in_batch`` and say so with ``loss_is_scaled_for_ga = True``. The count question
    goes through that ``compute_loss`` (it went to the model's own mean loss, which ignores the
    count: the override then got None, fell back to the micro-batch's size, and with two
    accumulation steps every step was twice as long). The question is asked with gradients on: a
    loss may take gradients itself (a gradient penalty)."""
    from odelora.integrations.trainer import ODELoRATrainer

    counts = []

    class SumLoss(ODELoRATrainer):
        loss_is_scaled_for_ga = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            out = model(**inputs)
            counts.append(num_items_in_batch)
            n = num_items_in_batch if num_items_in_batch is not None else labels.numel()
            loss = torch.nn.functional.cross_entropy(out["logits"], labels, reduction="sum") / n
            (slope,) = torch.autograd.grad(loss, out["logits"], create_graph=True)  # a penalty needs gradients in the probe too
            loss = loss + 0.0 * slope.square().sum()
            return (loss, out) if return_outputs else loss

    trainer = _assert_batch_8x2_steps_as_batch_16(tmp_path, SumLoss)
    assert trainer._loss_counts is True and counts[-1] is not None and int(counts[-1]) > 0


class TokenDataset(torch.utils.data.Dataset):
    """Sequences of 2 to 12 label tokens (the rest -100): micro-batches of unequal label counts."""

    def __init__(self, n=16, length=12):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 60, (n, length), generator=g)
        self.labels = self.ids.clone()
        for i, k in enumerate(torch.randint(2, length + 1, (n,), generator=g).tolist()):
            self.labels[i, k:] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _tiny_llama_trainer(out, data, batch: int, accumulate: int = 1, layers: int = 1, max_steps: int = 1, in_order: bool = False,
                       dtype=torch.float64):
    """An ODELoRATrainer of a tiny PEFT Llama (seed 0) on ``data``, in the dataset's order if ``in_order``."""
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from odelora.integrations.trainer import ODELoRATrainer

    class InOrder(ODELoRATrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=48, max_position_embeddings=32)
    model = get_peft_model(LlamaForCausalLM(cfg).to(dtype), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch, max_steps=max_steps,
                             gradient_accumulation_steps=accumulate, learning_rate=0.1, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True, lr_scheduler_type="constant", max_grad_norm=0.0)
    return (InOrder if in_order else ODELoRATrainer)(model=model, args=args, train_dataset=data)


def _assert_batch_4x2_steps_as_batch_8(tmp_path, make_data, **kw) -> None:
    """One step of batch 8 and one of batch 4 with 2 accumulation steps move the LoRA factors alike
    (float64), with no skipped step, the model having said that its loss takes the label count."""
    import warnings

    finals = []
    for batch, accumulate in ((8, 1), (4, 2)):
        trainer = _tiny_llama_trainer(tmp_path / str(batch), make_data(), batch, accumulate, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a skipped step warns
            trainer.train()
        assert trainer._loss_counts is True and trainer.model_accepts_loss_kwargs
        finals.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n})
    moved = max(float(p.abs().max()) for p in finals[0].values())
    assert moved > 1e-4
    assert max(float((finals[0][n] - finals[1][n]).abs().max()) for n in finals[0]) < 1e-12 * moved


def _masked_first(n: int = 4) -> "TokenDataset":
    data = TokenDataset()
    data.labels[:n] = -100  # the first micro-batch of batch n
    return data


def test_trainer_accumulated_steps_equal_one_batch_for_a_causal_lm_whose_loss_takes_the_label_count(tmp_path):
    """A causal LM's loss divides by the label count the Trainer gives it: the accumulated
    micro-batches then sum to the mean over all their labels, which the Trainer keeps (the
    model is asked at the first batch). Setting ``model_accepts_loss_kwargs = False`` for every
    model, as for classification heads, made the step a mean of micro-batch means: 11% off
    batch 8 with two micro-batches of 32 and 38 label tokens."""
    _assert_batch_4x2_steps_as_batch_8(tmp_path, TokenDataset, layers=2)


def test_an_accumulated_first_step_whose_first_micro_batch_is_masked_asks_the_next_one(tmp_path):
    """With gradient accumulation the model is asked at the step's first micro-batch that can
    answer: one whose labels are all masked cannot (its loss is 0 or 0/0 whatever the count), and
    asking only it left the first step a mean of micro-batch means, 0/0, skipped. Now the step
    equals one batch of 8 with the same labels."""
    _assert_batch_4x2_steps_as_batch_8(tmp_path, _masked_first, in_order=True)


def test_the_loss_count_question_waits_for_a_batch_that_can_answer_and_ranks_agree(tmp_path, monkeypatch):
    """A first micro-batch whose labels are all masked has loss 0 (or 0/0) whatever the count: the
    question stays open and the next batch answers it. Processes agree on one answer (a rank that
    counted labels alone would wait forever in the count's gather): no where any says no,
    undecided where any could not tell."""
    import torch.distributed as dist

    trainer = _tiny_llama_trainer(tmp_path, _masked_first(), 4, max_steps=2, in_order=True, dtype=torch.float32)
    asked = []
    ask = trainer._loss_divides_by_count
    monkeypatch.setattr(trainer, "_loss_divides_by_count", lambda batch: asked.append(ask(batch)) or asked[-1])
    with pytest.warns(RuntimeWarning, match="skipped a step"):  # the masked batch's mean loss is 0/0 before the answer
        trainer.train()
    assert asked == [None, True] and trainer._loss_counts is True, asked

    other = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op: t.copy_(torch.minimum(t, torch.tensor([other[0]]))))
    for mine, theirs, agreed in ((True, 2, True), (True, 0, False), (True, 1, None), (None, 2, None), (False, 2, False)):
        other[:] = [theirs]
        assert trainer._agreed(mine) is agreed


def test_the_loss_count_question_leaves_batch_norm_statistics_and_the_run_as_they_were(tmp_path):
    """The two forwards that ask the model whether its loss takes the label count run in train mode:
    they must leave no trace, batch norms' running statistics included (no_grad does not stop
    their update); the run equals one whose answer was given beforehand."""
    from transformers import TrainingArguments

    from odelora.integrations.trainer import ODELoRATrainer

    class BNNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn, self.fc2 = torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)
            self.emb = torch.nn.Embedding(50, 16)

        def forward(self, ids=None, labels=None, num_items_in_batch=None, **kwargs):
            out = self.fc2(self.bn(self.fc1(self.emb(ids).mean(1))))
            loss = torch.nn.functional.cross_entropy(out, labels, reduction="sum") / (num_items_in_batch or labels.numel())
            return {"loss": loss, "logits": out}

    ids, y = data(32)
    runs = []
    for given in (None, True):
        torch.manual_seed(0)
        model = get_peft_model(BNNet(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]))
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=2,
                                 learning_rate=0.1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, max_grad_norm=0.0)
        trainer = ODELoRATrainer(model=model, args=args, train_dataset=ListDataset(ids, y))
        if given is not None:
            trainer._loss_counts = trainer.model_accepts_loss_kwargs = given
        trainer.train()
        assert trainer._loss_counts is True
        runs.append({n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]})
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_trainer_passes_its_adamw_arguments_to_the_companion_and_to_adam_pairs(tmp_path):
    """weight_decay, adam_beta1/2 and adam_epsilon reach the companion (and the pairs with
    preconditioner='adam'); odelora_kwargs win; a weight decay the plain pairs cannot take warns."""
    from transformers import TrainingArguments

    from odelora.integrations.trainer import ODELoRATrainer

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], modules_to_save=["head"]))
    ids, y = data(32)
    args = TrainingArguments(output_dir=str(tmp_path), weight_decay=0.5, adam_beta1=0.5, adam_beta2=0.9, adam_epsilon=1e-3,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    groups = lambda t: ([g for g in t.odelora.param_groups if g.get("companion")], [g for g in t.odelora.param_groups if not g.get("companion")])
    with pytest.warns(UserWarning, match="weight_decay=0.5 applies to the AdamW companion"):
        plain = ODELoRATrainer(model=model, args=args, train_dataset=ListDataset(ids, y))
        plain.create_optimizer()
    (decayed, bias), _ = groups(plain)  # biases take no weight decay, as in transformers' Trainer
    head = model.base_model.model.head.modules_to_save["default"]
    assert decayed["params"] == [head.weight] and bias["params"] == [head.bias] and bias["weight_decay"] == 0.0
    assert (decayed["weight_decay"], decayed["betas"], decayed["eps"]) == (0.5, (0.5, 0.9), 1e-3)
    adam = ODELoRATrainer(model=model, args=args, train_dataset=ListDataset(ids, y),
                          odelora_kwargs=dict(preconditioner="adam", eps=1e-6, companion_kwargs=dict(weight_decay=0.1)))
    adam.create_optimizer()
    (comp, _), (pairs,) = groups(adam)
    assert (comp["weight_decay"], comp["betas"]) == (0.1, (0.5, 0.9))
    assert (pairs["weight_decay"], pairs["betas"], pairs["eps"]) == (0.5, (0.5, 0.9), 1e-6)
    with pytest.warns(UserWarning, match="applies to nothing: odelora_kwargs' companion_kwargs set the companion's own"):
        ODELoRATrainer(model=model, args=args, train_dataset=ListDataset(ids, y),
                       odelora_kwargs=dict(companion_kwargs=dict(weight_decay=0.1))).create_optimizer()


def test_a_checkpoint_with_one_companion_group_says_how_to_resume_it():
    """Earlier versions kept the companion in one group; with decay=names it takes two (decayed,
    not decayed). Loading the one-group state says to pass decay=None, which then resumes it; the
    other way round, to pass the decay names."""
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], modules_to_save=["head"]))
    names = [n for n, p in model.named_parameters() if p.requires_grad and "head" in n and n.endswith("weight")]
    saved = create_odelora_optimizer(model, lr=0.1).state_dict()
    split = create_odelora_optimizer(model, lr=0.1, decay=names)
    with pytest.raises(ValueError, match=r"companion groups: 1 saved, 2 here.*pass decay=None"):
        split.load_state_dict(saved)
    create_odelora_optimizer(model, lr=0.1, decay=None).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"companion groups: 2 saved, 1 here.*pass decay=names.*get_decay_parameter_names"):
        create_odelora_optimizer(model, lr=0.1).load_state_dict(split.state_dict())  # a Trainer's checkpoint, loaded by hand


def test_create_odelora_optimizer_rejects_a_name_string_and_a_companion_of_its_own():
    """A string is a collection of characters, which would match no name and leave every
    companion tensor without decay; the companion is what the function finds itself."""
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], modules_to_save=["head"]))
    name = next(n for n, p in model.named_parameters() if p.requires_grad and "head" in n and n.endswith("weight"))
    with pytest.raises(TypeError, match=r"decay must be a collection of parameter names, got the string .*: pass \["):
        create_odelora_optimizer(model, lr=0.1, decay=name)
    with pytest.raises(TypeError, match="finds the companion itself"):
        create_odelora_optimizer(model, lr=0.1, companion=[])
    assert [len(g["params"]) for g in create_odelora_optimizer(model, lr=0.1, decay=[name]).param_groups if g.get("companion")] == [1, 1]


@pytest.mark.parametrize("how", ["label_smoothing", "compute_loss_func"])
def test_every_stage_gets_the_labels_when_compute_loss_takes_them_out(how, tmp_path):
    """transformers' compute_loss pops the labels from its inputs with label smoothing or a
    compute_loss_func: each RK stage has its own copy of the batch. Every stage's loss is the
    smoothed cross-entropy of the model at that stage (checked on the first, at the start)."""
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

    from odelora.integrations.trainer import ODELoRATrainer

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = get_peft_model(BertForSequenceClassification(cfg),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
    ids = torch.randint(0, 50, (32, 6), generator=torch.Generator().manual_seed(0))
    y = ids[:, 0] % 3

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": y[i]}

    smooth = dict(label_smoothing_factor=0.1) if how == "label_smoothing" else {}
    func = (lambda out, labels, num_items_in_batch=None: torch.nn.functional.cross_entropy(out["logits"], labels, label_smoothing=0.1)) \
        if how == "compute_loss_func" else None
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=32, max_steps=2, learning_rate=0.5, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, **smooth)
    trainer = ODELoRATrainer(model=model, args=args, train_dataset=Batches(), compute_loss_func=func,
                             odelora_kwargs=dict(method="rk4", companion_lr=1e-2))
    with torch.no_grad():
        start = float(torch.nn.functional.cross_entropy(model(input_ids=ids).logits, y, label_smoothing=0.1))
    losses = recorded_losses(trainer)
    trainer.train()
    assert len(losses) == 8 and all(math.isfinite(l) for l in losses)
    assert losses[0] == pytest.approx(start, rel=1e-5) and losses[4] < losses[0]


class Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 8, 6) / 3)


class Experts(torch.nn.Module):
    """A mixture's expert weights stacked in one 3-D parameter (PEFT's ``target_parameters``)."""

    def __init__(self):
        super().__init__()
        self.experts, self.fc = Stack(), torch.nn.Linear(6, 4)


def test_stacked_experts_embedding_and_conv_lora_are_no_pairs():
    """PEFT keeps the LoRA factors of E stacked experts in one (rE x in, out x rE) pair whose
    columns interleave the experts: the model depends on each expert's product, not on B @ A, so
    they go to the companion (with a warning); models with no matrix pair at all are refused
    with a message that says why (not "no LoRA layers" or "frozen")."""
    torch.manual_seed(0)
    model = get_peft_model(Experts(), LoraConfig(r=2, lora_alpha=2, target_modules=["fc"], target_parameters=["experts.weight"]))
    B = next(p for n, p in model.named_parameters() if "lora_B" in n and "fc" not in n)
    assert B.shape[1] == 6  # r * 3 experts columns
    with pytest.warns(UserWarning, match=r"1 LoRA layer\(s\) of stacked experts"):
        part = partition(model)
    assert [p.name.rsplit(".", 1)[-1] for p in part.pairs] == ["fc[default]"]
    assert [n.rsplit(".", 1)[-1] for n in part.unmovable] == ["experts[default]"]
    assert sorted(why for _, _, why in part.others) == 2 * ["LoRA factors of 3 experts, whose products (not B @ A) enter the model"]
    only = get_peft_model(Experts(), LoraConfig(r=2, lora_alpha=2, target_parameters=["experts.weight"]))
    with pytest.warns(UserWarning, match="stacked experts"), pytest.raises(ValueError, match="stacked-expert LoRA, AdaLoRA or a LoRA variant"):
        create_odelora_optimizer(only, lr=0.1)

    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.emb = torch.nn.Conv2d(3, 8, 3), torch.nn.Embedding(50, 8)

    for target in ("conv", "emb"):
        odd = get_peft_model(Conv(), LoraConfig(r=4, lora_alpha=8, target_modules=[target]))
        with pytest.raises(ValueError, match="embedding, convolution or stacked-expert LoRA, AdaLoRA or a LoRA variant other than DoRA"):
            create_odelora_optimizer(odd, lr=0.1)
        with pytest.raises(ValueError, match=r"adapter\(s\) \['default'\] have no matrix pair"):
            partition(odd, "default")


def test_adalora_and_lora_variants_other_than_dora_are_no_pairs_and_other_tuners_are_named():
    """AdaLoRA's update is B (A * E) / ranknum and KaSA's s B diag(E) A: neither is s B @ A of free
    factors, which is what the flows move. Their factors go to the companion with a warning (AdaLoRA
    crashed pair discovery: its factors are bare parameters); a model with nothing else is refused,
    as one with LoHa, VeRA or IA3 adapters is, by name."""
    from peft import AdaLoraConfig, LoHaConfig
    from peft.tuners.lora.config import KasaConfig

    torch.manual_seed(0)
    ada = get_peft_model(Net(), AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=["fc1", "fc2"], total_step=10))
    with pytest.warns(UserWarning, match=r"2 LoRA layer\(s\) whose update is not s \* B @ A of free factors .*\(AdaLoRA\)"):
        part = partition(ada)
    assert not part.pairs and sum("LoRA factors of AdaLoRA" in why for _, _, why in part.others) == 4
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="AdaLoRA or a LoRA variant other than DoRA"):
        create_odelora_optimizer(ada, lr=0.1)
    kasa = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"], kasa_config=KasaConfig()))
    with pytest.warns(UserWarning, match=r"1 LoRA layer\(s\) whose update is not .*\(the Kasa variant\)"):
        part = partition(kasa)
    assert not part.pairs and sum("LoRA factors of the Kasa variant" in why for _, _, why in part.others) == 2
    with pytest.warns(UserWarning, match="aLoRA is currently only supported"):  # aLoRA: s B @ A after the invocation tokens
        alora = get_peft_model(Net(), LoraConfig(r=2, target_modules=["fc1"], alora_invocation_tokens=[1, 2]))
    assert [p.name for p in partition(alora).pairs] == ["base_model.model.fc1[default]"]
    loha = get_peft_model(Net(), LoHaConfig(r=4, target_modules=["fc1"]))
    with pytest.raises(ValueError, match="the model's PEFT adapters are LOHA, not LoRA"):
        create_odelora_optimizer(loha, lr=0.1)


def test_an_unselected_adapters_embedding_and_dora_tensors_are_left_as_they_are():
    """Tensors of adapters outside ``adapter=`` are left (listed, moved by nothing): their
    embedding LoRA and DoRA magnitudes went to the companion and moved."""
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=4, target_modules=["fc1"]), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["fc2", "emb"], use_dora=True))
    model.base_model.set_adapter(["a", "b"])
    b_names = {n for n, p in model.named_parameters() if p.requires_grad and (".b." in n or n.endswith(".b"))}
    assert any("lora_embedding" in n for n in b_names) and any("lora_magnitude" in n for n in b_names)
    with pytest.warns(UserWarning, match=r"adapters other than \['a'\]"):
        opt = create_odelora_optimizer(model, lr=0.1, adapter="a", companion_lr=1e-2)
    assert set(opt.partition.left) == b_names and not any(n in b_names for n, _, _ in opt.partition.others)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in b_names}
    ids, labels = data(8)
    opt.zero_grad()
    model(ids=ids, labels=labels)["loss"].backward()
    opt.step()
    assert all(torch.equal(before[n], p.detach()) for n, p in model.named_parameters() if n in b_names)


def test_a_step_skipped_by_the_loop_does_not_add_its_loss_to_the_next(tmp_path):
    """fp16's GradScaler skips ``optimizer.step()`` on overflow while the Trainer counts the step:
    the loss recorded with the next step is that step's own, not the sum of both."""
    from transformers import TrainingArguments

    from odelora.integrations.trainer import ODELoRATrainer

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], modules_to_save=["head"]))
    ids, y = data(64)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=32, max_steps=2, learning_rate=0.1, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = ODELoRATrainer(model=model, args=args, train_dataset=ListDataset(ids, y))
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # as the training loop sets it
    trainer.training_step(model, {"ids": ids[:32], "labels": y[:32]})  # its step never runs
    trainer.state.global_step += 1
    loss = trainer.training_step(model, {"ids": ids[32:], "labels": y[32:]})
    trainer.odelora.step()
    assert trainer.odelora.last_step.loss == pytest.approx(float(loss), rel=1e-6)


def test_trainer_logs_reach_every_callback_and_other_optimizers_are_refused(tmp_path):
    """The statistics are in a log entry before any other callback reads it (the Trainer runs its
    loggers, TensorBoard or wandb, before the callbacks passed to it); an optimizer that is not
    ODELoRA, ``lr`` in ``odelora_kwargs`` and the Trainer's own optimizer choices are refused or
    said to be ignored, not dropped silently."""
    from transformers import TrainerCallback, TrainingArguments

    from odelora.integrations.trainer import ODELoRACallback, ODELoRATrainer

    class Recorder(TrainerCallback):
        seen = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs or {}))

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    ids, y = data(64)
    kw = dict(output_dir=str(tmp_path), per_device_train_batch_size=32, max_steps=2, learning_rate=0.1, report_to=[],
              save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1)
    trainer = ODELoRATrainer(model=model, args=TrainingArguments(**kw), train_dataset=ListDataset(ids, y),
                             callbacks=[Recorder(), ODELoRACallback])
    assert sum(isinstance(c, ODELoRACallback) for c in trainer.callback_handler.callbacks) == 1
    trainer.train()
    logged = [x for x in Recorder.seen if "loss" in x]
    assert len(logged) == 2 and all(x["odelora_nfe_total"] == i + 1 for i, x in enumerate(logged))
    adamw = torch.optim.AdamW(model.parameters())
    with pytest.raises(TypeError, match="was given a AdamW"):
        ODELoRATrainer(model=model, args=TrainingArguments(**kw), train_dataset=ListDataset(ids, y), optimizers=(adamw, None))
    with pytest.raises(TypeError, match="must not set lr"):
        ODELoRATrainer(model=model, args=TrainingArguments(**kw), odelora_kwargs=dict(lr=0.1))
    with pytest.raises(TypeError, match=r"unknown key\(s\) \['methd'\]: it takes ODELoRA's options"):  # at construction, not train()
        ODELoRATrainer(model=model, args=TrainingArguments(**kw), odelora_kwargs=dict(methd="rk4"))
    with pytest.warns(UserWarning, match=r"ignores optim='sgd', optim_args='momentum=0.9': its optimizer is ODELoRA"):
        ODELoRATrainer(model=model, args=TrainingArguments(**kw, optim="sgd", optim_args="momentum=0.9"))
    default = {k: v for k, v in kw.items() if k != "learning_rate"}
    with pytest.warns(UserWarning, match=r"learning_rate is TrainingArguments' default 5e-05, chosen for AdamW"):
        ODELoRATrainer(model=model, args=TrainingArguments(**default))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # AdamW-like rates are right for the Adam path
        ODELoRATrainer(model=model, args=TrainingArguments(**default), odelora_kwargs=dict(preconditioner="adam"))
        ODELoRATrainer(model=model, args=TrainingArguments(**default), optimizers=(create_odelora_optimizer(model, lr=0.1), None))


def test_a_run_resumed_on_the_same_trainer_records_its_own_first_loss(tmp_path):
    """``train(resume_from_checkpoint=...)`` on the trainer that already ran: the first resumed step
    records the loss of its own batch, not that plus the previous run's loss at the same step."""
    from transformers import TrainingArguments

    from odelora.integrations.trainer import ODELoRATrainer

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    ids, y = data(96)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=32, max_steps=3, learning_rate=0.1,
                             report_to=[], save_steps=2, use_cpu=True, disable_tqdm=True)
    trainer = ODELoRATrainer(model=model, args=args, train_dataset=ListDataset(ids, y))
    trainer.train()
    losses = recorded_losses(trainer)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert len(losses) == 1 and trainer.odelora.last_step.loss == pytest.approx(losses[0], rel=1e-6)
