"""Per-GPU memory of a DIVA run, before it runs: model states, activations, DIVA extras.

* **Model states** come from DeepSpeed's own estimators
  (``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``) on the
  trainable parameters. Those estimators assume every parameter trains; a DIVA run freezes most
  of the backbone, whose parameters then cost only their bf16 copy (replicated under ZeRO-2,
  partitioned under ZeRO-3). Without DeepSpeed: parameters, gradients and AdamW's two moments.
* **Activations** are the tensors autograd keeps for backward, counted per token and block from
  what each op of the block saves (written out in ``block_bytes``). The model is ours to write:
  no library estimates the saved tensors of a *partially* trainable model, where a frozen block
  above the trainable ones keeps its attention and activation inputs but not its linear inputs.
  The test checks the figure against tensors measured with autograd's saved-tensor hooks.
* **Logits**: each flow keeps its supervised logits ``(B, S, V)`` plus the float log-softmax
  cross-entropy saves; stage 1's injected losses add one layer's float copy at a time.
* **DIVA extras**: encoders, readouts and critic (built on the meta device and counted), the EMA
  callback's float32 shadow of the trainable weights.

Attention is assumed to run a fused SDPA kernel (no ``T x T`` matrix kept); an eager attention
adds ``heads * T^2`` per block, which ``attention="eager"`` counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diva_lightning.objectives import FactorEncoders, LogitInjection, build_unique_estimator
from diva_lightning.planning.shapes import ModelShape

GIB = 2**30


@dataclass(frozen=True)
class RunSpec:
    """What a config decides about memory. Layers are 1-based inclusive ranges."""

    stage: str  # "sft", "stage1" or "stage2"
    micro_batch: int
    middle_layers: tuple[int, int]
    trainable_layers: tuple[int, int] | None = None  # stage 1: None (backbone frozen)
    checkpointing: bool = False
    bytes_per_value: int = 2  # bf16 weights and activations
    zero_stage: int = 0  # 0: no DeepSpeed
    offload: bool = False
    gpus_per_node: int = 1
    nodes: int = 1
    ema: bool = False  # an EMA callback shadows the trainable weights in float32
    shared_dim: int = 256
    unique_dim: int | None = None
    encoder_arch: str = "gated_mlp"
    readout_rank: int = 24
    critic_hidden: int = 256
    mask_ratio: float = 1.0  # fraction of image tokens the generation flow supervises
    attention: str = "fused"

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass
class MemoryPlan:
    """Bytes per GPU, by part. ``rows()`` gives the table ``diva-cli plan`` prints."""

    parts: dict[str, float] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def fits(self, gpu_bytes: float, reserve: float = 0.1) -> bool:
        """True when the total leaves ``reserve`` of the GPU for the CUDA context and the
        allocator's fragmentation."""
        return self.total <= gpu_bytes * (1 - reserve)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def diva_parameters(shape: ModelShape, spec: RunSpec) -> dict[str, int]:
    """Trainable DIVA modules of the stage, built on the meta device and counted."""
    if spec.stage == "sft":
        return {}
    with torch.device("meta"):
        encoders = FactorEncoders(shape.hidden, spec.shared_dim, spec.unique_dim, spec.encoder_arch)
        counts = {"encoders": _count(encoders)}
        if spec.stage == "stage1":
            readouts = LogitInjection(
                shape.text_vocab, shape.codebook, encoders.shared_dim, encoders.unique_dim,
                spec.readout_rank,
            )  # fmt: skip
            counts["readouts"] = _count(readouts)
        else:
            critic = build_unique_estimator(
                "nce_club", encoders.unique_dim, encoders.unique_dim, spec.critic_hidden
            )
            counts["critic"] = _count(critic)
    return counts


def model_states(total: int, trainable: int, largest_block: int, spec: RunSpec) -> float:
    """Bytes per GPU of parameters, gradients and optimizer states (DeepSpeed's estimators on
    the trainable part, the frozen part's bf16 copy beside them)."""
    frozen = total - trainable
    if spec.zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(
            trainable, spec.gpus_per_node, spec.nodes, cpu_offload=spec.offload
        )
        return gpu + 2 * frozen
    if spec.zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            trainable, largest_block, spec.gpus_per_node, spec.nodes,
            cpu_offload=spec.offload, cpu_offload_params=spec.offload,
        )  # fmt: skip
        return gpu + (0 if spec.offload else 2 * frozen / spec.gpus)
    p = spec.bytes_per_value
    return p * total + p * trainable + 2 * p * trainable  # weights, grads, AdamW moments


