"""Checkers for 06_latent_diffusion: the training step, the guided prediction, the sampling loop.

Each runs the learner's function on a tiny random pipeline next to sdlearn.pipeline's, and names the usual
mistakes (wrong target, caption dropout inverted, guidance the wrong way round, a missing latent scale).
"""
from __future__ import annotations

import torch

from sdlearn.checks import call, diagnose, expect_tensor, fail, passed
from sdlearn.diffusion import NoiseSchedule, classifier_free_guidance, ddim_step, sample
from sdlearn.pipeline import TextConditioner, TextToImage, min_snr_weight
from sdlearn.text import TextConfig, TextEncoder
from sdlearn.unet import UNet, UNetConfig
from sdlearn.vae import AutoencoderKL, VAEConfig


def tiny_pipeline(prediction: str = "eps", seed: int = 0) -> TextToImage:
    """A random 16 px pipeline (VAE, text encoder, UNet of a few thousand parameters) for checking code."""
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        vae = AutoencoderKL(VAEConfig(channels=(8, 8), layers_per_block=1, norm_groups=4, scaling_factor=0.7,
                                      shift_factor=0.1))
        text = TextEncoder(TextConfig(width=16, layers=1, heads=2))
        unet = UNet(UNetConfig(in_channels=4, out_channels=4, channels=(8, 16), layers_per_block=1,
                               attention=(True, True), heads=2, context_dim=16, norm_groups=8, prediction=prediction))
        with torch.no_grad():  # perturbed so that the prompt and every layer change the output
            for p in unet.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return TextToImage(TextConditioner(text), unet, NoiseSchedule("scaled_linear"), vae, prediction, 16)


# -----------------------------------------------------------------------------
# the training step

LOSS_SHAPES = ("shapes do not line up. z0 is [B, C, h, w], context [B, L, D] and uncond_context [1, L, D]; the "
               "dropout mask and t are [B]: give the mask two trailing axes, drop[:, None, None], for torch.where "
               "to pick between the [B, L, D] and [1, L, D] states; reduce each sample's squared error to [B] with "
               ".mean(dim=(1, 2, 3)) before multiplying it by the [B] min-SNR weights")
GUIDE_SHAPES = ("shapes do not line up. z is [B, C, h, w], t [B], context and uncond_context [B, L, D]: concatenate "
                "each pair along the batch axis (torch.cat([..., ...]), dim 0) so the UNet sees 2B of each, then "
                "split its [2B, C, h, w] output with .chunk(2) (dim 0)")
LOOP_SHAPES = ("shapes do not line up. The UNet takes t as a tensor [n], one timestep per latent "
               "(torch.full((n,), t)); the contexts are [n, L, D], the empty prompt's repeated n times; ddim_step "
               "takes the int timesteps t and t_next")


def latent_loss(fn) -> None:
    """fn(unet, schedule, z0, context, uncond_context, p_uncond, prediction, snr_gamma) -> scalar (LDM eq. 2,
    optionally min-SNR weighted)."""
    probe = _LossProbe("latent_loss", fn)
    probe.targets()
    probe.mse_and_dropout()
    probe.min_snr_weights()
    passed(probe.name)


