"""The MMDiT of Stable Diffusion 3 and the MMDiT-X of SD3.5: v = mmdit(x_t, t, text, pooled).

    mmdit = MMDiT(MMDiTConfig(in_channels=4, depth=4, heads=4, head_dim=32, context_dim=64, pooled_dim=64))
    v = mmdit(x, t, context, pooled)        # [B,C,H,W], [B] = sigma * 1000, [B,L,D], [B,P] -> [B,C,H,W]

Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", sec. 4 and fig. 2:
- **Patchify**: the latent is cut into p x p patches (p = 2), each a token (a stride-p convolution is the same
  as a linear layer on flattened patches), plus a 2-D position embedding stored for a max grid and centre-cropped
  to the input's grid (SD3: 192 x 192, SD3.5: 384 x 384), so one model serves many image sizes.
- **Conditioning vector** c = MLP(sinusoid(t)) + MLP(pooled text): it modulates every block (adaLN).
- **Joint blocks**: two streams of tokens, image and text, each with its own weights (LayerNorm, QKV, output
  projection, MLP) but one attention over their concatenation [image; text], so text reads the image and the
  image reads the text in the same operation (no cross-attention). Each stream is modulated adaLN-Zero style
  (Peebles & Xie 2023, DiT sec. 3.2): c -> (shift, scale, gate) for the attention and for the MLP; the gates
  start at zero, so every block starts as the identity. The last block's text stream is "pre-only": its output
  is never read, so it keeps only what the joint attention needs (shift, scale, QKV).
- **QK RMSNorm** (SD3.5, paper sec. 5.3.2): an RMSNorm with a learned gain on each head's queries and keys
  keeps the attention logits bounded when training at high learning rates in mixed precision.
- **MMDiT-X** (SD3.5-medium, its first 13 blocks): a second, image-only self-attention in the image stream, with
  its own (shift, scale, gate): nine modulation chunks instead of six.
- A final adaLN (continuous: shift and scale, no gate) and a linear layer back to p x p x C per token; unpatchify.

Names follow the original SD3 / SD3.5 checkpoints (`joint_blocks.{i}.x_block.attn.qkv`, `adaLN_modulation`, ...),
so an original single-file state dict loads after removing its "model.diffusion_model." prefix;
sdlearn.convert.mmdit maps to and from diffusers' SD3Transformer2DModel, which names (and splits) them otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sdlearn.attention import attention_map
from sdlearn.diffusion import _prediction
from sdlearn.unet import timestep_embedding


@dataclass
class MMDiTConfig:
    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    depth: int = 24                               # joint blocks; the last one's text stream is pre-only
    heads: int = 24
    head_dim: int = 64                            # width = heads * head_dim (SD3-medium: 1536)
    context_dim: int = 4096                       # width of the text tokens in (SD3: CLIP-L + CLIP-G + T5, 4096)
    pooled_dim: int = 2048                        # width of the pooled text (SD3: CLIP-L + CLIP-G projections)
    pos_embed_max_size: int = 192                 # the position embedding's grid (patches per side)
    qk_norm: bool = False                         # SD3.5: RMSNorm on each head's q and k
    dual_attention_layers: tuple[int, ...] = ()   # SD3.5-medium: (0, ..., 12), MMDiT-X blocks
    mlp_ratio: int = 4
    time_dim: int = 256                           # sinusoid channels of the timestep
    prediction: str = "v"                         # what it is trained to predict (rectified flow: v = eps - x0)

    def __post_init__(self):
        self.dual_attention_layers = tuple(int(i) for i in self.dual_attention_layers)
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"MMDiTConfig: dual_attention_layers {bad} are not blocks of a depth-{self.depth} MMDiT "
                             f"(0..{self.depth - 1})")
        for name in ("in_channels", "out_channels", "patch_size", "depth", "heads", "head_dim", "context_dim",
                     "pooled_dim", "pos_embed_max_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"MMDiTConfig.{name} must be at least 1, got {getattr(self, name)}")
        self.prediction = _prediction(self.prediction)

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [B,N,D] * (1 + scale [B,D]) + shift [B,D], one (shift, scale) per sample from the conditioning."""
    return x * (1 + scale[:, None]) + shift[:, None]


