"""The three contracts (sdlearn.diffusion.Denoiser and Schedule, sdlearn.pipeline.Conditioner): every implementation
through the same assertions; and a wrapper that composes, a test-only ControlNet in miniature defined here (nothing
under sdlearn/ names it), which trains, saves, loads and samples through the pipeline for a UNet and an MMDiT."""
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from tiny import sd3_conditioner, sd3_pipeline
from torch import nn

from sdlearn import flow, pretrained
from sdlearn.adapters import ImagePrompted, IPAdapter
from sdlearn.checks.pipeline import tiny_pipeline
from sdlearn.controlnet import Concatenated
from sdlearn.diffusion import Denoiser, NoiseSchedule, Schedule, sample, samplers
from sdlearn.flow import FlowSchedule
from sdlearn.inpaint import Inpainting, widen_conv_in
from sdlearn.measure import WithoutEncoder
from sdlearn.mmdit import MMDiT, MMDiTConfig
from sdlearn.pipeline import Conditioner, TextConditioner, TextToImage, training_loss
from sdlearn.sd3 import without_third
from sdlearn.sdxl import SDXLConditioner, SDXLUNet
from sdlearn.text import TextConfig, TextEncoder
from sdlearn.unet import UNet, UNetConfig

PROMPTS = ["a red circle on the left", "a blue square at the top and a green cross at the bottom"]


