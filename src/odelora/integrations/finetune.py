"""`odelora finetune`: LoRA fine-tuning of all-MiniLM-L6-v2 on BBC News topics."""


def add_arguments(p) -> None:
    p.add_argument("--steps", type=int, default=200)


def main(args) -> int:
    raise SystemExit("odelora finetune is not available yet")