def block_bytes(shape: ModelShape, p: int, trainable: bool) -> float:
    """Bytes one block keeps for backward per token (fused attention).

    Gated (Llama, Gemma, Emu3, Chameleon): each RMSNorm keeps its float32 input, plus (weight
    trainable) the normalised value and its cast (``4D + 2pD``); attention keeps q, k, v (KV
    heads repeated) and its output (``4A``), o_proj its input when trainable (``A``); the MLP
    keeps the gate's output, the activation, the up projection (``3I``) and down_proj's input
    when trainable (``I``). Phi (Show-o): one LayerNorm (input, and output when trainable),
    the same attention with a dense input, ``gelu_new`` written out in ops keeps ``4I`` plus
    fc2's input when trainable. A qk-norm keeps q and k before it (``2A``).
    """
    d, a, i = shape.hidden, shape.attn_width, shape.intermediate
    attention = 4 * a * p + (a * p if trainable else 0) + (2 * a * p if shape.qk_norm else 0)
    if shape.plain_mlp:
        norm = p * d + (p * d if trainable else 0)
        mlp = 4 * i * p + (i * p if trainable else 0)
    else:
        norm = 2 * (4 * d + (2 * p * d if trainable else 0))
        mlp = 3 * i * p + (i * p if trainable else 0)
    return norm + attention + mlp


def activation_bytes(
    shape: ModelShape, spec: RunSpec, tokens: int, slots: dict[str, int]
) -> dict[str, float]:
    """Saved-for-backward bytes of both flows. ``tokens``: B x (T_U + T_G) in the micro-batch;
    ``slots``: supervised slots per flow, ``{"U": B x S_U, "G": B x S_G}``."""
    p, parts = spec.bytes_per_value, {}
    if spec.stage == "stage1" or spec.trainable_layers is None:
        parts["activations"] = 0.0  # frozen backbone runs without autograd
        return parts
    start, end = spec.trainable_layers
    above = shape.layers - end
    if spec.checkpointing:  # each block keeps its input; one block is recomputed at a time
        per_token = (end - start + 1 + above) * p * shape.hidden
    else:
        per_token = (end - start + 1) * block_bytes(shape, p, True)
        per_token += above * block_bytes(shape, p, False)
    final_norm = (p if shape.plain_mlp else 4) * shape.hidden
    parts["activations"] = tokens * (per_token + final_norm)
    if spec.attention == "eager":
        blocks = end - start + 1 + above
        parts["activations"] += blocks * shape.heads * p * tokens**2 / spec.micro_batch
    # one (B, 1, T, T) attention mask per flow, kept by every block: Show-o's omni-attention
    # mask in the compute dtype, a boolean causal-and-padding mask elsewhere
    per_flow = tokens / 2
    parts["attention masks"] = 2 * per_flow**2 / spec.micro_batch * (p if shape.plain_mlp else 1)
    parts["logits"] = slots["U"] * shape.text_vocab * 4 + slots["G"] * shape.codebook * 4
    parts["logits"] += shape.codebook * shape.hidden * p  # the G head's code rows, gathered
    return parts


def plan_memory(shape: ModelShape, spec: RunSpec) -> MemoryPlan:
    """The per-GPU memory of ``spec`` on ``shape`` (see the module docstring)."""
    b, p = spec.micro_batch, spec.bytes_per_value
    tokens = b * (shape.tokens("U") + shape.tokens("G"))
    slots = {"U": b * shape.text_tokens, "G": round(b * shape.image_tokens * spec.mask_ratio)}
    extras = diva_parameters(shape, spec)
    blocks = (
        0
        if spec.trainable_layers is None
        else spec.trainable_layers[1] - spec.trainable_layers[0] + 1
    )
    trainable_backbone = blocks * shape.block_params
    trainable = trainable_backbone + sum(extras.values())
    total = shape.total_params() + sum(extras.values())
    plan = MemoryPlan(params={"total": total, "trainable": trainable, **extras})
    plan.parts["model states"] = model_states(total, trainable, shape.block_params, spec)
    plan.parts.update(activation_bytes(shape, spec, tokens, slots))
    kept_logits = (slots["U"] * shape.text_vocab + slots["G"] * shape.codebook) * p
    plan.parts["logits kept"] = kept_logits
    # the largest short-lived tensors: one block recomputed (checkpointing) and a flow's float
    # logits with their gradient in the loss's backward (stage 1: one injected layer's)
    # (they come one after the other in backward, so the larger one counts)
    largest_flow = max(slots["U"] * shape.text_vocab, slots["G"] * shape.codebook)
    transient = 2 * 4 * largest_flow
    if spec.checkpointing and spec.trainable_layers is not None:
        transient = max(transient, tokens * block_bytes(shape, p, True))
    plan.parts["transient"] = transient
    if spec.ema and trainable_backbone:
        shards = spec.gpus if spec.zero_stage == 3 else 1
        plan.parts["EMA shadow"] = 4 * trainable_backbone / shards
    return plan
