"""What the backbone keeps for backward: checkpointing skips frozen blocks, slot picks keep no
hidden state, and the memory plan's activation figure matches the measured saved tensors."""

from __future__ import annotations

import pytest
import torch

from diva_lightning.backbones.chameleon import ChameleonAdapter
from diva_lightning.backbones.emu3 import Emu3Adapter
from diva_lightning.backbones.flows import gather_slots, pool_image_states
from diva_lightning.backbones.liquid import LiquidAdapter
from diva_lightning.backbones.showo import ShowoAdapter
from diva_lightning.planning import RunSpec, from_adapter
from diva_lightning.planning.measure import saved_tensor_bytes
from diva_lightning.planning.memory import activation_bytes
from diva_lightning.stages import SFT
from tests.stage_helpers import batch_for

TRAINABLE = (3, 6)


def sft_on(adapter, trainable=TRAINABLE, checkpointing=False):
    torch.manual_seed(0)
    module = SFT(adapter, middle_layers=trainable, trainable_layers=trainable)
    module.configure_trainable()
    adapter.train()
    adapter.set_activation_checkpointing(checkpointing)
    return module


@pytest.mark.parametrize("fused", [False, True], ids=["two-forwards", "fused"])
def test_checkpointing_never_recomputes_blocks_below_the_trainable_ones(fused):
    """transformers' checkpointing makes the embedding output require grad, so every frozen block
    below the trainable range would keep its input and run again in backward."""
    adapter = Emu3Adapter.tiny()
    module = sft_on(adapter, checkpointing=True)
    module.fused_flows = fused
    calls = {"below": 0, "trainable": 0}

    def count(name):
        def hook(*_):
            calls[name] += 1

        return hook

    # pre-hooks of the blocks' MLPs: a recompute calls the block's forward, not its hooks, and stops early
    adapter.decoder_layers[0].mlp.register_forward_pre_hook(count("below"))  # block 1
    adapter.decoder_layers[TRAINABLE[0] - 1].mlp.register_forward_pre_hook(count("trainable"))
    out_u, out_g = module.run_flows(batch_for(adapter), [3])
    (out_u.loss + out_g.loss).backward()
    forwards = 1 if fused else 2  # one forward per flow, or one for both
    assert calls == {"below": forwards, "trainable": 2 * forwards}  # trainable: + its recompute


@pytest.mark.parametrize("pick", ["slots", "pool"])
def test_picking_positions_keeps_no_full_hidden_state_for_backward(pick):
    hidden = torch.randn(4, 50, 32, requires_grad=True)  # (B, T, D)
    positions = torch.randint(0, 50, (4, 6))  # (B, S)
    valid = torch.ones(4, 6, dtype=torch.bool)
    fn = {
        "slots": lambda: gather_slots(hidden, positions, valid),
        "pool": lambda: pool_image_states(hidden, positions, pool=False),
    }[pick]
    picked, saved = saved_tensor_bytes(torch.nn.Linear(1, 1), fn)
    assert saved < hidden.numel() * 4 / 4, saved  # indices only, not (B, T, D)
    rows = torch.arange(4).unsqueeze(-1)
    torch.testing.assert_close(picked, hidden[rows, positions] * valid.unsqueeze(-1))


def measured_and_planned(adapter, trainable=TRAINABLE, checkpointing=False, bs=4):
    module = sft_on(adapter, trainable, checkpointing)
    batch = batch_for(adapter, bs)
    layers = list(range(trainable[0], trainable[1] + 1))
    (out_u, out_g), measured = saved_tensor_bytes(module, lambda: module.run_flows(batch, layers))
    flow_u = adapter.build_understanding(batch.prompts, batch.captions, codes=batch.codes)
    flow_g = adapter.build_generation(batch.captions, batch.codes, batch.gen_mask)
    tokens = flow_u.input_ids.numel() + flow_g.input_ids.numel()
    slots = {"U": out_u.logits.shape[:2].numel(), "G": out_g.logits.shape[:2].numel()}
    spec = RunSpec("sft", bs, trainable, trainable, checkpointing, bytes_per_value=4)
    planned = sum(activation_bytes(from_adapter(adapter), spec, tokens, slots).values())
    return measured, planned


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize(
    "adapter_class", [Emu3Adapter, ShowoAdapter, LiquidAdapter, ChameleonAdapter]
)
def test_planned_activations_match_the_measured_saved_tensors_tiny(adapter_class, checkpointing):
    measured, planned = measured_and_planned(adapter_class.tiny(), checkpointing=checkpointing)
    assert planned == pytest.approx(measured, rel=0.25), (planned, measured)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_planned_activations_match_the_measured_saved_tensors_medium_showo(checkpointing):
    """Hidden 512, 12 blocks, 256 image tokens (the issue's medium Show-o shape)."""
    phi = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
               num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)  # fmt: skip
    adapter = ShowoAdapter.tiny(phi=phi, image_size=64)
    assert adapter.tokens_per_image == 256
    measured, planned = measured_and_planned(adapter, (4, 9), checkpointing, bs=2)
    assert planned == pytest.approx(measured, rel=0.25), (planned, measured)
