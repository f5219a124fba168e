"""Tiny Hugging Face models built offline from configs: one per family a user would reach for.

``FAMILIES[name]()`` returns ``(model, inputs)``: a freshly built model (random weights, eval mode) and keyword
inputs for one forward pass. Shared by the discovery, save/load and integration tests.
"""

from __future__ import annotations

import torch

TEXT = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
LM = dict(TEXT, num_key_value_heads=1, max_position_embeddings=64)


def _ids(batch: int = 2, length: int = 8, vocab: int = 96) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def bert():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(**TEXT, max_position_embeddings=64, num_labels=3))
    return model, {"input_ids": _ids()}


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config), {"input_ids": _ids()}


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**LM)), {"input_ids": _ids()}


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=96, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config), {"input_ids": _ids(), "decoder_input_ids": _ids(length=5)}


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(**{**TEXT, "vocab_size": None}, image_size=16, patch_size=4, num_labels=3)
    return ViTForImageClassification(config), {"pixel_values": torch.randn(2, 3, 16, 16)}


def clip():
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16)
    config = CLIPConfig(text_config={**text, "max_position_embeddings": 16}, vision_config={**vision, "patch_size": 4})
    config.projection_dim = 16
    return CLIPModel(config), {"input_ids": _ids(), "pixel_values": torch.randn(2, 3, 16, 16)}


def whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=96,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    return WhisperForConditionalGeneration(config), {
        "input_features": torch.randn(2, 8, 32),
        "decoder_input_ids": _ids(length=5),
    }


def wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    config = Wav2Vec2Config(
        **{**TEXT, "vocab_size": 16},
        conv_dim=(8, 8),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        num_labels=3,
    )
    return Wav2Vec2ForSequenceClassification(config), {"input_values": torch.randn(2, 400)}


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**LM, num_local_experts=4, num_experts_per_tok=2)
    return MixtralForCausalLM(config), {"input_ids": _ids()}


def qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        **LM, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32
    )
    return Qwen2MoeForCausalLM(config), {"input_ids": _ids()}


def bigbird():  # block-sparse attention, which falls back to full attention on short inputs (in place)
    from transformers import BigBirdConfig, BigBirdForSequenceClassification

    config = BigBirdConfig(
        **TEXT, max_position_embeddings=128, attention_type="block_sparse", block_size=4, num_random_blocks=1
    )
    config.num_labels = 3
    return BigBirdForSequenceClassification(config), {"input_ids": _ids(length=48)}


def granitemoe():  # takes use_cache through **kwargs
    from transformers import GraniteMoeConfig, GraniteMoeForCausalLM

    return GraniteMoeForCausalLM(GraniteMoeConfig(**LM, num_local_experts=4, num_experts_per_tok=2)), {
        "input_ids": _ids()
    }


def mobilebert():  # its output layer joins two weights with torch.cat before the matmul
    from transformers import MobileBertConfig, MobileBertForMaskedLM

    config = MobileBertConfig(**TEXT, embedding_size=16, intra_bottleneck_size=16, max_position_embeddings=64)
    return MobileBertForMaskedLM(config), {"input_ids": _ids()}


def pegasus():  # fixed sinusoidal position tables (requires_grad=False)
    from transformers import PegasusConfig, PegasusForConditionalGeneration

    config = PegasusConfig(
        vocab_size=96,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
    )
    return PegasusForConditionalGeneration(config), {"input_ids": _ids(), "decoder_input_ids": _ids(length=5)}


def roberta():  # embeddings with a padding row, tied to the output layer
    from transformers import RobertaConfig, RobertaForMaskedLM

    return RobertaForMaskedLM(RobertaConfig(**TEXT, max_position_embeddings=64)), {"input_ids": _ids()}


def gemma3():  # RMS norms that scale by (1 + w)
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(**LM, head_dim=16, sliding_window=4)
    return Gemma3ForCausalLM(config), {"input_ids": _ids()}


def funnel():  # einsum weights: r_kernel (d_model, heads, d_head) contracted over d_model; seg_embed per head
    from transformers import FunnelConfig, FunnelForSequenceClassification

    config = FunnelConfig(
        vocab_size=96, d_model=32, n_head=2, d_head=16, d_inner=64, block_sizes=[1, 1], num_decoder_layers=1
    )
    config.num_labels = 3
    return FunnelForSequenceClassification(config), {"input_ids": _ids()}


def jetmoe():  # experts as one (experts, out, in) tensor, read one matrix at a time by F.linear(x, weight[i])
    from transformers import JetMoeConfig, JetMoeForCausalLM

    config = JetMoeConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_key_value_heads=1,
        kv_channels=16,
        intermediate_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return JetMoeForCausalLM(config), {"input_ids": _ids()}


def nemotron():  # LayerNorm1P: layer_norm(x, w + 1, b)
    from transformers import NemotronConfig, NemotronForCausalLM

    config = NemotronConfig(**LM, head_dim=16)
    return NemotronForCausalLM(config), {"input_ids": _ids()}


def bit():  # weight-standardized convolutions: batch_norm over the weight itself before conv2d
    from transformers import BitConfig, BitForImageClassification

    config = BitConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3, num_groups=4)
    return BitForImageClassification(config), {"pixel_values": torch.randn(2, 3, 32, 32)}


FAMILIES = {
    f.__name__: f
    for f in (
        bert,
        gpt2,
        llama,
        t5,
        vit,
        clip,
        whisper,
        wav2vec2,
        mixtral,
        qwen2_moe,
        bigbird,
        granitemoe,
        mobilebert,
        pegasus,
        roberta,
        gemma3,
        funnel,
        jetmoe,
        nemotron,
        bit,
    )
}


def build(name: str):
    torch.manual_seed(0)
    model, inputs = FAMILIES[name]()
    return model.eval(), inputs
