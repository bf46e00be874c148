import json
from dataclasses import asdict

import pytest
import torch

from sdlearn import convert, presets
from sdlearn.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, kl_divergence, psnr, reparameterize, vae_loss

TINY = dict(channels=(8, 16, 16), layers_per_block=1, norm_groups=4)


def tiny(**kw) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(VAEConfig(**{**TINY, **kw})).eval()


# -----------------------------------------------------------------------------
# fidelity: parameter counts and parity with diffusers


@pytest.mark.parametrize("name", ["sd-vae", "sd3-vae"])
def test_published_parameter_counts(name):
    model = presets.build(name, device="meta")
    assert presets.count_parameters(model) == presets.PUBLISHED[name]


def test_sd3_preset_has_16_channels_no_quant_convs_and_its_shift():
    vae = presets.build("sd3-vae")
    assert vae.config.latent_channels == 16 and vae.quant_conv is None and vae.post_quant_conv is None
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (1.5305, 0.0609)
    assert presets.build("sd-vae").config.scaling_factor == 0.18215


def _diffusers_vae(latent_channels, quant, attention=True):
    from diffusers import AutoencoderKL as DiffusersVAE

    torch.manual_seed(0)
    theirs = DiffusersVAE(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                          block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4,
                          latent_channels=latent_channels, use_quant_conv=quant, use_post_quant_conv=quant,
                          mid_block_add_attention=attention).eval()
    with torch.no_grad():  # default inits leave some convs at zero; make every weight matter
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return theirs


@pytest.mark.parametrize("latent_channels", [4, 16])
@pytest.mark.parametrize("quant", [True, False])
def test_parity_with_diffusers_both_directions(latent_channels, quant):
    theirs = _diffusers_vae(latent_channels, quant)
    ours = convert.from_diffusers(theirs)
    assert isinstance(ours, AutoencoderKL) and (ours.quant_conv is None) == (not quant)
    x = torch.randn(2, 3, 16, 12)
    z = torch.randn(2, latent_channels, 4, 3)
    with torch.no_grad():
        want = theirs.encode(x).latent_dist
        got = ours.encode(x)
        assert (got.mean - want.mean).abs().max() < 1e-4
        assert (got.logvar - want.logvar).abs().max() < 1e-4
        assert (ours.decode(z) - theirs.decode(z).sample).abs().max() < 1e-4
        back = convert.to_diffusers(ours).eval()
        assert (back.encode(x).latent_dist.mean - got.mean).abs().max() < 1e-4
        assert (back.decode(z).sample - ours.decode(z)).abs().max() < 1e-4
    assert back.config.use_quant_conv == quant and back.config.latent_channels == latent_channels


def test_to_diffusers_from_a_fresh_sdlearn_model_and_no_mid_attention():
    ours = tiny(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06,
                scaling_factor=1.5, mid_attention=False)
    theirs = convert.to_diffusers(ours).eval()
    assert theirs.config.shift_factor == 0.06 and theirs.config.scaling_factor == 1.5
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert (theirs.encode(x).latent_dist.mean - ours.encode(x).mean).abs().max() < 1e-4
    again = convert.from_diffusers(theirs)
    assert again.config == ours.config


def test_diagonal_gaussian_matches_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    params = torch.randn(2, 8, 3, 3) * 3
    params[0, 4, 0, 0] = 40.0  # clamped to 20
    params[0, 5, 0, 0] = -50.0  # clamped to -30
    ours, theirs = DiagonalGaussian(params), DiagonalGaussianDistribution(params)
    for a, b in [(ours.mean, theirs.mean), (ours.logvar, theirs.logvar), (ours.std, theirs.std),
                 (ours.kl(), theirs.kl())]:
        torch.testing.assert_close(a, b)
    assert ours.logvar.max() == 20 and ours.logvar.min() == -30
    assert torch.equal(ours.mode(), ours.mean)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(ours.sample(g1), theirs.sample(g2))


# -----------------------------------------------------------------------------
# the model's interface