def sincos_2d(width: int, grid: int, base: float | None = None) -> torch.Tensor:
    """The 2-D sin-cos position embedding (MAE; diffusers' get_2d_sincos_pos_embed) -> [grid*grid, width]: half the
    channels encode the column, half the row, each as a 1-D sinusoid; positions scaled by base / grid."""
    if width % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {width}")
    pos = torch.arange(grid, dtype=torch.float64) / (grid / (base or grid))
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))

    def embed(p):                                              # [grid*grid] -> [grid*grid, width/2]
        out = p[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    return torch.cat([embed(cols.flatten()), embed(rows.flatten())], dim=1).float()


class PatchEmbed(nn.Module):
    """[B,C,H,W] -> [B,(H/p)(W/p),D] tokens: a p x p convolution with stride p (a linear layer per patch)."""

    def __init__(self, in_channels: int, width: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)

    def forward(self, x):
        return rearrange(self.proj(x), "b d h w -> b (h w) d")


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear, for the timestep sinusoid (t_embedder) and the pooled text (y_embedder)."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, x):
        return self.mlp(x)


class StreamAttention(nn.Module):
    """One stream's share of an attention: its fused QKV, optional per-head RMSNorm on q and k, and its output
    projection (absent in a pre-only stream). The joint attention itself happens in JointBlock, over both streams;
    called on its own (MMDiT-X's second attention) it is a self-attention over the stream's tokens."""

    def __init__(self, width: int, heads: int, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.heads, head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.ln_q = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.ln_k = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = None if pre_only else nn.Linear(width, width)

    def split_heads(self, x):                                  # x [B,N,D] -> q, k, v [B,heads,N,head_dim]
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return self.ln_q(q), self.ln_k(k), v

    def forward(self, x):                                      # image-only attention (MMDiT-X's attn2)
        q, k, v = self.split_heads(x)
        return self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))


