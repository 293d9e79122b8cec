"""DPO with TRL's trainer, the policy log-probs and the loss running on fastalign (no logits).

    python examples/dpo_trl.py                         # tiny random model, CPU, a few steps
    python examples/dpo_trl.py --model Qwen/Qwen2.5-0.5B-Instruct --bf16 --steps 50
    python examples/dpo_trl.py --loss-type ipo         # sigmoid | ipo | hinge | robust
    python examples/dpo_trl.py --stock                 # the same run with trl.DPOTrainer

FastalignDPOTrainer is a drop-in subclass of trl.DPOTrainer for the sigmoid, ipo, hinge and robust
losses (and weighted sums of them).
"""

import argparse
import os
import tempfile

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from fastalign.integrations.trl_trainers import FastalignDPOTrainer
from fastalign.utils.tiny_models import save_tiny_model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model id or path (default: a tiny random Qwen2)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--loss-type", default="sigmoid", choices=FastalignDPOTrainer.SUPPORTED_LOSS_TYPES)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--stock", action="store_true", help="run trl.DPOTrainer instead (for comparison)")
    args = p.parse_args(argv)

    out = tempfile.mkdtemp(prefix="fastalign_dpo_")
    model = args.model
    if model is None:
        model = save_tiny_model(os.path.join(out, "tiny"))
    data = Dataset.from_dict(
        {
            "prompt": ["a b c", "d e", "f g h i", "j", "k l", "m n o"] * 4,
            "chosen": ["x y", "z", "k l m", "n o", "p", "q r"] * 4,
            "rejected": ["p", "q r s", "t", "u v w", "x y z", "a"] * 4,
        }
    )
    cfg = DPOConfig(
        output_dir=out,
        per_device_train_batch_size=4,
        max_steps=args.steps,
        loss_type=[args.loss_type],
        beta=args.beta,
        label_smoothing=0.1 if args.loss_type == "robust" else 0.0,
        learning_rate=1e-6 if args.model else 1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        bf16=args.bf16,
        use_cpu=not args.bf16,
    )
    cls = DPOTrainer if args.stock else FastalignDPOTrainer
    trainer = cls(model=model, args=cfg, train_dataset=data)
    trainer.train()
    for row in trainer.state.log_history:
        if "loss" in row:
            print({k: row[k] for k in ("step", "loss", "rewards/margins", "rewards/accuracies") if k in row})


if __name__ == "__main__":
    main()
