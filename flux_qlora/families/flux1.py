"""FLUX.1 ([dev], [schnell] and their fine-tunes): CLIP-L (pooled) + T5-XXL text encoders, a 16-channel VAE with
a shift and scale, 3-axis positions, guidance embeddings on [dev]."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch

from flux_qlora.families import ActivationModel, Family, LoraLayout

# FLUX.1-dev's transformer config (its config.json), for the memory plan's tests and the benchmarks' random model.
FLUX_DEV_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

TINY_T5_DIM = 32  # joint_attention_dim of the tiny transformer
TINY_CLIP_DIM = 32  # pooled_projection_dim of the tiny transformer
TINY_LATENT_CHANNELS = 4  # the transformer's in_channels is 4x this (2x2 packing)


class Flux1(Family):
    name = "flux1"
    label = "FLUX.1"
    pipeline_classes = ("FluxPipeline",)
    transformer_class = "FluxTransformer2DModel"
    vae_class = "AutoencoderKL"
    guidance_embeds = True
    # Fitted to three FLUX.1-dev-shaped runs (bf16 compute, `--compile --cuda_graphs`, H100, BENCHMARKS.md): 512x768
    # and 1024x1024 with checkpointing, 6.85 / 8.02 GiB; 512x768 without, 13.73 GiB.
    activations = ActivationModel(ckpt_input_bytes=2.29, block_bytes=28.95, workspace_gib=0.18)
    lora_layout = LoraLayout(
        prefix="lora_unet_", separator="_", down="lora_down.weight", up="lora_up.weight", alpha=True,
        double={"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
                "attn.to_out.0": ("img_attn.proj", None), "attn.add_q_proj": ("txt_attn.qkv", 0),
                "attn.add_k_proj": ("txt_attn.qkv", 1), "attn.add_v_proj": ("txt_attn.qkv", 2),
                "attn.to_add_out": ("txt_attn.proj", None), "ff.net.0.proj": ("img_mlp.0", None),
                "ff.net.2": ("img_mlp.2", None), "ff_context.net.0.proj": ("txt_mlp.0", None),
                "ff_context.net.2": ("txt_mlp.2", None), "norm1.linear": ("img_mod.lin", None),
                "norm1_context.linear": ("txt_mod.lin", None)},
        # linear1 = [q; k; v; mlp], the MLP part mlp_ratio = 4 times as wide as each of q, k, v
        single={"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
                "proj_mlp": ("linear1", 3), "proj_out": ("linear2", None), "norm.linear": ("modulation.lin", None)},
        # norm_out's modulation is left out: its rows are swapped
        top={"proj_out": "final_layer.linear", "x_embedder": "img_in", "context_embedder": "txt_in"},
        part_widths={"img_attn.qkv": (1, 1, 1), "txt_attn.qkv": (1, 1, 1), "linear1": (1, 1, 1, 4)},
        base_model="flux1",
    )
    lora_markers = ("proj_mlp", "ff.net.", "norm1.linear", "norm1_context.linear", ".norm.linear", "time_text_embed")
    lora_presets = {
        "attention": ["to_k", "to_q", "to_v", "to_out.0"],
        "attention+context": ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj",
                              "to_add_out"],
        "all-linear": ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out",
                       "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
                       "proj_out", "norm1.linear", "norm1_context.linear", "norm.linear"],
    }

    def transformer_cls(self):
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    def pipeline_cls(self):
        from diffusers import FluxPipeline

        return FluxPipeline

    # --- text: CLIP-L (pooled) and T5-XXL ---------------------------------------------------------------------
    text_encoders = ("text_encoder", "text_encoder_2")
    big_text_encoder = "text_encoder_2"

    def text_encoder_class(self):
        from transformers import T5EncoderModel

        return T5EncoderModel

    def encode_prompts(self, pipe, prompts, max_sequence_length):
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=None,
                                                             max_sequence_length=max_sequence_length)
        return prompt_embeds, pooled, text_ids

    # --- latents and positions ------------------------------------------------------------------------------
    def load_vae(self, name_or_path, device, dtype, hub):
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", dtype=dtype, **hub)
        return vae.requires_grad_(False).to(device)

    def normalize_latents(self, vae, mean):
        return (mean - vae.config.shift_factor) * vae.config.scaling_factor

    def image_ids(self, height, width, device=None, dtype=None):
        """(H/2 * W/2, 3): (0, row, column), as FluxPipeline makes them."""
        ids = torch.zeros(height // 2, width // 2, 3)
        ids[..., 1] = torch.arange(height // 2)[:, None]
        ids[..., 2] = torch.arange(width // 2)[None, :]
        return ids.reshape(-1, 3).to(device=device, dtype=dtype)

    def text_ids(self, length):
        return torch.zeros(length, 3)

    def resolution_shift(self, image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
        """FLUX.1-dev's scheduler config's defaults."""
        slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
        return math.exp(base_shift + slope * (image_seq_len - base_seq_len))

    # --- the forward and sample images ----------------------------------------------------------------------
    def give_attention_contiguous_gradients(self, transformer):
        """FLUX.1's single blocks return attention's output from their `attn` module and concatenate it with the MLP's
        after it: a forward hook there hands its gradient on contiguous."""
        from flux_qlora.blocks import contiguous_gradient

        for block in transformer.single_transformer_blocks:
            block.attn.register_forward_hook(lambda module, inputs, output: contiguous_gradient(output))

    def forward(self, transformer, tokens, timestep, guidance, prompt_embeds, pooled, text_ids, image_ids):
        return transformer(hidden_states=tokens, timestep=timestep, guidance=guidance,
                           pooled_projections=pooled, encoder_hidden_states=prompt_embeds,
                           txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]

    def sample_pipeline(self, transformer, vae, scheduler, distilled=False):
        from diffusers import FluxPipeline

        return FluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer, text_encoder=None,
                            tokenizer=None, text_encoder_2=None, tokenizer_2=None)

    def sample_kwargs(self, prompt_embeds, pooled, negative):
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    # --- the tiny test model --------------------------------------------------------------------------------
    def build_tiny_pipeline(self, output_dir, seed=0):
        """A FluxPipeline folder (model_index.json + subfolders) with random weights."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

        output_dir = Path(output_dir)
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * TINY_LATENT_CHANNELS,
            num_layers=2, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=4, joint_attention_dim=TINY_T5_DIM,  # inner dim 64 (NF4)
            pooled_projection_dim=TINY_CLIP_DIM, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
        )
        # Four blocks = three 2x downsamples: the VAE halves 8x and packing 2x, so sizes must be multiples of 16.
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=TINY_LATENT_CHANNELS, block_out_channels=(8, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, norm_num_groups=8, sample_size=64,
            shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=514, hidden_size=TINY_CLIP_DIM, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=TINY_CLIP_DIM,
            bos_token_id=512, eos_token_id=513, pad_token_id=513,
        ))
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=64, d_model=TINY_T5_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        ))
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        )
        with tempfile.TemporaryDirectory() as staging:
            write_clip_tokenizer(Path(staging) / "clip")
            write_t5_tokenizer(Path(staging) / "t5")
            pipe = FluxPipeline(
                scheduler=scheduler, vae=vae, transformer=transformer,
                text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(Path(staging) / "clip"),
                text_encoder_2=text_encoder_2, tokenizer_2=AutoTokenizer.from_pretrained(Path(staging) / "t5"),
            )
        pipe.save_pretrained(output_dir)
        return output_dir


FLUX1 = Flux1()


def byte_bpe_vocabulary(extra_tokens: list[str]) -> tuple[dict[str, int], list[str]]:
    """A character-level byte-BPE vocabulary (GPT-2's byte-to-unicode table: printable bytes map to themselves,
    the rest to code points from 256 on): every string tokenizes, one token per byte. Returns (vocab, chars)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    return {t: i for i, t in enumerate(chars + extra_tokens)}, chars


def write_clip_tokenizer(folder: Path) -> None:
    """CLIPTokenizer over the byte vocabulary (vocab.json + merges.txt)."""
    from transformers import CLIPTokenizer

    _, chars = byte_bpe_vocabulary([])
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(folder)


def write_t5_tokenizer(folder: Path) -> None:
    """A Unigram `tokenizer.json` over single characters, loaded by transformers as a T5 tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,'-")
    vocab = [(p, 0.0 if i < 3 else -float(i)) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(folder)
