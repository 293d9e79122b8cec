"""GRPO with TRL's trainer, the loss running on fastalign (one pass over the vocabulary, no logits).

    python examples/grpo_trl.py                       # tiny random model, CPU, a few steps
    python examples/grpo_trl.py --model Qwen/Qwen2.5-0.5B-Instruct --steps 50 --bf16   # a real one, on GPU
    python examples/grpo_trl.py --stock               # the same run with trl.GRPOTrainer, to compare

FastalignGRPOTrainer is a drop-in subclass of trl.GRPOTrainer: same config, same logs; it refuses the
options whose math it does not reproduce (entropy mask / bonus, off-policy sequence mask).
"""

import argparse
import os
import tempfile

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from fastalign.integrations.trl_trainers import FastalignGRPOTrainer
from fastalign.utils.tiny_models import save_tiny_model


def reward_len(completions, **kwargs):
    """Toy reward: prefer completions of about 20 characters."""
    return [-abs(20 - len(c)) / 20.0 for c in completions]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model id or path (default: a tiny random Qwen2)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--loss-type", default="dapo", choices=FastalignGRPOTrainer.SUPPORTED_LOSS_TYPES)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--stock", action="store_true", help="run trl.GRPOTrainer instead (for comparison)")
    args = p.parse_args(argv)

    out = tempfile.mkdtemp(prefix="fastalign_grpo_")
    model = args.model
    if model is None:
        model = save_tiny_model(os.path.join(out, "tiny"))
    prompts = ["a b c", "d e f g", "h i", "j k l", "m n", "o p q", "r s t u", "v w"]
    cfg = GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=16,
        max_steps=args.steps,
        loss_type=args.loss_type,
        beta=args.beta,
        learning_rate=1e-5 if args.model else 1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        bf16=args.bf16,
        use_cpu=not args.bf16,
        gradient_checkpointing=False,
    )
    cls = GRPOTrainer if args.stock else FastalignGRPOTrainer
    trainer = cls(
        model=model, reward_funcs=reward_len, args=cfg, train_dataset=Dataset.from_dict({"prompt": prompts * 8})
    )
    trainer.train()
    for row in trainer.state.log_history:
        if "loss" in row:
            print({k: row[k] for k in ("step", "loss", "kl", "entropy", "reward") if k in row})


if __name__ == "__main__":
    main()
