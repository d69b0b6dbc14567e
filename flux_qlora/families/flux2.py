"""FLUX.2: [klein] 4B/9B (a Qwen3 text encoder; base models trained with classifier-free guidance, distilled
4-step models for serving) and [dev] (32 B, Mistral Small 3.1 text encoder, guidance embeddings).

What differs from FLUX.1: one text encoder whose hidden states of three layers are stacked (no pooled vector),
a 32-channel VAE normalized by its BatchNorm statistics over 2x2 patches (no shift and scale), 4-axis positions
(t, h, w, l) for image and text tokens, and other block and module names. The 2x2 patch packing is FLUX.1's:
patchify-then-flatten yields the same tokens, channel order included, so latents are cached unpatchified
(B, 32, H/8, W/8) and buckets, masks and the latent cache stay family-agnostic.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch

from flux_qlora.families import ActivationModel, Family, LoraLayout
from flux_qlora.families.flux1 import byte_bpe_vocabulary

# The transformers' config.json values of the released models (for the memory plan, the benchmarks' random
# models and their tests); the text encoders' widths are 3x the encoder's hidden size (three layers stacked).
KLEIN_4B_CONFIG = dict(
    _class_name="Flux2Transformer2DModel", patch_size=1, in_channels=128, num_layers=5, num_single_layers=20,
    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256,
    mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False,
)
KLEIN_9B_CONFIG = {**KLEIN_4B_CONFIG, "num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32,
                   "joint_attention_dim": 12288}
DEV_CONFIG = {**KLEIN_4B_CONFIG, "num_layers": 8, "num_single_layers": 48, "num_attention_heads": 48,
              "joint_attention_dim": 15360, "guidance_embeds": True}

TINY_LATENT_CHANNELS = 8
TINY_TEXT_DIM = 32  # the tiny text encoders' hidden size; the transformer's joint_attention_dim is 3x this

# Module names of Flux2Transformer2DModel. Double blocks: attn.to_q/k/v/to_out.0 (image), attn.add_*_proj and
# attn.to_add_out (text), ff/ff_context.linear_in/linear_out; single blocks: attn.to_qkv_mlp_proj (fused
# q, k, v and the MLP's input) and attn.to_out. The modulation is shared by all blocks (not per block).
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
CONTEXT = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
SINGLE = ["to_qkv_mlp_proj", "{single}.attn.to_out"]  # {single}: each single block (lora.target_modules)
MLP = ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"]
# As FLUX.1's all-linear takes its blocks' modulation and the output layer: here the modulation is shared.
MODULATION = ["double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
              "single_stream_modulation.linear", "proj_out"]


class Flux2(Family):
    label_suffix: str
    text_layers: tuple[int, ...]  # hidden states of these encoder layers, stacked (as the pipeline does)
    # cuDNN attention (with give_attention_contiguous_gradients) when asked for; not the default until measured on a
    # GPU against flash (its losses and speed: `bench/bench_train.py --model flux2-klein-4b --extra=...`).
    prefer_cudnn_attention = False
    # Fitted to klein 4B at 512x768 (3.16 GiB) and 9B at 1024x1024 (7.92 GiB), rank 16, checkpointing, `--compile
    # --cuda_graphs`, H100 (BENCHMARKS.md): both within 2%. A checkpointed block's input keeps FLUX.1's figure (its
    # bf16 input; two points can't tell it from a block's); one block's backward keeps ~3.7x FLUX.1's: the fused
    # qkv+MLP projection 9x the width wide, SwiGLU's halves, the rank-16 LoRA's inputs.
    activations = ActivationModel(ckpt_input_bytes=2.29, block_bytes=108.4, workspace_gib=0.18)
    # The modulation is shared by all blocks here, not one per block: on [dev] 3 layers 6144 wide in, 36864,
    # 36864 and 18432 out (0.57 B parameters, 1.1 GB in bf16), quantized as FLUX.1's per-block modulation is.
    quantized_prefixes = ("transformer_blocks.", "single_transformer_blocks.", "double_stream_modulation_img.",
                          "double_stream_modulation_txt.", "single_stream_modulation.")
    transformer_class = "Flux2Transformer2DModel"
    vae_class = "AutoencoderKLFlux2"
    # ComfyUI's FLUX.2 names (BFL's), under the prefix every FLUX.2-capable ComfyUI maps for each linear layer;
    # lora_A/lora_B with the scale folded in (no .alpha): what diffusers' FLUX.2 loader reads back too. Its fused
    # qkv takes q, k and v as one LoRA with stacked downs and a block-diagonal up (exact).
    lora_layout = LoraLayout(
        prefix="diffusion_model.", separator=".", down="lora_A.weight", up="lora_B.weight", alpha=False,
        double={"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
                "attn.to_out.0": ("img_attn.proj", None), "attn.add_q_proj": ("txt_attn.qkv", 0),
                "attn.add_k_proj": ("txt_attn.qkv", 1), "attn.add_v_proj": ("txt_attn.qkv", 2),
                "attn.to_add_out": ("txt_attn.proj", None), "ff.linear_in": ("img_mlp.0", None),
                "ff.linear_out": ("img_mlp.2", None), "ff_context.linear_in": ("txt_mlp.0", None),
                "ff_context.linear_out": ("txt_mlp.2", None)},
        single={"attn.to_qkv_mlp_proj": ("linear1", None), "attn.to_out": ("linear2", None)},
        # norm_out's modulation is left out: ComfyUI swaps its halves and diffusers' LoRA loader does not
        top={"proj_out": "final_layer.linear", "x_embedder": "img_in", "context_embedder": "txt_in",
             "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
             "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
             "single_stream_modulation.linear": "single_stream_modulation.lin",
             "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer"},
        part_widths={"img_attn.qkv": (1, 1, 1), "txt_attn.qkv": (1, 1, 1)},
        base_model="flux2",
    )
    lora_markers = ("to_qkv_mlp_proj", ".linear_in", ".linear_out", "stream_modulation", "time_guidance_embed")
    lora_presets = {
        "attention": ATTENTION + SINGLE,
        "attention+context": ATTENTION + CONTEXT + SINGLE,
        "all-linear": ATTENTION + CONTEXT + SINGLE + MLP + MODULATION,
    }

    def transformer_cls(self):
        from diffusers import Flux2Transformer2DModel

        return Flux2Transformer2DModel

    # --- text: one encoder, three layers' hidden states stacked ------------------------------------------------
    text_encoders = ("text_encoder",)
    big_text_encoder = "text_encoder"

    def encode_prompts(self, pipe, prompts, max_sequence_length):
        prompt_embeds, text_ids = pipe.encode_prompt(prompts, device=pipe.text_encoder.device,
                                                     max_sequence_length=max_sequence_length,
                                                     text_encoder_out_layers=self.text_layers)
        return prompt_embeds, prompt_embeds.new_zeros(len(prompt_embeds), 0), text_ids[0]

    # --- latents and positions ------------------------------------------------------------------------------
    def load_vae(self, name_or_path, device, dtype, hub):
        from diffusers import AutoencoderKLFlux2

        vae = AutoencoderKLFlux2.from_pretrained(name_or_path, subfolder="vae", dtype=dtype, **hub)
        return vae.requires_grad_(False).to(device)

    def normalize_latents(self, vae, mean):
        """(mean - running_mean) / sqrt(running_var + eps) of the VAE's BatchNorm over the 2x2-patchified channels
        (the pipeline's `_encode_vae_image`), applied in the unpatchified layout: channel c*4 + dy*2 + dx of a
        patch is latent channel c at offset (dy, dx)."""
        b, c, h, w = mean.shape
        bn_mean = vae.bn.running_mean.view(c, 2, 2).repeat(1, h // 2, w // 2).to(mean)
        bn_std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps).view(c, 2, 2).repeat(1, h // 2, w // 2)
        return (mean - bn_mean) / bn_std.to(mean)

    def image_ids(self, height, width, device=None, dtype=None):
        """(H/2 * W/2, 4): (t=0, row, column, l=0), as the FLUX.2 pipelines make them."""
        ids = torch.cartesian_prod(torch.arange(1), torch.arange(height // 2), torch.arange(width // 2),
                                   torch.arange(1))
        return ids.to(device=device, dtype=dtype)

    def text_ids(self, length):
        """(0, 0, 0, token): the pipelines' `_prepare_text_ids`."""
        return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length)).float()

    def resolution_shift(self, image_seq_len):
        """exp(mu) of the FLUX.2 pipelines' empirical mu at their default step count (50): diffusers'
        `compute_empirical_mu`, whose fit is linear in the token count up to 4300 tokens."""
        a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
        if image_seq_len > 4300:
            return math.exp(a2 * image_seq_len + b2)
        m_200, m_10 = a2 * image_seq_len + b2, a1 * image_seq_len + b1
        a = (m_200 - m_10) / 190.0
        return math.exp(a * 50 + m_200 - 200.0 * a)

    # --- the forward and sample images ----------------------------------------------------------------------
    def give_attention_contiguous_gradients(self, transformer):
        """FLUX.2's single blocks concatenate attention's output with the MLP's inside their processor, with no
        module between to hook: diffusers' attention dispatch, as this model's processors call it (a name in
        diffusers' transformer_flux2 module), is wrapped once per process to hand on contiguous gradients. The
        double blocks' arrive contiguous already (no copy); the forward is unchanged."""
        from diffusers.models.transformers import transformer_flux2

        from flux_qlora.blocks import contiguous_gradient

        dispatch = transformer_flux2.dispatch_attention_fn
        if getattr(dispatch, "hands_on_contiguous_gradients", False):
            return

        def dispatch_with_contiguous_gradients(*args, **kwargs):
            return contiguous_gradient(dispatch(*args, **kwargs))

        dispatch_with_contiguous_gradients.hands_on_contiguous_gradients = True
        transformer_flux2.dispatch_attention_fn = dispatch_with_contiguous_gradients

    def forward(self, transformer, tokens, timestep, guidance, prompt_embeds, pooled, text_ids, image_ids):
        return transformer(hidden_states=tokens, timestep=timestep, guidance=guidance,
                           encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=image_ids,
                           return_dict=False)[0]

    def sample_pipeline(self, transformer, vae, scheduler, distilled=False):
        return self.pipeline_cls()(scheduler=scheduler, vae=vae, transformer=transformer, text_encoder=None,
                                   tokenizer=None)

    def sample_kwargs(self, prompt_embeds, pooled, negative):
        inputs = {"prompt_embeds": prompt_embeds}
        if negative is not None:
            inputs["negative_prompt_embeds"] = negative[0]
        return inputs