class ControlAdapter(nn.Module):
    """A ControlNet in miniature: a control image [B,C,H,W] (at the latent grid) -> one zero-initialised residual
    per hook point of the wrapped denoiser (a UNet's skips and mid block, an MMDiT's blocks). It starts as the base."""

    def __init__(self, base: nn.Module, channels: int = 3, width: int = 8):
        super().__init__()
        self.base, self.channels, self.width = base, channels, width
        self.embed = nn.Conv2d(channels, width, 3, padding=1)
        shapes = base.residual_shapes(16, 16)  # (C, h, w) of a skip or (N, D) of an MMDiT block's tokens
        self.zero = nn.ModuleList(nn.Conv2d(width, shape[0] if len(shape) == 3 else shape[1], 1) for shape in shapes)
        for conv in self.zero:
            nn.init.zeros_(conv.weight), nn.init.zeros_(conv.bias)

    def init_args(self) -> dict:
        return {"base": self.base, "channels": self.channels, "width": self.width}

    latent_channels = property(lambda self: self.base.latent_channels)
    prediction = property(lambda self: self.base.prediction)
    cond_dims = property(lambda self: {**self.base.cond_dims, "control": self.channels})

    def forward(self, x, t, control, **cond):
        f = F.silu(self.embed(control))                                       # [B,width,H,W]
        residuals = []
        for shape, zero in zip(self.base.residual_shapes(*x.shape[2:]), self.zero):
            if len(shape) == 3:                                               # a skip [C,h,w]
                residuals.append(zero(F.adaptive_avg_pool2d(f, shape[1:])))
            else:                                                             # tokens [N,D] of a patch grid
                p = round(math.sqrt(x.shape[2] * x.shape[3] / shape[0]))
                grid = F.adaptive_avg_pool2d(f, (x.shape[2] // p, x.shape[3] // p))
                residuals.append(rearrange(zero(grid), "b d h w -> b (h w) d"))
        return self.base(x, t, **cond, residuals=residuals)


# -----------------------------------------------------------------------------
# denoisers


def _tiny_unet(**kw):
    torch.manual_seed(0)
    return UNet(UNetConfig(in_channels=4, out_channels=4, channels=(8, 16), layers_per_block=1,
                           attention=(True, True), heads=2, context_dim=12, norm_groups=8, **kw))


def _tiny_mmdit():
    torch.manual_seed(0)
    return MMDiT(MMDiTConfig(in_channels=4, out_channels=4, depth=2, heads=2, head_dim=8, context_dim=12,
                             pooled_dim=10, pos_embed_max_size=8, qk_norm=True, dual_attention_layers=(0,)))


DENOISERS = {
    "unet": lambda: _tiny_unet(prediction="v"),
    "unet-added-cond": lambda: _tiny_unet(added_cond_dim=6),
    "sdxl-unet": lambda: SDXLUNet(_tiny_unet(added_cond_dim=10 + 5 * 4), 5, 4),
    "mmdit": _tiny_mmdit,
    "adapter-on-unet": lambda: ControlAdapter(_tiny_unet()),
    "adapter-on-sdxl-unet": lambda: ControlAdapter(SDXLUNet(_tiny_unet(added_cond_dim=10 + 6 * 4), 6, 4), 1),
    "adapter-on-mmdit": lambda: ControlAdapter(_tiny_mmdit()),
    "map-concatenating-unet": lambda: Concatenated(widen_conv_in(_tiny_unet(), 3)),   # LDM's way (notebook 09)
    # notebook 10's wrappers: an image prompt beside the text, and the 9-channel inpainting UNet
    "ip-adapter-on-unet": lambda: ImagePrompted(_tiny_unet(), IPAdapter.from_unet(_tiny_unet(), embed_dim=6)),
    "inpainting-unet": lambda: Inpainting(widen_conv_in(_tiny_unet())),
}


def _cond(denoiser, B, g):
    """An input for each condition the denoiser says it reads, shaped by what the entry is."""
    shapes = {"context": lambda w: (B, 5, w), "time_ids": lambda w: (B, w), "control": lambda w: (B, w, 8, 8),
              "mask": lambda w: (B, w, 8, 8), "masked_latents": lambda w: (B, w, 8, 8)}
    return {k: torch.randn(*shapes.get(k, lambda w: (B, w))(w), generator=g) for k, w in denoiser.cond_dims.items()}


def _perturbed(module):
    with torch.no_grad():  # off the zero initialisations, so that every input matters
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module.eval()


@pytest.mark.parametrize("name", list(DENOISERS))
def test_every_denoiser_keeps_the_contract(name):
    denoiser = _perturbed(DENOISERS[name]())
    assert isinstance(denoiser, Denoiser)
    assert denoiser.prediction in ("eps", "x0", "v")
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, denoiser.latent_channels, 8, 8, generator=g), torch.tensor([10.0, 900.0])
    cond = _cond(denoiser, 2, g)
    with torch.no_grad():
        out = denoiser(x, t, **cond)
        assert out.shape == x.shape
        assert (out - denoiser(x, t + 50, **cond)).abs().max() > 1e-4, "the time is read"
        for k in cond:  # every condition it says it reads, it reads
            assert (out - denoiser(x, t, **{**cond, k: cond[k] + 1})).abs().max() > 1e-4, k
            with pytest.raises((ValueError, TypeError), match=k):
                denoiser(x, t, **{j: v for j, v in cond.items() if j != k})


# -----------------------------------------------------------------------------
# conditioners


def _sdxl_encoders():
    torch.manual_seed(0)
    return TextEncoder(TextConfig(width=16, layers=2, heads=2)), \
        TextEncoder(TextConfig(width=24, layers=2, heads=2, projection_dim=20))


CONDITIONERS = {
    "text": lambda: TextConditioner(TextEncoder(TextConfig(width=16, layers=1, heads=2))),
    "sdxl-base": lambda: SDXLConditioner(*_sdxl_encoders(), image_size=32),
    "sdxl-refiner": lambda: SDXLConditioner(None, _sdxl_encoders()[1], 32, aesthetic_score=6.0),
    "sdxl-without-first": lambda: WithoutEncoder(SDXLConditioner(*_sdxl_encoders(), image_size=32), 1),
    "sd3": sd3_conditioner,
    "sd3-without-third": lambda: without_third(sd3_conditioner()),
}


@pytest.mark.parametrize("name", list(CONDITIONERS))
def test_every_conditioner_keeps_the_contract(name):
    c = CONDITIONERS[name]()
    assert isinstance(c, Conditioner)
    cond = c(PROMPTS)
    assert {k: v.shape[-1] for k, v in cond.items()} == c.dims and all(len(v) == 2 for v in cond.values())
    twin = c.unconditional(3)
    assert set(c.dropout_keys) <= set(twin) <= set(cond)
    assert all(twin[k].shape == (3, *cond[k].shape[1:]) for k in twin)
    assert not torch.equal(c([PROMPTS[0]])["context"], c([PROMPTS[1]])["context"])
    control = torch.rand(2, 3, 8, 8)
    passed = c(PROMPTS, control=control, scale=0.5)  # a condition it does not take passes through, as it came
    assert passed["control"] is control and passed["scale"] == 0.5
    assert all(torch.equal(passed[k], cond[k]) for k in cond)
    assert set(c.unconditional(1, control=control)) == set(c.unconditional(1))
    if c.takes:  # one it takes is encoded, not passed on
        key = c.takes[0]
        assert key not in c(PROMPTS, **{key: (16, 16)}) and not torch.equal(
            c(PROMPTS, **{key: (16, 16)})["time_ids"], cond["time_ids"])


# -----------------------------------------------------------------------------
# schedules


SCHEDULES = {
    **{f"noise-{kind}-{spacing}": (lambda kind=kind, spacing=spacing: NoiseSchedule(kind, spacing=spacing))
       for kind in ("linear", "scaled_linear", "cosine") for spacing in ("leading", "trailing", "linspace")},
    "noise-offset-1": lambda: NoiseSchedule("scaled_linear", offset=1),
    # the grids of the published checkpoints' schedulers (sdlearn.diffusion.GRIDS): Levels off the integer timesteps
    "noise-euler-karras": lambda: NoiseSchedule("scaled_linear", offset=1, sampler="euler", karras=True),
    "noise-euler-linspace": lambda: NoiseSchedule("scaled_linear", spacing="linspace", sampler="euler_a"),
    "noise-dpm-karras": lambda: NoiseSchedule("scaled_linear", spacing="trailing", sampler="dpmpp_2m", karras=True),
    "noise-dpm-zero-snr": lambda: NoiseSchedule("scaled_linear", sampler="dpmpp_2m", zero_snr=True),
    "flow-shift-3": lambda: FlowSchedule(shift=3.0),
    "flow-shift-1": lambda: FlowSchedule(shift=1.0),
}
PREDICTIONS = {NoiseSchedule: ("eps", "x0", "v"), FlowSchedule: ("v",)}


def _oracle(schedule, x0, prediction, points, like):
    """The perfect denoiser for data x0: at each point, the prediction whose x0 is x0 (found through the schedule's
    own forward process: x = add_noise(x0, eps, t) is affine in eps)."""
    at = {float(schedule.model_timesteps(p, like)[0]): p for p in points}

    def model(x, t):
        p = at[float(t[0])]
        signal = schedule.add_noise(x0, torch.zeros_like(x0), p)
        eps = (x - signal) / schedule.add_noise(torch.zeros_like(x0), torch.ones_like(x0), p)
        return schedule.target(prediction, x0, eps, p)
    return model


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_keeps_the_contract_and_every_sampler_lands_on_the_data(name):
    schedule = SCHEDULES[name]()
    assert isinstance(schedule, Schedule)
    again = type(schedule)(**schedule.init_args())
    assert again.trajectory(7) == schedule.trajectory(7) and len(again) == len(schedule)
    points = schedule.trajectory(7)
    assert len(points) == 8 and all(a > b for a, b in zip(points, points[1:]))
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g)
    assert schedule.model_timesteps(points[0], x0).shape == (3,)
    names = [s.name for s in samplers(schedule)]
    assert names and names == list(dict.fromkeys(names))
    for prediction in PREDICTIONS[type(schedule)]:
        t = points[2]
        x_t = schedule.add_noise(x0, noise.double(), t)
        target = schedule.target(prediction, x0, noise.double(), t)
        assert (schedule.to_x0(prediction, target, x_t, t) - x0).abs().max() < 1e-9
        assert (schedule.to_eps(prediction, target, x_t, t) - noise).abs().max() < 1e-9
        for sampler in names:
            model = _oracle(schedule, x0, prediction, points[:-1], x0)
            out = sample(model, noise.double(), schedule, 7, sampler, prediction=prediction, progress=False,
                         generator=torch.Generator().manual_seed(0))
            assert (out - x0).abs().max() < 1e-6, (sampler, prediction)


