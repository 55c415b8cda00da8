"""Show-o parity against golden outputs of the official implementation (tests/fixtures/showo).

The fixtures are tiny random reference models run through the unmodified official code (see
``tests/fixtures/showo/README.md``). Tolerances: integer tensors exactly, floats 1e-5 (fp32, CPU).
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from diva_lightning.backbones.flows import IGNORE_INDEX
from diva_lightning.backbones.showo import ShowoAdapter
from diva_lightning.backbones.showo import masks as M
from diva_lightning.backbones.showo.magvitv2 import MAGVITv2
from diva_lightning.backbones.showo.model import ShowoConfig, ShowoModel
from diva_lightning.backbones.showo.prompting import ShowoPrompting, SpecialIds
from diva_lightning.backbones.showo.sampling import greedy_understanding, maskgit_generate

HERE = Path(__file__).parent / "fixtures" / "showo"
TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def ref():
    return load_file(HERE / "fixtures.safetensors")


@pytest.fixture(scope="module")
def config():
    return json.loads((HERE / "config.json").read_text())


@pytest.fixture(scope="module")
def showo(config):
    keys = ("vocab_size", "llm_vocab_size", "codebook_size", "num_vq_tokens", "w_clip_vit")
    showo_config = ShowoConfig(**{k: config["showo_init_kwargs"][k] for k in keys})
    assert showo_config.mask_token_id == config["showo_registered_config"]["mask_token_id"]
    return ShowoModel(config["phi_config"], showo_config).eval()


@pytest.fixture(scope="module")
def magvit(config):
    vq = config["magvitv2"]
    return MAGVITv2.from_config({**vq, "codebook_dim": vq["quantizer"]["codebook_dim"]}).eval()


@pytest.fixture(scope="module")
def special(config):
    ids = config["derived"]["special_ids"]
    names = {"pad": "<|pad|>", "soi": "<|soi|>", "eoi": "<|eoi|>", "t2i": "<|t2i|>"}
    names.update({"mmu": "<|mmu|>", "bos": "<|sot|>", "eos": "<|eot|>"})
    return SpecialIds(**{field: ids[token] for field, token in names.items()})


@pytest.fixture(scope="module")
def prompting(special, config):
    return ShowoPrompting(special, config["prompting"]["max_text_len_arg"])


@pytest.fixture(scope="module")
def text_ids(config):
    """Raw strings of the reference harness through the reference text tokenizer."""
    tok = Tokenizer.from_file(str(HERE / "tokenizer.json"))
    harness = config["harness"]
    return {
        "mmu": [tok.encode(t).ids for t in harness["mmu_texts"]],
        "t2i": [tok.encode(t).ids for t in harness["t2i_texts"]],
        "question": tok.encode("USER: \n" + harness["mmu_question"] + " ASSISTANT:").ids,
    }


def _strict(module, path):
    state = load_file(path)
    result = module.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert set(module.state_dict()) == set(state)


def test_reference_state_dicts_load_with_no_missing_or_unexpected_keys(showo, magvit):
    _strict(showo, HERE / "showo_state_dict.safetensors")
    _strict(magvit, HERE / "magvitv2_state_dict.safetensors")
    attn = showo.showo.model.layers[0].self_attn
    assert attn.q_layernorm.normalized_shape == (16,) and attn.rotary_ndims == 8
    assert showo.showo.lm_head.bias is not None


def test_magvit_codes_exact_and_pixels_close(magvit, ref):
    assert torch.equal((ref["pixels_uint8"].float() / 255 - 0.5) / 0.5, ref["pixel_values"])
    with torch.no_grad():
        z = magvit.encoder(ref["pixel_values"])
        z_q, codes, (commit, entropy) = magvit.quantize(z)
        decoded = magvit.decode_code(ref["vq_codes"])
    torch.testing.assert_close(z, ref["vq_encoder_output"], **TOL)
    assert torch.equal(z_q, ref["vq_quantized"])
    assert torch.equal(codes, ref["vq_codes"])
    assert torch.equal(magvit.codebook_entry(codes), ref["vq_codebook_entry_from_codes"])
    torch.testing.assert_close(decoded, ref["vq_decoded_pixels"], **TOL)
    torch.testing.assert_close(commit.view(1), ref["vq_quantizer_loss"], **TOL)
    torch.testing.assert_close(entropy.view(1), ref["vq_entropy_loss"], **TOL)


@pytest.mark.parametrize("flow", ["mmu", "t2i"])
def test_logits_and_every_hidden_state_match(showo, ref, flow):
    with torch.no_grad():
        out = showo(
            ref[f"{flow}_input_ids"],
            attention_mask=ref[f"{flow}_attention_mask_4d"],
            output_hidden_states=True,
        )
    torch.testing.assert_close(out.logits, ref[f"{flow}_logits"], **TOL)
    torch.testing.assert_close(torch.stack(out.hidden_states), ref[f"{flow}_hidden_states"], **TOL)


def test_sequences_masks_and_labels_from_raw_text(prompting, special, ref, text_ids):
    assert text_ids["mmu"][1] == [3] and ref["mmu_text_ids"][0].tolist() == text_ids["mmu"][0]
    image_tokens = ref["vq_codes"] + 110
    ids, mask1d, labels = prompting.mmu(image_tokens, text_ids["mmu"])
    assert torch.equal(ids, ref["mmu_input_ids"]) and torch.equal(labels, ref["mmu_labels"])
    assert torch.equal(mask1d, ref["mmu_attention_mask_1d"])
    assert torch.equal(M.mmu_attention_mask(ids, special.eoi), ref["mmu_attention_mask_4d"])

    inputs, image_labels = ref["t2i_masked_image_tokens"], ref["t2i_image_labels"]
    ids, mask1d, labels = prompting.t2i(text_ids["t2i"], inputs, image_labels)
    assert torch.equal(ids, ref["t2i_input_ids"]) and torch.equal(labels, ref["t2i_labels"])
    assert torch.equal(mask1d, ref["t2i_attention_mask_1d"])
    mask4d = M.t2i_attention_mask(ids, special.pad, special.soi, special.eoi)
    assert torch.equal(mask4d, ref["t2i_attention_mask_4d"])  # bit-exact, -2**63 blocked
    plain = M.omni_attention_mask(ids, special.pad, special.soi, special.eoi, rm_pad_in_image=False)
    assert torch.equal(plain, ref["t2i_attention_mask_bool_no_rm_pad"])


def test_masked_tokens_from_stored_random_draws(ref):
    mask, num, prob = M.mask_from_draws(ref["t2i_mask_timesteps"], ref["t2i_mask_perm_noise"])
    assert torch.equal(prob, ref["t2i_mask_prob"]) and torch.equal(num, ref["t2i_num_token_masked"])
    assert torch.equal(mask, ref["t2i_image_token_mask"])
    inputs, labels = M.apply_token_mask(ref["vq_codes"] + 110, mask, 366)
    assert torch.equal(inputs, ref["t2i_masked_image_tokens"])
    assert torch.equal(labels, ref["t2i_image_labels"])
    torch.manual_seed(8)  # the harness seed: the draws come in the same order
    assert torch.equal(M.draw_cosine_mask(2, 16), mask)


def test_mmu_inference_layout_and_greedy_decoding(showo, prompting, special, ref, text_ids):
    ids = prompting.mmu_infer(ref["vq_codes"][0] + 110, text_ids["question"])
    assert torch.equal(ids, ref["mmu_infer_input_ids"])
    mask = M.mmu_attention_mask(ids, special.eoi)
    assert torch.equal(mask, ref["mmu_infer_attention_mask_4d"])
    with torch.no_grad():
        last = showo(ids, attention_mask=mask).logits[:, -1]
    torch.testing.assert_close(last, ref["mmu_infer_last_logits"], **TOL)
    tokens = greedy_understanding(showo, ids, mask, max_new_tokens=5)
    assert tokens[0].tolist() == ref["mmu_infer_greedy_tokens"].tolist()


def test_maskgit_generation_reproduces_reference(showo, prompting, special, ref, text_ids):
    masked = torch.full((1, 16), 366)
    cond, cond_mask1d = prompting.t2i_gen(text_ids["t2i"][:1], masked)
    uncond, _ = prompting.t2i_gen([[]], masked)
    assert torch.equal(cond, ref["t2igen_cond_input_ids"])
    assert torch.equal(cond_mask1d, ref["t2igen_cond_attention_mask_1d"])
    assert torch.equal(uncond, ref["t2igen_uncond_input_ids"])
    both = torch.cat([cond, uncond])
    cfg_mask = M.t2i_attention_mask(both, special.pad, special.soi, special.eoi)
    assert torch.equal(cfg_mask, ref["t2igen_cfg_attention_mask_4d"])
    generator = torch.Generator().manual_seed(23)
    codes, final, trace = maskgit_generate(showo, special, cond, uncond, 2.0, 4, 1.0, generator)
    torch.testing.assert_close(
        trace.first_logits, ref["t2igen_step0_image_logits_cond_uncond"], **TOL
    )
    assert trace.mask_len == ref["t2igen_mask_len_per_step"].tolist()
    assert trace.num_masked == ref["t2igen_num_masked_after_step"].tolist()
    assert trace.mask_ratio == ref["t2igen_cosine_mask_ratio_per_step"].tolist()
    assert torch.equal(codes, ref["t2igen_sampled_ids"])  # same torch RNG consumption
    assert torch.equal(final, ref["t2igen_final_input_ids"])


def _official_folder(root: Path, config: dict) -> Path:
    """The reference weights laid out like the real download (showo/, magvitv2/, phi/)."""
    (root / "showo").mkdir(parents=True)
    (root / "magvitv2").mkdir()
    save_file(
        load_file(HERE / "showo_state_dict.safetensors"), root / "showo" / "model.safetensors"
    )
    (root / "showo" / "config.json").write_text(json.dumps(config["showo_registered_config"]))
    magvit = load_file(HERE / "magvitv2_state_dict.safetensors")  # no config: read from weights
    save_file(magvit, root / "magvitv2" / "diffusion_pytorch_model.safetensors")
    text = PreTrainedTokenizerFast(
        tokenizer_file=str(HERE / "tokenizer.json"),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    text.save_pretrained(root / "phi")
    (root / "phi" / "config.json").write_text(json.dumps(config["phi_config"]))
    return root


@pytest.fixture(scope="module")
def official_adapter(tmp_path_factory, config):
    folder = _official_folder(tmp_path_factory.mktemp("showo_official"), config)
    return ShowoAdapter.from_pretrained(folder, config_overrides={"max_text_len": 10}).eval()


def test_adapter_loads_official_layout_and_matches_reference(official_adapter, ref, config):
    adapter = official_adapter
    assert adapter.special.pad == 100 and adapter.mask_token_id == 366
    assert adapter.image_size == 32 and adapter.image_grid == (4, 4)
    codes = adapter.tokenize_images(ref["pixels_uint8"].float() / 255)
    assert torch.equal(codes, ref["vq_codes"])
    expected = (ref["vq_decoded_pixels"] + 1) / 2
    torch.testing.assert_close(adapter.decode_images(codes), expected.clamp(0, 1), **TOL)

    texts, mask = config["harness"]["t2i_texts"], ref["t2i_image_token_mask"]
    g = adapter.build_generation(texts, codes, mask)
    assert torch.equal(g.input_ids, ref["t2i_input_ids"])
    assert torch.equal(g.extra["attention_mask_4d"], ref["t2i_attention_mask_4d"])
    image_labels = torch.where(mask, ref["t2i_image_labels"] - 110, IGNORE_INDEX)
    assert torch.equal(g.labels[:, 12:28], image_labels)
    out = adapter.forward_flow(g, "G")
    for i in range(2):
        where = g.image_positions[i][mask[i]]
        expected = ref["t2i_logits"][i, where, 110:366]  # no shift, codebook columns
        torch.testing.assert_close(out.logits[i, : len(where)], expected, **TOL)


def test_adapter_understanding_flow_is_the_official_mmu_layout(official_adapter, ref, config):
    adapter = official_adapter
    captions = config["harness"]["mmu_texts"]
    u = adapter.build_understanding(["", ""], captions, codes=ref["vq_codes"])
    assert torch.equal(u.input_ids, ref["mmu_input_ids"])
    assert torch.equal(u.extra["attention_mask_4d"], ref["mmu_attention_mask_4d"])
    official = ref["mmu_labels"].clone()
    official[:, 19] = IGNORE_INDEX  # the official labels also score BOS; the contract does not
    assert torch.equal(u.labels, official)
    out = adapter.forward_flow(u, "U")
    for i in range(2):
        where = torch.nonzero(u.labels[i] != IGNORE_INDEX).flatten()
        torch.testing.assert_close(
            out.logits[i, : len(where)], ref["mmu_logits"][i, where - 1], **TOL
        )


def test_adapter_sampling_reproduces_reference(official_adapter, ref, config):
    text = config["harness"]["t2i_texts"][:1]
    generator = torch.Generator().manual_seed(23)
    codes = official_adapter.generate_images(text, 2.0, 4, 1.0, generator)
    assert torch.equal(codes, ref["t2igen_sampled_ids"])


def test_masking_count_rounds_half_to_even_and_masks_at_least_one():
    # the stored draws never hit a tie; pin the rounding with the min-rate clip (exact fp32 values)
    ones = torch.ones(2)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))
    for rate, expected in ((0.15625, 2.0), (0.21875, 4.0)):  # 2.5 -> 2, 3.5 -> 4
        mask, num, _ = M.mask_from_draws(ones, noise, min_masking_rate=rate)
        assert num.tolist() == [expected, expected] and mask.sum(1).tolist() == [expected] * 2
    mask, num, _ = M.mask_from_draws(ones, noise)  # cos(pi/2) ~ -4e-8 -> 0 -> at least one
    assert num.tolist() == [1.0, 1.0] and mask.sum(1).tolist() == [1, 1]