class StreamBlock(nn.Module):
    """One stream (image or text) of a joint block: its adaLN-Zero modulation, its attention weights and its MLP
    (tanh-GELU, 4x). The original code calls it DismantledBlock: the joint block takes its attention apart."""

    def __init__(self, width: int, heads: int, qk_norm: bool, mlp_ratio: int = 4, pre_only: bool = False,
                 dual_attention: bool = False):
        super().__init__()
        self.pre_only, self.dual_attention = pre_only, dual_attention
        self.chunks = 2 if pre_only else 9 if dual_attention else 6
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = StreamAttention(width, heads, qk_norm, pre_only)
        if dual_attention:
            self.attn2 = StreamAttention(width, heads, qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            self.mlp = nn.Sequential()
            self.mlp.add_module("fc1", nn.Linear(width, mlp_ratio * width))
            self.mlp.add_module("act", nn.GELU(approximate="tanh"))
            self.mlp.add_module("fc2", nn.Linear(mlp_ratio * width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, self.chunks * width))

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """c [B,D] -> `chunks` tensors [B,D]: (shift, scale, gate) for the attention, then for the MLP, then (MMDiT-X)
        for the second attention; a pre-only stream has (shift, scale) only."""
        return self.adaLN_modulation(c).chunk(self.chunks, dim=1)

    def finish(self, x, attn_out, mod, x2=None):
        """After the joint attention: x + gate * proj(attn), (MMDiT-X: + gate2 * attn2(x2)), then the gated MLP."""
        x = x + mod[2][:, None] * self.attn.proj(attn_out)
        if self.dual_attention:
            x = x + mod[8][:, None] * self.attn2(x2)
        return x + mod[5][:, None] * self.mlp(modulate(self.norm2(x), mod[3], mod[4]))


def joint_attention(q_x, k_x, v_x, q_c, k_c, v_c) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's joint attention (sec. 4, fig. 2a): image q, k, v [B,h,N,d] and text q, k, v [B,h,L,d] -> (out_x
    [B,h,N,d], out_c [B,h,L,d]): one softmax(q k^T / sqrt(d)) v over the concatenation [image; text], split back."""
    q, k, v = (torch.cat(pair, dim=2) for pair in ((q_x, q_c), (k_x, k_c), (v_x, v_c)))  # [B,h,N+L,d]
    out = F.scaled_dot_product_attention(q, k, v)
    N = q_x.shape[2]
    return out[:, :, :N], out[:, :, N:]


class JointBlock(nn.Module):
    """An MMDiT block: image and text streams, each modulated by c, attending together over [image; text].
    `attend` is the joint attention it calls (default `joint_attention`; notebook 08 trains with the learner's)."""

    def __init__(self, width: int, heads: int, qk_norm: bool, mlp_ratio: int, pre_only: bool, dual_attention: bool):
        super().__init__()
        self.x_block = StreamBlock(width, heads, qk_norm, mlp_ratio, dual_attention=dual_attention)
        self.context_block = StreamBlock(width, heads, qk_norm, mlp_ratio, pre_only=pre_only)
        self.keep_attention = False        # set True to keep the joint attention weights in self.attention
        self.attention: torch.Tensor | None = None
        self.attend = joint_attention

    def forward(self, x, context, c):      # x [B,N,D] image tokens, context [B,L,D] text tokens, c [B,D]
        mx, mc = self.x_block.modulation(c), self.context_block.modulation(c)
        hx = self.x_block.norm1(x)
        qx, kx, vx = self.x_block.attn.split_heads(modulate(hx, mx[0], mx[1]))
        qc, kc, vc = self.context_block.attn.split_heads(modulate(self.context_block.norm1(context), mc[0], mc[1]))
        if self.keep_attention:            # [B,h,N+L,N+L]: rows and columns ordered [image; text]
            self.attention = attention_map(torch.cat([qx, qc], dim=2), torch.cat([kx, kc], dim=2)).detach()
        out_x, out_c = (rearrange(o, "b h n d -> b n (h d)") for o in self.attend(qx, kx, vx, qc, kc, vc))
        x2 = modulate(hx, mx[6], mx[7]) if self.x_block.dual_attention else None
        x = self.x_block.finish(x, out_x, mx, x2)
        context = None if self.context_block.pre_only else self.context_block.finish(context, out_c, mc)
        return x, context


class FinalLayer(nn.Module):
    """Continuous adaLN (shift, scale from c; no gate) and a linear layer to p*p*C values per token."""

    def __init__(self, width: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)   # the original order; diffusers stores (scale, shift)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MMDiT(nn.Module):
    """The MMDiT: mmdit(x [B,C,H,W], t [B] = sigma * 1000, context [B,L,context_dim], pooled [B,pooled_dim],
    residuals=None) -> v (a sdlearn.diffusion.Denoiser)."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = cfg = config
        D, M = cfg.width, cfg.pos_embed_max_size
        self.x_embedder = PatchEmbed(cfg.in_channels, D, cfg.patch_size)
        # a buffer (not a parameter): filled with 2-D sin-cos here, as diffusers does; the SD3 checkpoints store it
        self.register_buffer("pos_embed", sincos_2d(D, M)[None], persistent=True)   # [1, M*M, D]
        self.t_embedder = MLPEmbedder(cfg.time_dim, D)
        self.y_embedder = MLPEmbedder(cfg.pooled_dim, D)
        self.context_embedder = nn.Linear(cfg.context_dim, D)
        self.joint_blocks = nn.ModuleList(
            JointBlock(D, cfg.heads, cfg.qk_norm, cfg.mlp_ratio, pre_only=i == cfg.depth - 1,
                       dual_attention=i in cfg.dual_attention_layers) for i in range(cfg.depth))
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's initialisation (Peebles & Xie 2023, sec. 3.2): Xavier-uniform linears, N(0, 0.02) embedding MLPs,
        and adaLN-Zero: every modulation and the final linear layer at zero, so each block starts as the identity
        (its gates are 0) and the untrained model predicts v = 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for embedder in (self.t_embedder, self.y_embedder):
            for i in (0, 2):
                nn.init.normal_(embedder.mlp[i].weight, std=0.02)
        for m in [b.adaLN_modulation[1] for b in self.modules() if isinstance(b, (StreamBlock, FinalLayer))]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # -- what it is, as a denoiser -------------------------------------------------------------------------

    latent_channels = property(lambda self: self.config.in_channels)   # the channels of x and of the prediction
    prediction = property(lambda self: self.config.prediction)         # what it is trained to predict

    @property
    def cond_dims(self) -> dict[str, int]:
        """The conditions forward reads (as keywords) and their widths."""
        return {"context": self.config.context_dim, "pooled": self.config.pooled_dim}

    def residual_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        """(tokens, width) of the image tokens after each joint block, which `residuals` adds to, for an input of
        height x width (a ControlNet's hook points)."""
        p = self.config.patch_size
        return [((height // p) * (width // p), self.config.width)] * self.config.depth

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """The centre h x w of the stored M x M position embedding -> [1, h*w, D]."""
        M = self.config.pos_embed_max_size
        top, left = (M - h) // 2, (M - w) // 2
        grid = rearrange(self.pos_embed, "1 (h w) d -> h w d", h=M)
        return rearrange(grid[top:top + h, left:left + w], "h w d -> 1 (h w) d")

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B,C,H,W] -> tokens [B,(H/p)(W/p),D] with their position embedding."""
        p = self.config.patch_size
        return self.x_embedder(x) + self.cropped_pos_embed(x.shape[2] // p, x.shape[3] // p).to(x.dtype)

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[B,h*w,p*p*C] -> [B,C,h*p,w*p]: each token's values back to its p x p patch."""
        p = self.config.patch_size
        return rearrange(tokens, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p)

    def embed(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """c = MLP(sinusoid(t)) + MLP(pooled): [B], [B,P] -> [B,D]."""
        t_emb = self.t_embedder(timestep_embedding(t, self.config.time_dim).to(pooled.dtype))
        return t_emb + self.y_embedder(pooled)

    def joint(self, x, context, c, residuals=None):
        """The joint blocks: image tokens [B,N,D] and text tokens [B,L,D] modulated by c [B,D] -> image tokens,
        with residuals[i] (a ControlNet's, or None) added to the image tokens after block i."""
        for i, block in enumerate(self.joint_blocks):
            x, context = block(x, context, c)
            if residuals is not None and residuals[i] is not None:
                x = x + residuals[i]
        return x

    def use_attention(self, attend=joint_attention) -> MMDiT:
        """Every joint block calls attend(q_x, k_x, v_x, q_c, k_c, v_c) -> (out_x, out_c) (notebook 08 trains with the
        learner's joint_attention); no argument: the reference. -> self."""
        for block in self.joint_blocks:
            block.attend = attend
        return self

    def forward(self, x, t, context, pooled, residuals=None):
        t = self._check_inputs(x, t, context, pooled, residuals)
        p = self.config.patch_size
        h, w = x.shape[2] // p, x.shape[3] // p
        c = self.embed(t, pooled)                  # [B,D]
        x = self.patchify(x)                       # [B,h*w,D]
        context = self.context_embedder(context)   # [B,L,D]
        x = self.joint(x, context, c, residuals)   # [B,h*w,D]
        return self.unpatchify(self.final_layer(x, c), h, w)   # [B,out_channels,H,W]

    def _check_inputs(self, x, t, context, pooled, residuals) -> torch.Tensor:
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != cfg.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"MMDiT: x should be [B,{cfg.in_channels},H,W], got {got}")
        B, _, H, W = x.shape
        p, M = cfg.patch_size, cfg.pos_embed_max_size
        if H % p or W % p:
            raise ValueError(f"MMDiT: height and width must be divisible by the patch size {p}, got {H}x{W}")
        if H // p > M or W // p > M:
            raise ValueError(f"MMDiT: a {H}x{W} latent is a {H // p}x{W // p} grid of patches, larger than the "
                             f"position embedding's {M}x{M}; the largest latent that fits is {M * p}x{M * p}")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(B) if t.ndim == 0 else t
        if t.ndim != 1 or t.shape[0] != B:
            raise ValueError(f"MMDiT: t should be a scalar or [B] = [{B}] timesteps (sigma * 1000), "
                             f"got shape {tuple(t.shape)}")
        if context is None or context.ndim != 3 or context.shape[0] != B or context.shape[-1] != cfg.context_dim:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"MMDiT: context should be [B,L,context_dim] = [{B},L,{cfg.context_dim}] (narrower "
                             f"text is zero-padded to the joint width by the conditioner), got {got}")
        if pooled is None or tuple(pooled.shape) != (B, cfg.pooled_dim):
            got = None if pooled is None else tuple(pooled.shape)
            raise ValueError(f"MMDiT: pooled should be [B,pooled_dim] = [{B},{cfg.pooled_dim}], got {got}")
        if residuals is not None:
            want = [(B, *shape) for shape in self.residual_shapes(H, W)]
            got = [None if r is None else tuple(r.shape) for r in residuals]
            if len(got) != len(want) or any(g is not None and g != w for g, w in zip(got, want)):
                raise ValueError(f"MMDiT: residuals should be {len(want)} tensors (or None) shaped {want[0]}, one per "
                                 f"joint block, got {got}")
        return t


# -----------------------------------------------------------------------------
# the released models' hyper-parameters (diffusers' configs of the published checkpoints)

SD3_MEDIUM = MMDiTConfig()
SD35_MEDIUM = MMDiTConfig(pos_embed_max_size=384, qk_norm=True, dual_attention_layers=tuple(range(13)))

PRESETS = {
    "sd3-medium-mmdit": lambda: MMDiT(replace(SD3_MEDIUM)),
    "sd35-medium-mmdit": lambda: MMDiT(replace(SD35_MEDIUM)),
}