class Klein(Flux2):
    name = "flux2-klein"
    label = "FLUX.2 [klein]"
    pipeline_classes = ("Flux2KleinPipeline",)
    guidance_embeds = False
    text_layers = (9, 18, 27)
    # The base models: 50 steps with classifier-free guidance 4.0 (the distilled ones: 4 steps, no guidance).
    default_guidance = 4.0
    default_steps = 50
    distilled_steps = 4
    samples_with_negative = True

    def pipeline_cls(self):
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline

    def text_encoder_class(self):
        from transformers import Qwen3ForCausalLM

        return Qwen3ForCausalLM

    def serving_defaults(self, pipeline_config):
        """The distilled models (model_index.json's is_distilled): 4 steps without guidance."""
        if pipeline_config.get("is_distilled"):
            return self.distilled_steps, 1.0
        return super().serving_defaults(pipeline_config)

    def sample_pipeline(self, transformer, vae, scheduler, distilled=False):
        # Sample images draw without the text encoder: with guidance the base model's pipeline encodes "" for the
        # negative prompt, so it is given (sample_kwargs); the distilled one draws without guidance.
        return self.pipeline_cls()(scheduler=scheduler, vae=vae, transformer=transformer, text_encoder=None,
                                   tokenizer=None, is_distilled=distilled)

    def build_tiny_pipeline(self, output_dir, seed=0):
        """A Flux2KleinPipeline folder with random weights: a 27-layer Qwen3 32 wide (the pipeline stacks layers
        9, 18 and 27), a 2+2-block transformer 64 wide, a 4-level VAE."""
        from transformers import Qwen3Config, Qwen3ForCausalLM

        torch.manual_seed(seed)
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(QWEN_SPECIAL_TOKENS) + 256, hidden_size=TINY_TEXT_DIM, intermediate_size=64,
            num_hidden_layers=27, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=256, eos_token_id=257,
            bos_token_id=None,
        ))
        with tempfile.TemporaryDirectory() as staging:
            tokenizer = qwen_tokenizer(Path(staging))
            pipe = self.pipeline_cls()(scheduler=tiny_scheduler(), vae=tiny_vae(), transformer=tiny_transformer(self),
                                       text_encoder=text_encoder, tokenizer=tokenizer, is_distilled=False)
        pipe.save_pretrained(output_dir)
        return Path(output_dir)


