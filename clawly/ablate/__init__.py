"""Abliteration itself: the residual stream read at the probe position (`activations`), refusal
directions and their files (`directions`), learned directions (`rdo`), category mode
(`categories`), the weight change and its layer kernel (`ablation`), its LoRA form (`lora`), edits
that depend on the request (`edits`: null space, least squares; `distill`: a trained adapter) and
the research views of the residual geometry (`research`).

May import `clawly.measure`, `clawly.model`, `clawly.data` and the core modules.
"""