# -----------------------------------------------------------------------------
# a wrapper composes: trains, saves, loads and samples through the code that serves what it wraps


def _unet_pipeline():
    base = tiny_pipeline("v")
    return base, ControlAdapter(base.denoiser), training_loss, {"prediction": "v"}


def _mmdit_pipeline():
    base = sd3_pipeline()
    return base, ControlAdapter(base.denoiser), flow.training_loss, {}


@pytest.mark.parametrize("make", [_unet_pipeline, _mmdit_pipeline], ids=["unet", "mmdit"])
def test_an_adapter_trains_saves_loads_and_samples_through_the_pipeline(make, tmp_path: Path):
    base, adapter, loss_fn, options = make()
    pipe = TextToImage(base.conditioner, adapter, base.schedule, base.vae, image_size=base.image_size)
    h = base.latent_shape[1]
    control = torch.rand(2, 3, h, h, generator=torch.Generator().manual_seed(3))
    before = base.generate(PROMPTS, steps=3, progress=False)
    assert torch.equal(pipe.generate(PROMPTS, steps=3, progress=False, control=control), before)  # zero init

    frozen = {k: v.clone() for k, v in adapter.base.state_dict().items()}
    trainable = [p.requires_grad_(True) for n, p in adapter.named_parameters() if not n.startswith("base.")]
    opt = torch.optim.Adam(trainable, lr=1e-2)
    z0, cond = torch.randn(2, *base.latent_shape), {**base.encode_prompts(PROMPTS), "control": control}
    uncond = base.conditioner.unconditional(1)
    adapter.train()
    for _ in range(3):
        loss = loss_fn(adapter, base.schedule, z0, cond, uncond, 0.5, **options)
        opt.zero_grad(), loss.backward(), opt.step()
    adapter.eval()
    assert all(torch.equal(v, adapter.base.state_dict()[k]) for k, v in frozen.items())
    trained = pipe.generate(PROMPTS, steps=3, progress=False, control=control)
    assert (trained - before).abs().max() > 1e-4

    path = pretrained.save(pipe, "tiny-adapter", h, "a test", tmp_path / "tiny-adapter.safetensors")
    state, _ = pretrained.load_file_checked(path)
    assert {k for k in state if k.startswith("denoiser.") and not k.startswith("denoiser.base.")} == \
        {f"denoiser.{k}" for k in adapter.state_dict() if not k.startswith("base.")}
    again = pretrained.load_path(path)
    assert type(again.denoiser) is ControlAdapter
    assert torch.equal(again.generate(PROMPTS, steps=3, progress=False, control=control), trained)
    with pytest.raises(ValueError, match="control"):
        again.generate(PROMPTS, steps=2, progress=False)


def test_nothing_in_the_package_names_the_adapter():
    root = Path(__file__).resolve().parent.parent / "sdlearn"
    assert not [p for p in root.rglob("*.py") if "ControlAdapter" in p.read_text()]


def test_a_pipeline_checks_what_its_parts_say():
    base = tiny_pipeline("v")
    with pytest.raises(ValueError, match=r"the UNet predicts 'v', not 'eps'"):
        TextToImage(base.conditioner, base.denoiser, base.schedule, base.vae, "eps", 16)
    eps_unet = UNet(dataclasses.replace(base.denoiser.config, prediction="eps"))
    assert TextToImage(base.conditioner, eps_unet, base.schedule, base.vae, image_size=16).prediction == "eps"
    with pytest.raises(ValueError, match=r"a FlowSchedule's model predicts the velocity"):
        TextToImage(base.conditioner, eps_unet, FlowSchedule(), base.vae, image_size=16)