class Dev(Flux2):
    name = "flux2-dev"
    label = "FLUX.2 [dev]"
    pipeline_classes = ("Flux2Pipeline",)
    guidance_embeds = True
    text_layers = (10, 20, 30)
    default_max_sequence_length = 128  # the pipeline's system message takes ~35 of them
    default_guidance = 4.0
    default_steps = 50

    def pipeline_cls(self):
        from diffusers import Flux2Pipeline

        return Flux2Pipeline

    def text_encoder_class(self):
        from transformers import Mistral3ForConditionalGeneration

        return Mistral3ForConditionalGeneration

    def build_tiny_pipeline(self, output_dir, seed=0):
        """A Flux2Pipeline folder with random weights: a 30-layer Mistral3 32 wide (the pipeline stacks layers 10,
        20 and 30) with a one-layer Pixtral vision tower, a 2+2-block transformer 64 wide with guidance embeddings.
        Its tokenizer is a plain tokenizer with a chat template: the real folder's PixtralProcessor needs
        torchvision, and for text it tokenizes the same way."""
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

        torch.manual_seed(seed)
        tokenizer = mistral_tokenizer()
        vocab = tokenizer.get_vocab()
        text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
            text_config=MistralConfig(vocab_size=len(vocab), hidden_size=TINY_TEXT_DIM, intermediate_size=64,
                                      num_hidden_layers=30, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=512, pad_token_id=vocab["<pad>"]),
            vision_config=PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, head_dim=8, image_size=56, patch_size=14),
            image_token_index=vocab["[IMG]"], spatial_merge_size=2,
        ))
        pipe = self.pipeline_cls()(scheduler=tiny_scheduler(), vae=tiny_vae(), transformer=tiny_transformer(self),
                                   text_encoder=text_encoder, tokenizer=tokenizer)
        pipe.save_pretrained(output_dir)
        return Path(output_dir)


