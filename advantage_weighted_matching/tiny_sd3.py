"""A tiny, random-weight Stable Diffusion 3 pipeline for CPU runs and tests.

    python -m advantage_weighted_matching.tiny_sd3 OUT_DIR [--seed N]

writes a complete diffusers ``StableDiffusion3Pipeline`` directory (MMDiT with
dual attention and RMS qk-norm like SD3.5-Medium, two CLIP text encoders with
projections, a T5 encoder, a small VAE, locally built CLIP-BPE and T5-Unigram
tokenizers, the SD3 flow-matching scheduler with shift 3.0). It loads back with
the ordinary ``StableDiffusion3Pipeline.from_pretrained(OUT_DIR)``: the very
code path used for ``stabilityai/stable-diffusion-3.5-medium``. Same seed, same
bytes of weights.
"""

import argparse
import os
import shutil
import string
import tempfile

import torch

# Sizes: latent channels 4, VAE downsampling 2x, transformer width 2 heads x 8.
LATENT_CHANNELS = 4
CLIP_DIM = 16
T5_DIM = 32
MAX_LENGTH_CLIP = 77


def _bpe(symbols, merges):
    """Byte-pair encoding of a symbol list: repeatedly merge the adjacent pair of best rank."""
    rank = {pair: index for index, pair in enumerate(merges)}
    while len(symbols) > 1:
        pairs = [(rank.get(pair, len(rank)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        best, i = min(pairs)
        if best == len(rank):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def _clip_tokenizer(words=()):
    """Character-level CLIP BPE; each of `words` (lowercase) additionally becomes one token
    through a chain of merges (toy pipelines: whole-word prompts fit a short sequence)."""
    from transformers import CLIPTokenizer

    # Byte-level-ish BPE over printable characters; a few merges so that BPE
    # actually merges (the real tokenizer's behaviour, in miniature).
    chars = [c for c in string.printable if not c.isspace()]
    vocab = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "f</w>"), ("i", "n")]
    for word in words:  # what BPE leaves of the word so far, then merged left to right
        symbols = _bpe(list(word[:-1]) + [word[-1] + "</w>"], merges)
        for symbol in symbols[1:]:
            merges.append((symbols[0], symbol))
            symbols[0] += symbol
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH_CLIP)
    return tokenizer


def _t5_tokenizer(words=()):
    """Character-level T5 Unigram; each of `words` is also one piece ("\u2581word", best score)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -2.0) for c in string.ascii_lowercase]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + word, -1.0) for word in words if len(word) > 1]  # "\u2581a" is there already
    model = models.Unigram(pieces, unk_id=2, byte_fallback=False)
    backend = Tokenizer(model)
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return T5TokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512,
        extra_ids=0,
    )


def build_tiny_sd3(out_dir, seed=0):
    """Build the tiny pipeline with weights drawn from `seed` and save it to `out_dir`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tokenizer = _clip_tokenizer()
    t5_tokenizer = _t5_tokenizer()

    def clip_encoder():
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(clip_tokenizer), hidden_size=CLIP_DIM, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, projection_dim=CLIP_DIM, max_position_embeddings=MAX_LENGTH_CLIP,
                bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
                pad_token_id=clip_tokenizer.pad_token_id, hidden_act="gelu",
            )
        )

    text_encoder, text_encoder_2 = clip_encoder(), clip_encoder()
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer), d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
    )
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_DIM, caption_projection_dim=16,
        pooled_projection_dim=2 * CLIP_DIM, pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=32, scaling_factor=1.5305,
        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer, text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    )
    return save_pipeline_atomic(pipeline, out_dir)


def save_pipeline_atomic(pipeline, out_dir, extra_files=None):
    """`save_pretrained` into a sibling temp dir, add `extra_files` (name -> text), rename to `out_dir`:
    a half-written pipeline never appears at `out_dir` (models are built on demand)."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".sd3_pipeline_", dir=parent)
    try:
        pipeline.save_pretrained(tmp_dir, safe_serialization=True)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp_dir, name), "w", encoding="utf-8") as f:
                f.write(text)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def ensure_tiny_sd3(out_dir, seed=0, build=None):
    """Build the tiny pipeline (`build`, default SD3) at `out_dir` unless a complete one is already there."""
    if not os.path.exists(os.path.join(out_dir, "model_index.json")):
        (build or build_tiny_sd3)(out_dir, seed)
    return out_dir


def main(argv=None, build=None, doc=__doc__):
    """`python -m ... OUT_DIR [--seed N]` for a tiny pipeline builder (default SD3)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = (build or build_tiny_sd3)(args.out_dir, args.seed)
    print(f"tiny pipeline (seed {args.seed}) written to {path}")


if __name__ == "__main__":
    main()
