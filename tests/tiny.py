"""Tiny random diffusers / transformers parts for the parity tests: no download, every weight matters.

Imported by the test modules (pytest puts tests/ on sys.path): `from tiny import write_bpe, perturbed, ...`.
"""
import json

import pytest
import torch

from sdlearn.flow import FlowSchedule
from sdlearn.mmdit import MMDiT, MMDiTConfig
from sdlearn.pipeline import TextToImage
from sdlearn.sd3 import SD3Conditioner
from sdlearn.text import TextConfig, TextEncoder
from sdlearn.vae import AutoencoderKL, VAEConfig


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny; on a busy 2-core machine two OpenMP threads per op oversubscribe the cores and
    diffusers' loop ran ~80x slower (15 s instead of 0.2 s). Autouse in every module that imports it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_bpe(folder):
    """A tiny CLIP byte-pair vocabulary: every lower-case letter (alone and word-final) and a few merges."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>", "t h", "th e</w>", "o n</w>",
              "b l", "bl u", "blu e</w>", "l e", "le f", "lef t</w>"]
    vocab = ["!", *letters, *(c + "</w>" for c in letters), *(m.replace(" ", "") for m in merges),
             "<|startoftext|>", "<|endoftext|>"]  # <|endoftext|> the largest id, as in CLIP
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


def clip_tokenizer(folder, length: int, **options):
    from transformers import CLIPTokenizer

    vocab, merges = write_bpe(folder)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=length, **options)


def perturbed(model, scale=0.05):
    """Default inits leave some weights at zero (zero-initialised output convs); make every tensor matter."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def check_images(ours, theirs, label, n, size, tol=1e-4):
    """ours [N,3,H,W] in [-1, 1], theirs diffusers' "pt" output in [0, 1]: equal to `tol`, and worth comparing."""
    e = err((ours + 1) / 2, theirs)
    inside = ((theirs > 0.01) & (theirs < 0.99)).float().mean().item()
    print(f"{label}: max abs error {e:.2e} on [0, 1] ({inside:.0%} of pixels unclipped)")
    assert ours.shape == theirs.shape == (n, 3, size, size)
    assert inside > 0.5, "the images are mostly clipped: the comparison would say little"
    assert err(theirs[0], theirs[1]) > 1e-2, "the two prompts gave the same image: the text is not read"
    assert e <= tol, f"{label}: max abs error {e:.2e}"


def vae(size, latent_channels=4, scale=0.1, **options):
    """A two-level AutoencoderKL (one downsampling: latents of size // 2)."""
    from diffusers import AutoencoderKL

    return perturbed(AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels, norm_num_groups=4,
        layers_per_block=1, sample_size=size, **options), scale=scale)


def unet(size, context, down=("DownBlock2D", "CrossAttnDownBlock2D"), **options):
    """A two-level UNet2DConditionModel on latents of size // 2 reading `context` channels of text."""
    from diffusers import UNet2DConditionModel

    up = tuple(t.replace("Down", "Up") for t in reversed(down))
    kw = dict(block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=(2, 4), norm_num_groups=8,
              transformer_layers_per_block=(1, 2))
    return perturbed(UNet2DConditionModel(
        sample_size=size // 2, in_channels=4, out_channels=4, down_block_types=down, up_block_types=up,
        cross_attention_dim=context, **{**kw, **options}))


def clip_text(tokenizer, width, heads, act="quick_gelu", projection=None, layers=3, **options):
    """A CLIPTextModel (projection None) or CLIPTextModelWithProjection over `tokenizer`'s vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length, num_hidden_layers=layers,
        bos_token_id=tokenizer.bos_token_id, hidden_size=width, intermediate_size=2 * width,
        num_attention_heads=heads, hidden_act=act, **({"projection_dim": projection} if projection else {}),
        **{"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **options})
    return perturbed((CLIPTextModelWithProjection if projection else CLIPTextModel)(config))


def sd3_conditioner(seed=0, **kw):
    """SD3's three encoders in miniature (CLIP-L's role 16 wide, bigG's 24, T5's 32 and bidirectional)."""
    torch.manual_seed(seed)
    encoders = [TextEncoder(TextConfig(width=w, layers=2, heads=2, projection_dim=p, causal=c))
                for w, p, c in ((16, 16, True), (24, 24, True), (32, None, False))]
    return SD3Conditioner(*encoders, **kw)


def sd3_pipeline(seed=0):
    """A random 16 px SD3.5-like pipeline: the tiny conditioner, a 16-channel VAE, a 2-block MMDiT-X with QK norm."""
    cond = sd3_conditioner(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(VAEConfig(channels=(8, 8), layers_per_block=1, norm_groups=4, latent_channels=16,
                                  use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5,
                                  shift_factor=0.06))
    mmdit = MMDiT(MMDiTConfig(in_channels=16, out_channels=16, depth=2, heads=2, head_dim=8, context_dim=40,
                              pooled_dim=40, pos_embed_max_size=8, qk_norm=True, dual_attention_layers=(0,)))
    with torch.no_grad():        # off the adaLN-Zero start, so that the prompt changes the output
        for p in mmdit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return TextToImage(cond, mmdit, FlowSchedule(shift=3.0), vae, "v", 16)