KLEIN = Klein()
DEV = Dev()


def tiny_transformer(family: Flux2):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * TINY_LATENT_CHANNELS, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=3 * TINY_TEXT_DIM,
        timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=family.guidance_embeds,
    )


def tiny_vae():
    """Four levels (8x down, as the real one) and BatchNorm statistics away from (0, 1), so that a missing or
    wrong normalization shows in the tests."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        latent_channels=TINY_LATENT_CHANNELS, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        norm_num_groups=8, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    generator = torch.Generator().manual_seed(1)
    vae.bn.running_mean.copy_(torch.randn(vae.bn.num_features, generator=generator) * 0.3)
    vae.bn.running_var.copy_(torch.rand(vae.bn.num_features, generator=generator) + 0.5)
    return vae


def tiny_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's chat template, the parts the pipeline uses: user turns and the generation prompt without thinking.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


MISTRAL_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                          "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
# Mistral Small 3.1's chat template, the parts the FLUX.2 pipeline uses: a system turn and a user turn of text.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{{ message['content'][0]['text'] }}[/SYSTEM_PROMPT]{% else %}[INST]{{ message['content'][0]['text'] }}[/INST]"
    "{% endif %}{% endfor %}"
)


def mistral_tokenizer():
    """A byte-level tokenizer with Mistral's special tokens and chat template. The pipeline's system message is one
    token of its own, so that the tiny tests' short sequences still hold the caption (one token per byte would take
    ~170 of them)."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, _ = byte_bpe_vocabulary(MISTRAL_SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": MISTRAL_SPECIAL_TOKENS[4:] + [SYSTEM_MESSAGE]})
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


def qwen_tokenizer(staging: Path):
    """A byte-level BPE tokenizer without merges (one token per byte) with Qwen's special tokens and chat template,
    loaded as Qwen2TokenizerFast (what the klein pipeline's folder names)."""
    from transformers import Qwen2TokenizerFast

    vocab, _ = byte_bpe_vocabulary(QWEN_SPECIAL_TOKENS)
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "vocab.json").write_text(json.dumps(vocab))
    (staging / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = Qwen2TokenizerFast(vocab_file=str(staging / "vocab.json"), merges_file=str(staging / "merges.txt"),
                                   unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer
