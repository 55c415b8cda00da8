"""``diva-cli plan``: model states against DeepSpeed's own estimators, parameter counts against
the models, and a table with a verdict for every shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import (
    estimate_zero2_model_states_mem_needs,
    model_to_params,
)

from diva_lightning.backbones.chameleon import ChameleonAdapter
from diva_lightning.backbones.emu3 import Emu3Adapter
from diva_lightning.backbones.janus import JanusAdapter
from diva_lightning.backbones.liquid import LiquidAdapter
from diva_lightning.backbones.showo import ShowoAdapter
from diva_lightning.cli import main
from diva_lightning.planning import RunSpec, from_adapter, plan_memory, published_shape
from diva_lightning.planning.memory import model_states
from diva_lightning.planning.shapes import block_parameters

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ADAPTERS = [Emu3Adapter, ShowoAdapter, LiquidAdapter, ChameleonAdapter, JanusAdapter]


@pytest.mark.parametrize("adapter_class", ADAPTERS, ids=lambda c: c.__name__)
def test_shape_counts_blocks_and_embeddings_as_the_model_has_them(adapter_class):
    adapter = adapter_class.tiny()
    shape = from_adapter(adapter)
    layer = adapter.decoder_layers[0]
    dims = dict(hidden=shape.hidden, layers=shape.layers, intermediate=shape.intermediate,
                heads=shape.heads, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                vocab=shape.vocab)  # fmt: skip
    built = block_parameters(type(layer), layer.self_attn.config, **dims)  # on meta
    assert built == sum(p.numel() for p in layer.parameters())
    lm = getattr(adapter.model, "showo", adapter.model)  # Show-o wraps its Phi
    head, embedding = lm.get_output_embeddings(), lm.get_input_embeddings()
    counted = {p.data_ptr(): p.numel() for m in (head, embedding) for p in m.parameters()}
    assert shape.embedding_params() == sum(counted.values())
    assert shape.total_params() == model_to_params(adapter)  # DeepSpeed's count


@pytest.mark.parametrize("zero", [2, 3])
def test_model_states_of_full_training_equal_deepspeeds_estimator(zero):
    adapter = Emu3Adapter.tiny()
    shape = from_adapter(adapter)
    total = model_to_params(adapter)
    spec = RunSpec("sft", 2, (1, shape.layers), (1, shape.layers), zero_stage=zero,
                   gpus_per_node=8)  # fmt: skip
    ours = model_states(total, total, shape.block_params, spec)
    if zero == 2:
        expected = estimate_zero2_model_states_mem_needs(total, 8, 1, cpu_offload=False)[1]
    else:
        expected = estimate_zero3_model_states_mem_needs(
            total, shape.block_params, 8, 1, cpu_offload=False, cpu_offload_params=False
        )[1]
    assert ours == expected


def test_frozen_weights_cost_their_bf16_copy_replicated_or_partitioned():
    total, trained, block = 10_000_000, 2_000_000, 100_000
    z2 = RunSpec("stage2", 2, (1, 2), (1, 2), zero_stage=2, gpus_per_node=8)
    z3 = RunSpec("stage2", 2, (1, 2), (1, 2), zero_stage=3, gpus_per_node=8)
    trained_z2 = estimate_zero2_model_states_mem_needs(trained, 8, 1, cpu_offload=False)[1]
    assert model_states(total, trained, block, z2) == trained_z2 + 2 * (total - trained)
    trained_z3 = estimate_zero3_model_states_mem_needs(
        trained, block, 8, 1, cpu_offload=False, cpu_offload_params=False
    )[1]
    assert model_states(total, trained, block, z3) == trained_z3 + 2 * (total - trained) / 8


def test_published_block_is_counted_with_the_models_own_layer_class():
    """Show-o's Phi-1.5 block, written out by hand: q, k, v, dense with biases, fc1/fc2 with
    biases, one LayerNorm, Show-o's qk LayerNorms over the 64-wide heads."""
    d, i, head = 2048, 8192, 64
    by_hand = 4 * (d * d + d) + (d * i + i) + (i * d + d) + 2 * d + 2 * (2 * head)
    assert published_shape(ShowoAdapter, "showo-256").block_params == by_hand
    gemma = published_shape(LiquidAdapter)  # Gemma-7B: 16 heads of 256, MLP 24576, no biases
    assert gemma.block_params == 4 * 3072 * 4096 + 3 * 3072 * 24576 + 2 * 3072
    assert gemma.tied and gemma.vocab == 264192


def test_unknown_shape_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="known: .*emu3"):
        published_shape(JanusAdapter)


def test_activation_checkpointing_and_a_smaller_batch_lower_the_plan():
    shape = published_shape(Emu3Adapter)
    base = dict(stage="stage2", middle_layers=(8, 18), trainable_layers=(8, 18), zero_stage=3,
                gpus_per_node=8)  # fmt: skip
    plain = plan_memory(shape, RunSpec(micro_batch=2, **base)).total
    checkpointed = plan_memory(shape, RunSpec(micro_batch=2, checkpointing=True, **base)).total
    smaller = plan_memory(shape, RunSpec(micro_batch=1, checkpointing=True, **base)).total
    assert smaller < checkpointed < plain


SHIPPED = sorted(CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("[!t]*/*.yaml"))
TINY = ["--config", str(CONFIGS / "tiny/trainer.yaml"), "--config", str(CONFIGS / "tiny/data.yaml")]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_plan_answers_for_every_shipped_gpu_config_and_each_fits_24gb(path, capsys):
    main(["plan", "--config", str(path)])
    out = capsys.readouterr().out
    assert "model states" in out and "activations" in out
    assert "verdict: fits in 24 GiB" in out, out


@pytest.mark.parametrize(
    "extra", [["tiny/stage1.yaml"], ["tiny/stage2.yaml"], ["tiny/sft.yaml", "tiny/showo.yaml"]]
)
def test_plan_builds_the_tiny_backbones_it_cannot_look_up(extra, capsys):
    args = [*TINY, *(a for name in extra for a in ("--config", str(CONFIGS / name)))]
    main(["plan", *args, "--gpu_memory_gb", "1"])
    out = capsys.readouterr().out
    assert "verdict: fits in 1 GiB" in out and "no DeepSpeed" in out


def test_plan_names_a_missing_config(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--config", "configs/nope.yaml"])
    assert "configs/nope.yaml" in capsys.readouterr().err