def test_shapes_and_latent_helpers_apply_shift_and_scale():
    vae = tiny(scaling_factor=0.5, shift_factor=0.25)
    assert vae.downsampling_factor == 4
    x = torch.rand(2, 3, 16, 8) * 2 - 1
    with torch.no_grad():
        post = vae.encode(x)
        assert post.mean.shape == post.logvar.shape == (2, 4, 4, 2)
        z = vae.to_latent(x, sample=False)
        torch.testing.assert_close(z, (post.mean - 0.25) * 0.5)
        torch.testing.assert_close(vae.from_latent(z), vae.decode(post.mean))
        rec, post2 = vae(x)
        assert rec.shape == x.shape and isinstance(post2, DiagonalGaussian)
        g = torch.Generator().manual_seed(0)
        a = vae.to_latent(x, generator=g)
        g.manual_seed(0)
        torch.testing.assert_close(a, vae.to_latent(x, generator=g))


@pytest.mark.parametrize("bad, err, match", [
    (torch.zeros(1, 3, 10, 8), ValueError, r"H and W divisible by 4.*got 10x8"),
    (torch.zeros(1, 1, 8, 8), ValueError, r"\[B,3,H,W\].*got shape \(1, 1, 8, 8\)"),
    (torch.zeros(3, 8, 8), ValueError, r"got shape \(3, 8, 8\)"),
    ([[0.0]], TypeError, "got list"),
])
def test_encode_rejects_bad_images(bad, err, match):
    with pytest.raises(err, match=match):
        tiny().encode(bad)


@pytest.mark.parametrize("bad, err, match", [
    (torch.zeros(1, 3, 2, 2), ValueError, r"\[B,4,h,w\]; got shape \(1, 3, 2, 2\)"),
    (torch.zeros(4, 2, 2), ValueError, r"\[B,4,h,w\]; got shape \(4, 2, 2\)"),
    ("z", TypeError, "got str"),
])
def test_decode_rejects_bad_latents(bad, err, match):
    with pytest.raises(err, match=match):
        tiny().decode(bad)


def test_config_validates_and_survives_json():
    with pytest.raises(ValueError, match="divisible by norm_groups=32"):
        VAEConfig(channels=(48, 64))
    cfg = VAEConfig(**TINY)
    assert VAEConfig(**json.loads(json.dumps(asdict(cfg)))) == cfg


# -----------------------------------------------------------------------------
# the formulas


def test_reparameterize_kl_and_loss():
    mean, logvar = torch.randn(2, 4, 3, 3, requires_grad=True), torch.randn(2, 4, 3, 3, requires_grad=True)
    noise = torch.randn(2, 4, 3, 3)
    z = reparameterize(mean, logvar, noise)
    torch.testing.assert_close(z, mean + logvar.mul(0.5).exp() * noise)
    z.sum().backward()
    assert torch.equal(mean.grad, torch.ones_like(mean))
    assert kl_divergence(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)).abs().max() == 0
    # closed form against a Monte Carlo estimate of E_q[log q - log p]
    m, lv = torch.tensor([[[[0.5]]]]), torch.tensor([[[[-1.0]]]])
    s = reparameterize(m, lv, torch.randn(200_000, 1, 1, 1, generator=torch.Generator().manual_seed(0)))
    log_q = torch.distributions.Normal(m, lv.mul(0.5).exp()).log_prob(s)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(s)
    assert abs((log_q - log_p).mean() - kl_divergence(m, lv)[0]) < 0.01
    x = torch.zeros(2, 3, 4, 4)
    torch.testing.assert_close(vae_loss(x, x + 1, torch.zeros(2, 4, 1, 1), torch.zeros(2, 4, 1, 1), 0.5),
                               torch.tensor(48.0))
    torch.testing.assert_close(vae_loss(x, x + 1, torch.ones(2, 4, 1, 1), torch.zeros(2, 4, 1, 1), 0.5, "l1"),
                               torch.tensor(48.0 + 0.5 * 2.0))
    with pytest.raises(ValueError, match="recon must be 'l2' or 'l1', got 'l3'"):
        vae_loss(x, x, x, x, 0.1, "l3")


def test_psnr():
    x = torch.zeros(2, 3, 4, 4)
    torch.testing.assert_close(psnr(x, x + 0.2), torch.full((2,), 20.0))  # 0.1 on the [0,1] scale
