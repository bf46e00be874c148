"""The notebook-06 checkers pass the reference answers and name the usual mistakes."""
import pytest
import torch

from sdlearn.checks import CheckFailed
from sdlearn.checks import pipeline as check
from sdlearn.diffusion import classifier_free_guidance as cfg
from sdlearn.diffusion import ddim_step
from sdlearn.pipeline import training_loss


def loss_with(target="right", drop="right", mse="right", weight="right"):
    def fn(unet, schedule, z0, context, uncond, p_uncond=0.1, prediction="eps", snr_gamma=None):
        keep = torch.rand(len(z0)) < p_uncond
        if drop == "inverted":
            keep = ~keep
        context = torch.where(keep if drop == "no-reshape" else keep[:, None, None], uncond, context)
        t = torch.randint(0, len(schedule), (len(z0),))
        noise = torch.randn_like(z0)
        wanted = {"right": prediction, "eps": "eps", "x0": "x0"}[target]
        out = unet(schedule.add_noise(z0, noise, t), t, context)
        tgt = schedule.target(wanted, z0, noise, t)
        if mse != "right":
            return (out - tgt).abs().sum()
        err = ((out - tgt) ** 2).mean((1, 2, 3))
        if snr_gamma is not None and weight in ("mean-first", "/sum(w)"):
            snr = schedule.snr(t).float()
            w = snr.clamp(max=snr_gamma) / (snr + 1 if prediction == "v" else snr)
            return err.mean() * w.mean() if weight == "mean-first" else (err * w).sum() / w.sum()
        if snr_gamma is not None and weight != "none":
            snr = schedule.snr(t).float()
            err = err * snr.clamp(max=snr_gamma) / (snr if weight == "/snr" else snr + 1 if prediction == "v" else snr)
        return err.mean()
    return fn


def test_latent_loss_passes_the_reference():
    def reference(unet, schedule, z0, context, uncond, p_uncond=0.1, prediction="eps", snr_gamma=None):
        # training_loss calls model(z_t, t, **cond), the checker's models take it positionally
        def model(z_t, t, context):
            return unet(z_t, t, context)

        return training_loss(model, schedule, z0, {"context": context}, {"context": uncond}, p_uncond, prediction,
                             snr_gamma)

    check.latent_loss(reference)


@pytest.mark.parametrize("kwargs, message", [
    (dict(target="eps"), "target must be v"),
    (dict(target="x0"), "a perfect eps-predictor should have loss 0"),
    (dict(drop="inverted"), "the comparison the wrong way round"),
    (dict(mse="sum"), "should have loss 0|MSE near"),
    (dict(weight="none"), "yours is unweighted"),
    (dict(weight="/snr"), r"not / SNR"),
    (dict(weight="mean-first"), r"averaged before they were weighted \(err.mean\(\) \* w.mean\(\)\)"),
    (dict(weight="/sum(w)"), r"weighted average, sum\(w \* err\) / sum\(w\)"),
    (dict(drop="no-reshape"), r"raised RuntimeError .* drop\[:, None, None\]"),
])
def test_latent_loss_names_mistakes(kwargs, message):
    with pytest.raises(CheckFailed, match=message):
        check.latent_loss(loss_with(**kwargs))


def test_guided_prediction():
    def right(unet, z, t, c, u, w):
        e_u, e_c = unet(torch.cat([z, z]), torch.cat([t, t]), torch.cat([u, c])).chunk(2)
        return cfg(e_u, e_c, w)

    check.guided_prediction(right)
    check.guided_prediction(lambda unet, z, t, c, u, w: cfg(unet(z, t, u), unet(z, t, c), w))  # two calls: fine
    with pytest.raises(CheckFailed, match="wrong way round"):
        check.guided_prediction(lambda unet, z, t, c, u, w: right(unet, z, t, u, c, w))
    with pytest.raises(CheckFailed, match="conditional prediction alone"):
        check.guided_prediction(lambda unet, z, t, c, u, w: unet(z, t, c))
    with pytest.raises(CheckFailed, match="shape"):
        check.guided_prediction(
            lambda unet, z, t, c, u, w: unet(torch.cat([z, z]), torch.cat([t, t]), torch.cat([u, c])))
    with pytest.raises(CheckFailed, match=r"raised ValueError .*concatenate each pair along the batch axis"):
        check.guided_prediction(lambda unet, z, t, c, u, w: cfg(
            *unet(torch.cat([z, z], 1), torch.cat([t, t]), torch.cat([u, c])).chunk(2), w))  # z cat on channels


def loop_with(mistake=None):
    def fn(pipe, prompts, steps, w, seed):
        z = pipe.noise(len(prompts), seed)
        c, u = pipe.encode_prompts(prompts)["context"], pipe.encode_prompts([""] * len(prompts))["context"]
        if mistake == "uncond-1":  # the empty prompt once, not once per prompt: one batch of 1 + n fails
            u = u[:1]
        ts = pipe.schedule.timesteps(steps).tolist()
        for i, t in enumerate(ts):
            t_next = t - 1 if mistake == "t-1" else (ts[i + 1] if i + 1 < len(ts) else -1)
            tt = torch.full((len(z),), t)
            if mistake == "uncond-1":
                both = pipe.denoiser(torch.cat([z, z]), torch.full((2 * len(z),), t), torch.cat([u, c]))
                out = cfg(*both.chunk(2), w)
            else:
                out = cfg(pipe.denoiser(z, tt, u), pipe.denoiser(z, tt, c), 1.0 if mistake == "no-guidance" else w)
            z = ddim_step(pipe.schedule, out, z, t, t_next)
        return (pipe.vae.decode(z) if mistake == "no-scale" else pipe.vae.from_latent(z)).clamp(-1, 1)
    return fn


def test_sample_loop():
    check.sample_loop(loop_with())
    for mistake, message in [("t-1", "next sampling"), ("no-guidance", "without guidance"),
                             ("no-scale", "latent scaling"), ("uncond-1", r"the empty prompt's repeated n times")]:
        with pytest.raises(CheckFailed, match=message):
            check.sample_loop(loop_with(mistake))


def test_a_crash_in_the_learners_code_names_the_input():
    def crashes(pipe, prompts, steps, w, seed):
        return pipe.noise(len(prompts), seed) @ torch.zeros(3, 3)

    with pytest.raises(CheckFailed, match=r"sample_loop: raised RuntimeError on 2 prompts, 4 steps"):
        check.sample_loop(crashes)
    with pytest.raises(CheckFailed, match=r"guided_prediction: raised ValueError on 3 latents"):
        check.guided_prediction(lambda unet, z, t, c, u, w: unet(z, t, c[:1]))


def test_sample_loop_without_the_clamp_is_named():
    def unclamped(pipe, prompts, steps, w, seed):
        return pipe.vae.from_latent(pipe.generate(prompts, steps, w, seed=seed, output="latent", progress=False))

    with pytest.raises(CheckFailed, match="clamped to \\[-1, 1\\]"):
        check.sample_loop(unclamped)