class _LossProbe:
    """The learner's latent_loss called on 512 latents [512, 4, 2, 2] with text [512, 3, 8], through models that
    record what they were given."""

    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn
        self.sched = NoiseSchedule("scaled_linear")
        g = torch.Generator().manual_seed(0)
        self.z0, self.ctx = torch.randn(512, 4, 2, 2, generator=g), torch.randn(512, 3, 8, generator=g) + 2.0
        self.uncond, self.seen = torch.zeros(1, 3, 8), {}
        self.on = "512 latents [512, 4, 2, 2] with text states [512, 3, 8]"

    def loss(self, model, p_uncond: float, prediction: str, gamma: float | None) -> torch.Tensor:
        return call(self.name, self.fn, model, self.sched, self.z0, self.ctx, self.uncond, p_uncond, prediction, gamma,
                    on=self.on, hints={"size of tensor|shape|broadcast|expand": LOSS_SHAPES})

    def oracle(self, prediction: str, offset: float | torch.Tensor = 0.0):
        """A perfect model (+ offset, a number or one per sample [B,1,1,1]): it knows z0, so it recovers the noise
        from z_t."""
        def model(z_t, t, context):
            if not isinstance(t, torch.Tensor) or t.shape != (len(z_t),):
                fail(self.name, f"the UNet must get one timestep per latent, a tensor [B] = [{len(z_t)}], got "
                                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            self.seen.update(t=t, context=context)
            abar = self.sched.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
            eps = (z_t - abar.sqrt() * self.z0) / (1 - abar).sqrt()
            return self.sched.target(prediction, self.z0, eps, t.long()) + offset
        return model

    def targets(self) -> None:
        name, sched = self.name, self.sched
        for prediction in ("eps", "v"):
            loss = self.loss(self.oracle(prediction), 0.1, prediction, None)
            expect_tensor(name, loss, (), what="the loss")
            if loss.item() > 1e-6:
                other = "v" if prediction == "eps" else "eps"
                if self.loss(self.oracle(other), 0.1, prediction, None).item() < 1e-6:
                    fail(name, f"with prediction={prediction!r} the target must be {prediction} "
                               f"(schedule.target(prediction, z0, noise, t)); yours is {other}")
                fail(name, f"a perfect {prediction}-predictor should have loss 0, yours gets {loss.item():.4g}: "
                           f"noise z0 with schedule.add_noise(z0, noise, t) and compare with "
                           f"schedule.target(prediction, z0, noise, t)")
            t = self.seen["t"]
            if t.dtype not in (torch.long, torch.int) or t.min() < 0 or t.max() >= len(sched):
                fail(name, f"t must be integer timesteps in 0..{len(sched) - 1}, got {t.dtype} from {t.min()} to "
                           f"{t.max()}")
            if t.min() > 100 or t.max() < len(sched) - 100:
                fail(name, f"t must be drawn uniformly from all {len(sched)} timesteps; 512 draws ranged only "
                           f"{t.min().item()}..{t.max().item()}")

    def mse_and_dropout(self) -> None:
        zero = self.loss(lambda z, t, c: torch.zeros_like(z), 0.1, "eps", None)
        if not 0.8 < zero.item() < 1.2:
            fail(self.name, f"predicting 0 should give an MSE near E[eps^2] = 1, got {zero.item():.3g}: is it the "
                            f"mean squared error over every element (F.mse_loss)?")
        for p, lo, hi in [(0.0, 0.0, 0.0), (0.1, 0.03, 0.2), (1.0, 1.0, 1.0)]:
            self.loss(self.oracle("eps"), p, "eps", None)
            dropped = (self.seen["context"] == 0).flatten(1).all(1).float().mean().item()
            if not lo <= dropped <= hi:
                wrong_way = " (is the comparison the wrong way round?)" if dropped > 0.5 > p else ""
                fail(self.name, f"with p_uncond={p} a fraction {p} of the captions should be replaced by "
                                f"uncond_context, {dropped:.2f} were{wrong_way}")

    def min_snr_weights(self) -> None:
        """Sample i off by offset_i everywhere (0.2 to 0.8, a different error per sample, so that averaging the
        errors before weighting them gives another number): the loss is mean_i(offset_i^2 w_i)."""
        name = self.name
        offset = 0.2 + 0.6 * torch.rand(len(self.z0), 1, 1, 1, generator=torch.Generator().manual_seed(3))
        err = offset.flatten() ** 2  # [B]: each sample's mean squared error
        for prediction, gamma in [("v", None), ("v", 5.0), ("eps", 5.0), ("v", 1.0)]:
            loss = self.loss(self.oracle(prediction, offset), 0.1, prediction, gamma).item()
            t = self.seen["t"].long()
            snr = self.sched.snr(t).float()
            weights = {"none": torch.ones_like(snr), "right": min_snr_weight(self.sched, t, prediction, gamma or 1.0),
                       "/snr": snr.clamp(max=gamma or 1.0) / snr, "/(snr+1)": snr.clamp(max=gamma or 1.0) / (snr + 1),
                       "min(snr, gamma)": snr.clamp(max=gamma or 1.0)}
            values = {k: (err * w).mean().item() for k, w in weights.items()}
            values["mean first"] = err.mean().item() * weights["right"].mean().item()
            values["/sum(w)"] = ((err * weights["right"]).sum() / weights["right"].sum()).item()
            got = {k: abs(loss - v) < 1e-4 * max(1.0, abs(v)) for k, v in values.items()}
            if gamma is None:
                if not got["none"]:
                    fail(name, f"with snr_gamma=None the loss is the plain mean of the samples' squared errors: "
                               f"{values['none']:.4g} here, got {loss:.4g}")
                continue
            if got["right"]:
                continue
            _min_snr_mistake(name, got, prediction, gamma)
            fail(name, f"with prediction={prediction!r}, snr_gamma={gamma} and sample i off by offset_i everywhere "
                       f"the loss should be mean_i(offset_i^2 w_i) = {values['right']:.4g}, got {loss:.4g}")


def _min_snr_mistake(name: str, got: dict[str, bool], prediction: str, gamma: float) -> None:
    """Name the weighting the learner's loss matched instead of min-SNR's, if any."""
    if got["none"]:
        fail(name, f"with snr_gamma={gamma} weight each sample's mean squared error by min(SNR_t, gamma) / "
                   f"(SNR_t + 1) for v (/ SNR_t for eps); yours is unweighted")
    if got["/snr"] and prediction == "v":
        fail(name, "for v-prediction the min-SNR weight is min(SNR, gamma) / (SNR + 1), not / SNR")
    if got["/(snr+1)"] and prediction == "eps":
        fail(name, "for eps-prediction the min-SNR weight is min(SNR, gamma) / SNR, not / (SNR + 1)")
    if got["min(snr, gamma)"]:
        fail(name, "min(SNR, gamma) alone is the weight for an x0 target; divide by SNR + 1 (v) or SNR (eps)")
    if got["mean first"]:
        fail(name, "the errors were averaged before they were weighted (err.mean() * w.mean()): weight each sample's "
                   "error by its own timestep's w_t first, (err * w).mean(), with err and w both [B]")
    if got["/sum(w)"]:
        fail(name, "that is a weighted average, sum(w * err) / sum(w): min-SNR keeps the plain mean of the weighted "
                   "errors, (w * err).mean(), so that low-weight timesteps count for less")


# -----------------------------------------------------------------------------
# classifier-free guidance


def guided_prediction(fn) -> None:
    """fn(unet, z [B,...], t [B], context [B,L,D], uncond_context [B,L,D], w) -> uncond + w (cond - uncond)."""
    name = "guided_prediction"
    pipe = tiny_pipeline()
    unet = pipe.denoiser
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 500, 20])
    cond = pipe.encode_prompts(["a red circle", "a blue square at the top", "a cross"])["context"]
    uncond = pipe.encode_prompts([""] * 3)["context"]
    calls = []
    hook = unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    on = "3 latents [3, 4, 8, 8] with w = 3"
    try:
        with torch.no_grad():
            got = call(name, fn, unet, z, t, cond, uncond, 3.0, on=on,
                       hints={"size of tensor|shape|Sizes of tensors|broadcast|expand|should be": GUIDE_SHAPES})
    finally:
        hook.remove()
    got = expect_tensor(name, got, tuple(z.shape), what="the guided prediction")
    with torch.no_grad():
        e_c, e_u = unet(z, t, cond), unet(z, t, uncond)
    diagnose(name, got, classifier_free_guidance(e_u, e_c, 3.0), {
        "the guidance is the wrong way round (or the halves of your batch swapped): uncond + w * (cond - uncond), "
        "you have cond + w * (uncond - cond)": classifier_free_guidance(e_c, e_u, 3.0),
        "you returned the conditional prediction alone: guidance needs uncond + w * (cond - uncond)": e_c,
        "you returned uncond + w * cond: the step is w times the *difference* cond - uncond": e_u + 3.0 * e_c,
        "you returned w * cond - uncond: it is uncond + w * (cond - uncond)": 3.0 * e_c - e_u,
    }, on=on, what="the guided prediction",
        advice="Expected eps_uncond + w * (eps_cond - eps_uncond) with eps = unet(z, t, context)")
    if calls != [2 * len(z)]:
        print(f"   (correct; it ran the UNet {len(calls)} times on batches of {calls}: one call on a batch of "
              f"{2 * len(z)} (torch.cat) does the same work in one pass)")
    passed(name)


# -----------------------------------------------------------------------------
# the sampling loop


def sample_loop(fn) -> None:
    """fn(pipe, prompts, steps, w, seed) -> images [N,3,H,W] in [-1,1], equal to pipe.generate (DDIM, eta=0)."""
    name = "sample_loop"
    pipe = tiny_pipeline()
    prompts = ["a red circle on the left", "a blue square at the top"]
    on = "2 prompts, 4 steps, w = 3, seed 5"
    with torch.no_grad():
        got = call(name, fn, pipe, prompts, 4, 3.0, 5, on=on,
                   hints={"size of tensor|shape|Sizes of tensors|broadcast|expand|timestep|should be": LOOP_SHAPES})
    got = expect_tensor(name, got, (2, 3, pipe.image_size, pipe.image_size), what="the images")
    ts = pipe.schedule.timesteps(4).tolist()
    z0 = pipe.noise(2, 5)
    cond, uncond = pipe.encode_prompts(prompts), pipe.encode_prompts([""])

    @torch.no_grad()
    def loop(timesteps, w):  # the reference loop, over explicit timesteps
        return sample(pipe.denoiser, z0, pipe.schedule, timesteps, cond=cond, uncond=uncond, guidance_scale=w,
                      prediction=pipe.prediction, progress=False)

    @torch.no_grad()
    def to_t_minus_one():  # a loop whose every step goes to t - 1
        z = z0
        for t in ts:
            both = torch.cat([uncond["context"].expand(2, -1, -1), cond["context"]])
            out = classifier_free_guidance(*pipe.denoiser(torch.cat([z, z]), torch.full((4,), t), both).chunk(2), 3.0)
            z = ddim_step(pipe.schedule, out, z, t, t - 1, prediction=pipe.prediction)
        return pipe.decode(z)

    def mistakes():  # computed one at a time, only as far as needed
        z = loop(ts, 3.0)
        yield ("the latents were decoded as they are: undo the latent scaling first, "
               "pipe.vae.from_latent(z) = decode(z / scaling_factor + shift_factor)"), pipe.vae.decode(z).clamp(-1, 1)
        yield "the images should be clamped to [-1, 1] after decoding", pipe.vae.from_latent(z)
        yield "these are the images without guidance (w = 1): use your guided_prediction with w", \
            pipe.decode(loop(ts, 1.0))
        yield "one step too few: the loop must visit every timestep of schedule.timesteps(steps)", \
            pipe.decode(loop(ts[1:], 3.0))
        yield ("each DDIM step must jump to the *next sampling* timestep (ts[i + 1], and -1 after the last), "
               "not to t - 1"), to_t_minus_one()

    expected = pipe.generate(prompts, 4, 3.0, seed=5, progress=False)
    diagnose(name, got, expected, mistakes(), on=on, atol=1e-4, what="the images",
             advice="Start from pipe.noise(len(prompts), seed), step through schedule.timesteps(steps) with "
                    "ddim_step, then pipe.decode")
    passed(name)
