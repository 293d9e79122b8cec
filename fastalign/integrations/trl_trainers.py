"""Drop-in subclasses of TRL 1.16's GRPOTrainer and DPOTrainer whose losses run on fastalign.

- :class:`FastalignGRPOTrainer`: ``_compute_loss`` runs the policy's backbone, then
  :func:`fastalign.losses.linear_grpo_loss` on its final hidden states and lm_head (one pass over
  the vocabulary for token-level ratios: the loss gradient of each token is formed as soon as its
  log-prob is). It reproduces ``GRPOTrainer._compute_loss`` for ``loss_type`` in ``grpo``, ``bnpo``,
  ``dr_grpo``, ``dapo``, ``cispo``, ``sapo``, ``luspo``, ``vespo`` (normalizers, gradient-accumulation
  scaling, ``delta``, ``use_bias_correction_kl``, token/sequence importance sampling, the vLLM importance-sampling
  ratio, a static ``entropy_coef`` bonus, its gradient formed in the same pass; the high-entropy token
  mask and the off-policy sequence mask, which need all log-probs first, in two passes) and logs the same
  ``kl`` / ``entropy`` / ``clip_ratio/*`` / ``policy_loss`` / ``entropy_coef`` metrics.
- :class:`FastalignDPOTrainer`: ``_compute_loss`` takes the per-token log-probs from the backbone's
  hidden states through :func:`fastalign.linear_logprobs` and applies
  :func:`fastalign.losses.dpo_loss` for ``loss_type`` in ``sigmoid``, ``ipo``, ``hinge``, ``robust``
  (weighted combinations included), as ``DPOTrainer._compute_loss``.

What they cannot reproduce is refused with a ``ValueError`` at construction (or at the first batch
for per-batch inputs), never silently changed: GRPO's adaptive entropy control, VESPO with the
token masks, other loss types,
MoE aux loss, vision inputs; DPO's other loss types, f-divergences, WPO weighting, LD-DPO, MoE aux
loss, vision inputs, ``return_outputs``.
The DPO drop-in logs TRL's metrics except ``mean_token_accuracy`` (an argmax over the vocabulary:
another pass) and, for softcapped heads, ``logits/*``.

Numerics: with bf16 autocast, TRL rounds each logits tile to bf16 before its fp32 reduction;
fastalign keeps the GEMM output in fp32 (``linear_logprobs``), so bf16 runs agree to bf16 rounding
of the logits, fp32 runs to fp32 rounding.

Engines (accelerate's DDP, FSDP2, DeepSpeed ZeRO-3): the loss runs as the forward of the model the
engine wraps, and its fused LM-head part as the forward of the lm_head module
(:func:`fastalign.integrations.engines.run_as_forward`), so the engine's hooks unshard / gather the
head for exactly that computation and reduce its gradient as for the head's own forward.
"""

from __future__ import annotations

import torch

from fastalign.integrations.engines import run_as_forward
from fastalign.integrations.transformers import final_hidden_states, hidden_logprobs, lm_head_of
from fastalign.losses import dpo_loss, grpo_loss, linear_grpo_loss
from fastalign.losses._common import masked_mean

try:  # TRL is an optional dependency of fastalign
    from trl import DPOTrainer, GRPOTrainer
    from trl.trainer.utils import nanmax, nanmin
except ImportError as e:  # pragma: no cover
    raise ImportError("fastalign.integrations.trl_trainers needs trl (pip install trl)") from e

try:
    from accelerate.utils import is_peft_model
except ImportError:  # pragma: no cover

    def is_peft_model(model):  # type: ignore[no-redef]
        return False


_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def _unwrapped_lm(trainer, model):
    m = trainer.accelerator.unwrap_model(model)
    return m.get_base_model() if is_peft_model(m) else m


def _world_devices(trainer) -> int:
    return trainer.accelerator.num_processes


def _engine_call(trainer, model, fn, *args):
    """``fn(*args)`` as the forward of the module the engine wraps: ``model`` is what the Trainer hands
    ``compute_loss`` (a DDP / DeepSpeed wrapper, an FSDP2 root, or the model itself)."""
    inner = trainer.accelerator.unwrap_model(model)
    return run_as_forward(inner, fn, *args, via=None if inner is model else model)


class FastalignGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose loss is :func:`fastalign.losses.linear_grpo_loss`.

    Extra keyword arguments: ``fastalign_mode`` (``"auto" | "one_pass" | "two_pass"``, see
    :func:`linear_grpo_loss`) and ``fastalign_impl`` (``"auto" | "triton" | "torch"``).
    """

    SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")

    def __init__(self, *args, fastalign_mode: str = "auto", fastalign_impl: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.fastalign_mode = fastalign_mode
        self.fastalign_impl = fastalign_impl
        self._fastalign_check_config()

    def _fastalign_check_config(self) -> None:
        name = type(self).__name__
        if self.loss_type not in self.SUPPORTED_LOSS_TYPES:
            raise ValueError(
                f"{name}: loss_type={self.loss_type!r} is not supported (supported: "
                f"{self.SUPPORTED_LOSS_TYPES}); use trl.GRPOTrainer for it"
            )
        if getattr(self, "use_adaptive_entropy", False):
            raise ValueError(
                f"{name}: use_adaptive_entropy=True (the adaptive entropy controller) is not supported; "
                "a static entropy_coef is; use trl.GRPOTrainer for it"
            )
        if self.aux_loss_enabled:
            raise ValueError(f"{name}: MoE router aux loss (router_aux_loss_coef != 0) is not supported")
        if self.loss_type == "vespo" and (
            self.top_entropy_quantile < 1.0 or self.off_policy_mask_threshold is not None
        ):
            raise ValueError(
                f"{name}: loss_type='vespo' with the high-entropy token mask or the off-policy mask is not supported "
                f"(top_entropy_quantile={self.top_entropy_quantile}, off_policy_mask_threshold="
                f"{self.off_policy_mask_threshold}); use trl.GRPOTrainer for it"
            )

    def _compute_loss(self, model, inputs):
        name = type(self).__name__
        extra = [
            k
            for k in ("pixel_values", "image_grid_thw", "token_type_ids", "mm_token_type_ids")
            if inputs.get(k) is not None
        ]
        if extra:
            raise ValueError(f"{name}: multimodal / token-type inputs {extra} are not supported; use trl.GRPOTrainer")
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        T = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mode = "train" if self.model.training else "eval"

        loss_type = self.loss_type
        num_items = None
        if loss_type in ("dapo", "cispo", "vespo"):
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / _world_devices(self)
            if mode == "train":
                num_items = num_items * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        iw = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            iw = inputs["importance_sampling_ratio"]
        if loss_type == "vespo":  # TRL's VESPO folds the ratio into its sequence weight whenever it is there
            iw = inputs.get("importance_sampling_ratio")
        # TRL's bonus is - coef * mean_mask(H) / accumulation steps; the non-dapo/cispo types divide everything below
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1
        entropy_coef = (
            float(getattr(self, "entropy_coef", 0.0)) if getattr(self, "_entropy_bonus_enabled", False) else 0.0
        )
        if loss_type in ("dapo", "cispo", "vespo"):
            entropy_coef = entropy_coef / accum
        cast_fp32 = getattr(self.args, "cast_lm_head_to_fp32", False)
        token_masks = self.top_entropy_quantile < 1.0 or self.off_policy_mask_threshold is not None
        lm = _unwrapped_lm(self, model)

        def head_loss(hidden):  # the lm_head's forward: its parameters are unsharded / gathered here
            head = lm_head_of(lm)
            ctx = torch.autocast(hidden.device.type, enabled=False) if cast_fp32 else self.accelerator.autocast()
            with ctx:
                if token_masks:
                    return self._fastalign_masked_loss(
                        hidden, head, completion_ids, mask, inputs, iw, num_items, entropy_coef
                    )
                return linear_grpo_loss(
                    hidden,
                    head.weight,
                    completion_ids,
                    mask,
                    inputs["advantages"],
                    **self._fastalign_grpo_kwargs(inputs, num_items, iw),
                    bias=head.bias,
                    temperature=self.temperature,
                    softcap=head.softcap,
                    logit_scale=head.logit_scale,
                    entropy_coef=entropy_coef,
                    mode=self.fastalign_mode,
                    return_entropy=True,
                    impl=self.fastalign_impl,
                )

        def step_loss(input_ids, attention_mask):  # the forward of the model the engine wraps
            with self.accelerator.autocast():
                hidden = final_hidden_states(lm, input_ids, attention_mask)[:, -T - 1 : -1]
            if cast_fp32:
                hidden = hidden.float()
            return run_as_forward(lm.get_output_embeddings(), head_loss, hidden)

        loss, metrics = _engine_call(self, model, step_loss, input_ids, attention_mask)
        if loss_type in ("grpo", "bnpo", "dr_grpo", "sapo", "luspo") and mode == "train":
            loss = loss / self.current_gradient_accumulation_steps
        if getattr(self, "_entropy_bonus_enabled", False):
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(metrics["policy_loss"]).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        self._fastalign_log(metrics, inputs, mask, mode)
        return loss

    def _fastalign_grpo_kwargs(self, inputs, num_items, importance_weights) -> dict:
        loss_type = self.loss_type
        return dict(
            old_logp=inputs.get("old_per_token_logps"),
            ref_logp=inputs["ref_per_token_logps"] if self.beta != 0.0 else None,
            beta=self.beta,
            eps_low=self.epsilon_low,
            eps_high=self.epsilon_high,
            delta=None if loss_type in ("cispo", "sapo", "vespo") else self.args.delta,
            loss_type=loss_type,
            level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length,
            num_items=num_items,
            kl_bias_correction=bool(self.args.use_bias_correction_kl),
            importance_weights=importance_weights,
            sapo_temperature_pos=self.args.sapo_temperature_pos,
            sapo_temperature_neg=self.args.sapo_temperature_neg,
            **(
                dict(
                    vespo_k_pos=self.args.vespo_k_pos,
                    vespo_lambda_pos=self.args.vespo_lambda_pos,
                    vespo_k_neg=self.args.vespo_k_neg,
                    vespo_lambda_neg=self.args.vespo_lambda_neg,
                )
                if loss_type == "vespo"
                else {}
            ),
        )

    def _fastalign_masked_loss(self, hidden, head, completion_ids, mask, inputs, iw, num_items, entropy_coef):
        """The entropy mask and the off-policy sequence mask need every token's entropy / log-prob before
        any gradient: two passes (``linear_logprobs`` forward, then its backward). Both masks multiply the
        policy term as TRL applies them (with the vLLM ratio: one product of token weights)."""
        targets = completion_ids.masked_fill(mask == 0, -100)
        logp, ent = hidden_logprobs(
            hidden, head, targets, temperature=self.temperature, return_entropy=True, impl=self.fastalign_impl
        )
        adv = inputs["advantages"]
        adv2 = adv.unsqueeze(1) if adv.dim() == 1 else adv
        weights = iw
        if self.off_policy_mask_threshold is not None:
            old = inputs.get("old_per_token_logps")
            old = logp.detach() if old is None else old
            sampling = inputs.get("sampling_per_token_logps", old)
            opsm = self.get_off_policy_mask(
                advantages=adv2,
                per_token_logps=logp,
                sampling_per_token_logps=sampling,
                mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold,
            )
            opsm = opsm.to(logp.dtype)
            weights = opsm if weights is None else opsm * weights
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(ent.detach(), mask, 1 - self.top_entropy_quantile)
            em = entropy_mask.to(logp.dtype)
            weights = em if weights is None else weights * em
        if weights is not None and weights.shape != logp.shape:
            weights = weights.expand_as(logp)
        kw = self._fastalign_grpo_kwargs(inputs, num_items, weights)
        loss, metrics = grpo_loss(logp, kw.pop("old_logp"), adv, mask, **kw)
        if entropy_coef != 0.0:
            eff = mask if entropy_mask is None else mask * entropy_mask
            loss = loss - entropy_coef * masked_mean(ent, eff)
        metrics["logp"] = logp.detach()
        metrics["entropies"] = ent.detach()
        return loss, metrics

    @torch.no_grad()
    def _fastalign_log(self, metrics, inputs, mask, mode) -> None:
        """TRL's logged statistics, from the detached log-probs the loss returned."""
        logp = metrics["logp"]
        old = inputs.get("old_per_token_logps")
        old = logp if old is None else old
        adv = inputs["advantages"]
        adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
        m = mask.to(logp.dtype)
        log_ratio = logp - old
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        coef_1 = torch.exp(log_ratio)

        def global_masked_mean(x):
            if x.shape[1] == 1:
                local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
            else:
                local = torch.stack([(x * m).sum(), m.sum().float()])
            tot = self.accelerator.reduce(local, reduction="sum")
            return (tot[0] / tot[1].clamp(min=1.0)).item()

        def masked_seq_mean(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * m).sum(-1) / m.sum(-1)

        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            kl = torch.exp(ref - logp) - (ref - logp) - 1
            if self.args.use_bias_correction_kl:
                kl = kl * coef_1
            self._metrics[mode]["kl"].append(global_masked_mean(kl))
        self._metrics[mode]["entropy"].append(global_masked_mean(metrics["entropies"]))
        if self.loss_type == "cispo":
            clipped = ((coef_1 > self.epsilon_high) & (adv > 0)).float()
            self._metrics[mode]["cispo_clip_ratio"].append(global_masked_mean(clipped))
            return
        if self.loss_type == "vespo":  # phi is one value per sequence: a global mean over sequences
            n = float(logp.shape[0])
            local = torch.stack([metrics["vespo/phi_seq_mean"] * n, torch.tensor(n, device=logp.device)])
            tot = self.accelerator.reduce(local, reduction="sum")
            self._metrics[mode]["vespo/phi_seq_mean"].append((tot[0] / tot[1].clamp(min=1.0)).item())
            return
        if self.loss_type == "sapo":
            return
        if self.args.delta is not None:
            coef_1 = torch.clamp(coef_1, max=self.args.delta)
        low = (coef_1 < 1 - self.epsilon_low) & (adv < 0)
        high = (coef_1 > 1 + self.epsilon_high) & (adv > 0)
        self._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(low.float()))
        self._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(high.float()))
        self._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean((low | high).float()))
        self._metrics[mode]["clip_ratio/low_min"].append(
            nanmin(self.accelerator.gather(masked_seq_mean(low.float()))).item()
        )
        self._metrics[mode]["clip_ratio/high_max"].append(
            nanmax(self.accelerator.gather(masked_seq_mean(high.float()))).item()
        )


class FastalignDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` whose policy log-probs come from :func:`fastalign.linear_logprobs` and whose loss is
    :func:`fastalign.losses.dpo_loss` (``sigmoid``, ``ipo``, ``hinge``, ``robust``; weighted sums of them).

    ``fastalign_impl``: ``"auto" | "triton" | "torch"``. The reference log-probs come from TRL's own path
    (precomputed, or ``compute_ref_log_probs`` without gradient).
    """

    SUPPORTED_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")

    def __init__(self, *args, fastalign_impl: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.fastalign_impl = fastalign_impl
        name = type(self).__name__
        bad = [t for t in self.loss_types if t not in self.SUPPORTED_LOSS_TYPES]
        if bad:
            raise ValueError(
                f"{name}: loss_type {bad} not supported (supported: {self.SUPPORTED_LOSS_TYPES}); "
                "use trl.DPOTrainer for it"
            )
        if self.f_divergence_type != "reverse_kl":
            raise ValueError(
                f"{name}: f_divergence_type={self.f_divergence_type!r} is not supported (only 'reverse_kl')"
            )
        if self.use_weighting:
            raise ValueError(f"{name}: use_weighting=True (WPO) is not supported")
        if self.ld_alpha is not None:
            raise ValueError(f"{name}: ld_alpha={self.ld_alpha} (LD-DPO) is not supported")
        if self.aux_loss_enabled:
            raise ValueError(f"{name}: MoE router aux loss (router_aux_loss_coef != 0) is not supported")
        if getattr(self, "_is_vision_dataset", False):
            raise ValueError(f"{name}: vision datasets are not supported; use trl.DPOTrainer")

    def _compute_loss(self, model, inputs, return_outputs):
        name = type(self).__name__
        if return_outputs:
            raise ValueError(
                f"{name}: return_outputs=True (logits for compute_metrics) is not supported: "
                "fastalign never builds the logits"
            )
        non_model = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
        extra = [k for k in inputs if k not in non_model and k not in _MODEL_INPUTS]
        if extra:
            raise ValueError(f"{name}: model inputs {extra} are not supported; use trl.DPOTrainer")
        mode = "train" if self.model.training else "eval"
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[..., 1:]
        labels = input_ids.masked_fill(completion_mask == 0, -100)[:, 1:]

        lm = _unwrapped_lm(self, model)
        kw = {k: inputs[k] for k in ("position_ids",) if k in inputs}

        def head_logps(hidden):  # the lm_head's forward: its parameters are unsharded / gathered here
            head = lm_head_of(lm)
            per_token, entropy = hidden_logprobs(hidden, head, labels, return_entropy=True, impl=self.fastalign_impl)
            mean_logits = self._fastalign_mean_logits(hidden, head, shift_mask)
            return per_token.sum(dim=1), entropy, mean_logits

        def step_logps(input_ids, attention_mask):  # the forward of the model the engine wraps
            with self.accelerator.autocast():
                hidden = final_hidden_states(lm, input_ids, attention_mask, **kw)[:, :-1]
                return run_as_forward(lm.get_output_embeddings(), head_logps, hidden)

        logps, entropy, mean_logits = _engine_call(self, model, step_logps, input_ids, attention_mask)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)

        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_model = self.model if self.ref_model is None else self.ref_model
            ref_inputs = {k: v for k, v in inputs.items() if k not in ("ref_chosen_logps", "ref_rejected_logps")}
            with torch.no_grad():
                ref_chosen, ref_rejected = self.compute_ref_log_probs(ref_model, ref_inputs)

        lengths = completion_mask.sum(dim=1)
        chosen_len, rejected_len = lengths.chunk(2, dim=0)
        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            part, _ = dpo_loss(
                chosen_logps,
                rejected_logps,
                ref_chosen,
                ref_rejected,
                beta=self.beta,
                loss_type=loss_type,
                label_smoothing=self.label_smoothing if loss_type == "robust" else 0.0,
                chosen_lengths=chosen_len,
                rejected_lengths=rejected_len,
            )
            loss = loss + part * weight

        self._fastalign_log(entropy, shift_mask, inputs, chosen_logps, rejected_logps, ref_chosen, ref_rejected, mode)
        self._fastalign_log_mean_logits(mean_logits, shift_mask, mode)
        return loss

    @torch.no_grad()
    def _fastalign_mean_logits(self, hidden, head, mask) -> torch.Tensor | None:
        """The masked sums of the vocabulary-mean logit ``[chosen, rejected]`` for TRL's ``logits/chosen`` /
        ``logits/rejected``: the mean logit is linear in the hidden state (``scale * (h . mean_v W_v +
        mean_v b_v)``) without softcapping, so it costs O(N D). With softcapping: None, not logged (it
        would need another pass over the vocabulary)."""
        if head.softcap is not None:
            return None
        w_mean = head.weight.float().mean(0)
        z = hidden.float() @ w_mean
        if head.bias is not None:
            z = z + head.bias.float().mean()
        z = z * head.logit_scale * mask
        return torch.stack([zs.sum() for zs in z.chunk(2, dim=0)])

    @torch.no_grad()
    def _fastalign_log_mean_logits(self, sums, mask, mode) -> None:
        if sums is None:
            return
        acc = self.accelerator
        for part, total, ms in zip(("chosen", "rejected"), sums, mask.chunk(2, dim=0)):
            total = acc.gather_for_metrics(total).sum().item()
            count = acc.gather_for_metrics(ms.sum()).sum().item()
            self._metrics[mode][f"logits/{part}"].append(total / count if count > 0 else 0.0)

    @torch.no_grad()
    def _fastalign_log(
        self, entropy, mask, inputs, chosen_logps, rejected_logps, ref_chosen, ref_rejected, mode
    ) -> None:
        acc = self.accelerator
        ent_sum = acc.gather_for_metrics((entropy.detach() * mask).sum()).sum()
        n_tok = acc.gather_for_metrics(mask.sum()).sum()
        self._metrics[mode]["entropy"].append((ent_sum / n_tok).item() if n_tok > 0 else 0.0)
        if mode == "train":
            num_tokens = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // getattr(self, "_tp_size", 1)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        chosen_rewards = self.beta * (chosen_logps.detach() - ref_chosen)
        rejected_rewards = self.beta * (rejected_logps.detach() - ref_rejected)
        cr, rr = acc.gather(chosen_rewards), acc.gather(rejected_rewards)
        self._metrics[mode]["rewards/chosen"].append(cr.mean().item())
        self._metrics[mode]["rewards/rejected"].append(rr.mean().item())
        self._metrics[mode]["rewards/accuracies"].append(
            acc.gather((chosen_rewards > rejected_rewards).float()).mean().item()
        )
        self._metrics[mode]["rewards/margins"].append(acc.gather(chosen_rewards - rejected_rewards).mean().item())
        self._metrics[mode]["logps/chosen"].append(acc.gather(chosen_logps.detach()).mean().item())
        self._metrics[mode]["logps/rejected"].append(acc.gather(rejected_logps.detach()).mean().item())
