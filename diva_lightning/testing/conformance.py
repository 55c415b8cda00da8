"""The backbone adapter contract as one pytest suite: subclass ``AdapterConformance`` per adapter.

Every shipped adapter's test file runs it, and so can a user's own adapter::

    from diva_lightning.testing import AdapterConformance

    class TestMyAdapter(AdapterConformance):
        adapter_class = MyAdapter  # its tiny(**tiny_kwargs) builds a random small model

A test here fails for an adapter that breaks a convention the losses rely on
(``docs/adding-a-backbone.md``): labels only on the answer, labels exactly at the masked codes,
masked codes never reaching the model, codebook-order logits equal to the code columns of the
full-vocabulary logits, captured states equal to ``output_hidden_states``, padding leaving a
sample unchanged, exact save -> load, a frozen VQ, and layer freezing. An adapter with continuous
targets (``continuous_targets``: the generation flow regresses embeddings) passes the same tests
read for regression: targets exactly the masked embeddings, the loss the manual
``0.5 MSE + 0.5 (1 - cos)``, predictions equal to the generation head on the full states (its
``full_logits`` of flow G). Layout facts that differ
between architectures are class attributes or small hook methods (``full_logits``,
``reference_hidden_states``); the defaults fit a transformers causal LM whose image codes are
vocabulary ids (``adapter.image_token_ids``) with ``language_model`` and an LM head.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from diva_lightning.backbones.base import BackboneAdapter
from diva_lightning.backbones.flows import IGNORE_INDEX, FlowBatch

CAPTIONS = ["a red circle at the top left.", "two blue squares at the center and a star ."]
PROMPTS = ["Please describe this image in detail."] * 2


class AdapterConformance:
    """The contract tests. Subclass as ``Test<Name>`` and set ``adapter_class``."""

    adapter_class: type[BackboneAdapter]
    tiny_kwargs: dict = {}
    captions: list[str] = CAPTIONS  # the first is the shorter: it is the padded sample
    prompts: list[str] = PROMPTS
    layers: tuple[int, ...] = (2, 3, 4)  # captured in the tests (not the last block: its
    # output_hidden_states entry is after the final norm)
    generation_shift = 1  # 1: the state at p - 1 scores the code at p (causal); 0: at p (MaskGIT)
    activation_checkpointing = True  # set_activation_checkpointing is supported

    # ---- hooks -------------------------------------------------------------------------------
    def make_adapter(self, seed: int = 0) -> BackboneAdapter:
        torch.manual_seed(seed)
        return self.adapter_class.tiny(**self.tiny_kwargs)

    def code_columns(self, adapter: BackboneAdapter) -> Tensor:
        """(K,) column of each code, in codebook order, in ``full_logits`` of the G flow (every
        column for continuous targets)."""
        if adapter.continuous_targets:
            return torch.arange(adapter.generation_width)
        return adapter.image_token_ids

    def answer_ids(self, adapter: BackboneAdapter, prompt: str, caption: str) -> list[int]:
        """The labelled ids of the understanding flow: the caption and what ends the answer."""
        return adapter.caption_ids(caption) + adapter._answer_end()

    def image_input_ids(self, adapter: BackboneAdapter, codes: Tensor) -> Tensor | None:
        """(B, N) input id of each visible code in the G flow; None: the image enters as
        embeddings (then ``mask_input_id`` is not checked)."""
        return adapter.image_token_ids[codes]

    def mask_input_id(self, adapter: BackboneAdapter) -> int:
        return adapter.special["mask"]

    @torch.no_grad()
    def full_logits(self, adapter: BackboneAdapter, batch: FlowBatch, flow: str) -> Tensor:
        """(B, T, V) logits at every position of a plain forward of the model."""
        hidden = adapter.language_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        return adapter.model.get_output_embeddings()(hidden)

    @torch.no_grad()
    def reference_hidden_states(self, adapter, batch: FlowBatch, flow: str) -> tuple[Tensor, ...]:
        """``hidden_states`` of a plain forward with ``output_hidden_states=True``."""
        return adapter.language_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
        ).hidden_states

    # ---- fixtures ------------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    def adapter(self) -> BackboneAdapter:
        return self.make_adapter().eval()

    @pytest.fixture(scope="class")
    def pixels(self, adapter) -> Tensor:
        size = adapter.image_size
        return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))

    @pytest.fixture(scope="class")
    def codes(self, adapter, pixels) -> Tensor:
        return adapter.tokenize_images(pixels)

    def mask(self, adapter, seed: int = 0) -> Tensor:
        n = adapter.tokens_per_image
        return torch.rand(2, n, generator=torch.Generator().manual_seed(seed)) < 0.4

    def batch(self, adapter, flow, pixels, codes, rows=(0, 1)) -> FlowBatch:
        rows = list(rows)
        if flow == "U":
            prompts, captions = [self.prompts[i] for i in rows], [self.captions[i] for i in rows]
            return adapter.build_understanding(
                prompts, captions, codes=codes[rows], pixels=pixels[rows]
            )
        return adapter.build_generation(
            [self.captions[i] for i in rows], codes[rows], self.mask(adapter)[rows]
        )

    # ---- the contract ---------------------------------------------------------------------------
    def test_understanding_labels_only_on_the_answer(self, adapter, pixels, codes):
        batch = self.batch(adapter, "U", pixels, codes)
        image_ids = self.image_input_ids(adapter, codes)  # (B, N) or None
        for i, caption in enumerate(self.captions):
            if image_ids is not None:  # the image sits at image_positions, in grid order
                assert torch.equal(batch.input_ids[i, batch.image_positions[i]], image_ids[i])
            expected = self.answer_ids(adapter, self.prompts[i], caption)
            labelled = torch.nonzero(batch.labels[i] != IGNORE_INDEX).flatten()
            assert batch.labels[i, labelled].tolist() == expected
            assert batch.input_ids[i, labelled].tolist() == expected  # labels are not shifted
            assert labelled.tolist() == list(
                range(int(labelled[0]), int(labelled[0]) + len(expected))
            )
            assert int(labelled[0]) > int(batch.image_positions[i].max())  # after the image
        out = adapter.forward_flow(batch, "U")
        assert out.logits.shape[-1] == adapter.text_vocab_size
        manual = F.cross_entropy(out.logits.flatten(0, 1), out.targets.flatten(), ignore_index=-100)
        torch.testing.assert_close(out.loss, manual)
        full = self.full_logits(adapter, batch, "U")
        for i in range(2):
            slots = torch.nonzero(batch.labels[i] != IGNORE_INDEX).flatten()
            torch.testing.assert_close(
                out.logits[i, : len(slots)], full[i, slots - 1], rtol=1e-4, atol=1e-4
            )

    def test_generation_labels_exactly_at_the_masked_codes(self, adapter, codes):
        mask = self.mask(adapter)
        batch = adapter.build_generation(self.captions, codes, mask)
        visible = self.image_input_ids(adapter, codes)  # (B, N) or None
        for i in range(2):
            if visible is not None:
                at = batch.input_ids[i, batch.image_positions[i]]  # (N,)
                assert (at[mask[i]] == self.mask_input_id(adapter)).all()
                assert torch.equal(at[~mask[i]], visible[i][~mask[i]])
            labelled = torch.nonzero(batch.labels[i] != IGNORE_INDEX).flatten()
            assert labelled.tolist() == batch.image_positions[i][mask[i]].tolist()
            if not adapter.continuous_targets:  # a class label is the code; else a marker
                assert batch.labels[i, labelled].tolist() == codes[i][mask[i]].tolist()
        out = adapter.forward_flow(batch, "G")
        assert out.logits.shape[-1] == adapter.generation_width
        if adapter.continuous_targets:
            pred, target = out.logits[out.valid].float(), out.targets[out.valid].float()  # (n, D)
            assert torch.equal(target, codes[mask].float())
            cos = (pred * target).sum(-1) / (pred.norm(dim=-1) * target.norm(dim=-1))
            manual = 0.5 * ((pred - target) ** 2).mean() + 0.5 * (1 - cos).mean()
            torch.testing.assert_close(out.loss, manual)
            return
        assert out.targets[out.targets != IGNORE_INDEX].tolist() == codes[mask].tolist()
        manual = F.cross_entropy(out.logits.flatten(0, 1), out.targets.flatten(), ignore_index=-100)
        torch.testing.assert_close(out.loss, manual)

    def test_masked_codes_never_reach_the_model(self, adapter, codes):
        mask = self.mask(adapter)
        if adapter.continuous_targets:
            swapped = codes + mask[..., None] * torch.randn_like(codes)
        else:
            swapped = torch.where(mask, (codes + 17) % adapter.codebook_size, codes)
        out = adapter.forward_flow(adapter.build_generation(self.captions, codes, mask), "G")
        other = adapter.forward_flow(adapter.build_generation(self.captions, swapped, mask), "G")
        assert torch.equal(out.logits, other.logits)
        assert not torch.equal(out.targets, other.targets)

    def test_codebook_logits_equal_the_code_columns_of_the_full_logits(self, adapter, codes):
        batch = adapter.build_generation(self.captions, codes, self.mask(adapter))
        out = adapter.forward_flow(batch, "G")
        full = self.full_logits(adapter, batch, "G")[..., self.code_columns(adapter)]  # (B, T, K)
        for i in range(2):
            slots = torch.nonzero(batch.labels[i] != IGNORE_INDEX).flatten()
            expected = full[i, slots - self.generation_shift]
            torch.testing.assert_close(out.logits[i, : len(slots)], expected, rtol=1e-4, atol=1e-4)
            assert not real_slots(out)[i, len(slots) :].any()

    @pytest.mark.parametrize("flow", ["U", "G"])
    def test_hidden_states_equal_output_hidden_states(self, adapter, pixels, codes, flow):
        batch = self.batch(adapter, flow, pixels, codes)
        layers = list(self.layers)
        out = adapter.forward_flow(batch, flow, layers, pool=False)
        ref = self.reference_hidden_states(adapter, batch, flow)
        index = batch.image_positions.unsqueeze(-1).expand(-1, -1, adapter.hidden_size)
        expected = torch.stack([torch.gather(ref[layer], 1, index) for layer in layers], 1)
        assert out.hidden.shape == (2, len(layers), adapter.tokens_per_image, adapter.hidden_size)
        torch.testing.assert_close(out.hidden, expected)
        torch.testing.assert_close(
            adapter.forward_flow(batch, flow, layers).hidden, expected.mean(2)
        )
        bad = [0, adapter.num_layers + 1]
        with pytest.raises(ValueError, match=rf"\[0, {adapter.num_layers + 1}\]"):
            adapter.forward_flow(batch, flow, bad)

    @pytest.mark.parametrize("flow", ["U", "G"])
    def test_a_padded_sample_equals_the_sample_run_alone(self, adapter, pixels, codes, flow):
        both = adapter.forward_flow(self.batch(adapter, flow, pixels, codes), flow, self.layers)
        alone = adapter.forward_flow(
            self.batch(adapter, flow, pixels, codes, [0]), flow, self.layers
        )
        slots = int(real_slots(alone)[0].sum())
        torch.testing.assert_close(both.logits[0, :slots], alone.logits[0, :slots])
        torch.testing.assert_close(both.hidden[0], alone.hidden[0])

    def test_save_then_load_is_exact(self, adapter, pixels, codes, tmp_path):
        adapter.save_pretrained(tmp_path / "ckpt")
        loaded = self.adapter_class.from_pretrained(tmp_path / "ckpt").eval()
        for flow in ("U", "G"):
            batch = self.batch(adapter, flow, pixels, codes)
            again = self.batch(loaded, flow, pixels, codes)
            assert torch.equal(batch.input_ids, again.input_ids)
            assert torch.equal(batch.labels, again.labels)
            assert torch.equal(
                adapter.forward_flow(batch, flow).logits, loaded.forward_flow(again, flow).logits
            )
        assert torch.equal(loaded.tokenize_images(pixels), codes)
        if adapter.can_decode_images():
            assert torch.equal(loaded.decode_images(codes), adapter.decode_images(codes))

    def test_the_vq_stays_frozen_and_in_eval_mode_after_train(self):
        adapter = self.make_adapter().train()
        assert adapter.training and any(m.training for m in adapter.decoder_layers.modules())
        assert not any(m.training for m in adapter.vq.modules())
        assert not any(p.requires_grad for p in adapter.vq.parameters())

    def test_unfreezing_a_range_trains_exactly_those_blocks(self, codes):
        adapter = self.make_adapter()
        adapter.unfreeze_layers(2, 3)
        names = set(adapter.trainable_parameter_names())
        expected = {
            n
            for n, p in adapter.named_parameters()
            if any(p is q for q in adapter.decoder_layers[1:3].parameters())
        }
        assert names == expected and names
        before = {n: p.detach().clone() for n, p in adapter.named_parameters()}
        optimizer = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=1e-2)
        adapter.train()
        batch = adapter.build_generation(self.captions, codes, self.mask(adapter))
        adapter.forward_flow(batch, "G").loss.backward()
        optimizer.step()
        assert {n for n, p in adapter.named_parameters() if not torch.equal(p, before[n])} == names
        with pytest.raises(ValueError, match=rf"is outside .* 1\.\.{adapter.num_layers}"):
            adapter.unfreeze_layers(adapter.num_layers, adapter.num_layers + 1)

    def test_codes_and_pixels_are_checked(self, adapter, codes):
        if adapter.continuous_targets:
            n, width = adapter.tokens_per_image, adapter.generation_width
            assert codes.shape == (2, n, width) and codes.is_floating_point()
            for bad in (codes[:, :3], codes[..., 0].long(), codes.round().long()):
                with pytest.raises(ValueError, match="targets must be|finite floats"):
                    adapter.build_generation(
                        self.captions, bad, self.mask(adapter)[:, : bad.shape[1]]
                    )
            with pytest.raises(ValueError, match="pixels must be"):
                adapter.tokenize_images(
                    torch.rand(2, 3, adapter.image_size // 2, adapter.image_size)
                )
            return
        n, k = adapter.tokens_per_image, adapter.codebook_size
        assert codes.shape == (2, n) and codes.dtype == torch.long
        assert int(codes.min()) >= 0 and int(codes.max()) < k
        with pytest.raises(ValueError, match=rf"\(B, {n}\)"):
            adapter.build_generation(self.captions, codes[:, :3], self.mask(adapter)[:, :3])
        with pytest.raises(ValueError, match=rf"\[0, {k}\)"):
            adapter.build_generation(self.captions, codes + k, self.mask(adapter))
        with pytest.raises(ValueError, match="pixels must be"):
            adapter.tokenize_images(torch.rand(2, 3, adapter.image_size // 2, adapter.image_size))
        if adapter.can_decode_images():
            images = adapter.decode_images(codes)
            assert images.shape == (2, 3, adapter.image_size, adapter.image_size)
            assert float(images.min()) >= 0 and float(images.max()) <= 1

    def test_activation_checkpointing_gives_the_same_loss(self, codes):
        if not self.activation_checkpointing:
            pytest.skip(f"{self.adapter_class.__name__} does not support activation checkpointing")
        adapter = self.make_adapter().train()
        batch = adapter.build_generation(self.captions, codes, self.mask(adapter))
        plain = adapter.forward_flow(batch, "G", self.layers[:2])
        adapter.set_activation_checkpointing(True)
        again = adapter.forward_flow(batch, "G", self.layers[:2])
        torch.testing.assert_close(plain.loss, again.loss)
        torch.testing.assert_close(plain.hidden, again.hidden)


def real_slots(out) -> Tensor:
    """(B, S) bool: the supervised slots of a flow's output (class or continuous targets)."""
    return out.valid if out.valid is not None else out.targets != IGNORE_INDEX
