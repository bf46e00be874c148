"""The published Stable Diffusion checkpoints in sdlearn's modules, next to diffusers: for learners with a GPU.

    folder = hub.download("sd15")                                   # ~2.8 GB of fp16 weights (huggingface_hub)
    ours, theirs, seconds = hub.side_by_side("sd15", "an astronaut riding a horse", device="cuda")
    ours, theirs, seconds = hub.side_by_side("sd15", "a house", controlnet="sd15-canny", control=edges)  # ControlNet

Never called by the tests or by a notebook's default path (it downloads gigabytes); the tests run `side_by_side`
on a local folder, which any name may be. The two pipelines start from the same latents and step with the same
sampler, the checkpoint's own scheduler config (SDXL: Euler; SD3: Euler on the shifted flow schedule; SD 1.x's
PNDM, which sdlearn does not implement: DDIM from that config on both sides), one after the other so that only one
is in GPU memory at a time.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from sdlearn.convert.pipeline import _weights_file, load
from sdlearn.convert.scheduler import SAMPLERS

# name -> where it is published, its fp16 weights' variant, image side, whether its licence must be accepted on
# huggingface.co first (then log in: huggingface_hub.login()), and the memory its fp16 weights take
CHECKPOINTS = {
    "sd15": dict(repo="stable-diffusion-v1-5/stable-diffusion-v1-5", variant="fp16", size=512, gated=False,
                 memory="2.1 GB (UNet 1.7, text encoder 0.25, VAE 0.17)"),
    "sdxl": dict(repo="stabilityai/stable-diffusion-xl-base-1.0", variant="fp16", size=1024, gated=False,
                 refiner="stabilityai/stable-diffusion-xl-refiner-1.0",
                 memory="7.1 GB base (UNet 5.1, text encoders 1.6, VAE in fp32 0.3) + 6.2 GB refiner"),
    "sd35-medium": dict(repo="stabilityai/stable-diffusion-3.5-medium", variant=None, size=1024, gated=True,
                        memory="16 GB: MMDiT-X 4.5, CLIPs 1.6, T5 9.5, VAE 0.3; 6.5 GB with skip=['text_encoder_3']"),
}
# ControlNets (Zhang et al. 2023): name -> where it is published, the checkpoint it steers, its fp16 weights'
# variant (None: the repo publishes fp32 safetensors only), and the memory its weights take in fp16
CONTROLNETS = {
    "sd15-canny": dict(repo="lllyasviel/sd-controlnet-canny", base="sd15", variant=None,
                       memory="0.72 GB in fp16 (361 M parameters; a 1.45 GB fp32 download)"),
}
OPT_IN = "SDLEARN_REAL_WEIGHTS"
SKIPPED = (f"skipped: the real checkpoint downloads gigabytes; it runs in the gpu profile with {OPT_IN}=1 in the "
           f"environment (Colab: %env {OPT_IN}=1, then run this cell again)")
CONFIGS = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer*/*"]


def wanted(profile) -> bool:
    """Whether a notebook's real-weights section runs: the gpu profile (not its dry run, whose name says so) and
    SDLEARN_REAL_WEIGHTS=1; never in CI."""
    return profile.name == "gpu" and os.environ.get(OPT_IN) == "1"


def _weights(variant: str | None) -> list[str]:
    return [f"*/*.{variant}.safetensors", f"*/*.{variant}.safetensors.index.json"] if variant else \
        ["*/*.safetensors", "*/*.safetensors.index.json"]


def download(name: str, refiner: bool = False, token: str | None = None) -> Path:
    """The diffusers folder of checkpoint `name` (a key of CHECKPOINTS, or a local folder, returned as it is):
    configs, tokenizers and the fp16 safetensors only; of a ControlNet (a key of CONTROLNETS): config.json and
    its weights (diffusion_pytorch_model[.variant].safetensors)."""
    if Path(name).is_dir():
        return Path(name)
    if name not in CHECKPOINTS and name not in CONTROLNETS:
        raise ValueError(f"unknown checkpoint {name!r}; known: {', '.join(CHECKPOINTS)}, ControlNets: "
                         f"{', '.join(CONTROLNETS)} (or a local folder)")
    from huggingface_hub import snapshot_download  # optional: only downloads need it

    spec = CHECKPOINTS.get(name) or CONTROLNETS[name]
    repo = spec["refiner"] if refiner else spec["repo"]
    variant = f".{spec['variant']}" if spec["variant"] else ""
    patterns = (CONFIGS + _weights(spec["variant"]) if name in CHECKPOINTS else
                ["config.json", f"diffusion_pytorch_model{variant}.safetensors"])
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, token=token))
    except Exception as e:
        gated = (f" {repo} is gated: accept its licence on https://huggingface.co/{repo} and log in "
                 f"(huggingface_hub.login())." if spec.get("gated") else "")
        raise RuntimeError(f"could not download {repo}: {e}.{gated}") from e


def _diffusers(folder: Path, dtype, device, variant, skip, controlnet: Path | None = None, controlnet_variant=None):
    from diffusers import ControlNetModel, DDIMScheduler, DiffusionPipeline, StableDiffusionControlNetPipeline

    index = json.loads((Path(folder) / "model_index.json").read_text())
    absent = {k for k, v in index.items() if isinstance(v, list) and v[0] is None}  # e.g. SD3 saved without T5
    absent |= {name for k in skip for name in (k, k.replace("text_encoder", "tokenizer"))}
    steer = {} if controlnet is None else \
        {"controlnet": ControlNetModel.from_pretrained(controlnet, dtype=dtype, variant=controlnet_variant)}
    kind = StableDiffusionControlNetPipeline if steer else DiffusionPipeline
    pipe = kind.from_pretrained(folder, dtype=dtype, variant=variant, **dict.fromkeys(absent), **steer)
    if type(pipe.scheduler).__name__ not in SAMPLERS and not type(pipe).__name__.startswith("StableDiffusion3"):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)  # sdlearn's FALLBACK
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _free(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _controlnet_spec(name: str, controlnet: str | None, control, refiner) -> dict:
    """side_by_side's ControlNet arguments checked: CONTROLNETS[controlnet] ({} for a local folder or none)."""
    if controlnet is not None and not Path(controlnet).is_dir() and controlnet not in CONTROLNETS:
        raise ValueError(f"unknown ControlNet {controlnet!r}; known: {', '.join(CONTROLNETS)} (or a local diffusers "
                         f"ControlNetModel folder)")
    cn_spec = CONTROLNETS.get(controlnet, {})
    if cn_spec and name in CHECKPOINTS and cn_spec["base"] != name:
        raise ValueError(f"the ControlNet {controlnet!r} steers {cn_spec['base']!r}, not {name!r}")
    if (controlnet is None) != (control is None) or (controlnet is not None and refiner):
        raise ValueError("controlnet= and control= go together, and without refiner=; got controlnet="
                         f"{controlnet!r}, control={'None' if control is None else 'a tensor'}, refiner={refiner!r}")
    return cn_spec


def side_by_side(name: str, prompt: str, steps: int = 30, guidance_scale: float = 7.0, seed: int = 0,
                 device: str = "cuda", dtype: torch.dtype = torch.float16, skip: tuple[str, ...] = (),
                 refiner: bool | str = False, size: int | None = None, controlnet: str | None = None,
                 control: torch.Tensor | None = None, control_scale: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(sdlearn's image, diffusers' image, {"sdlearn": s, "diffusers": s}): the checkpoint `name` (see download)
    loaded into sdlearn and into diffusers, the same prompt from the same latents. Images [1, 3, H, W] in [0, 1].
    refiner: SDXL's base hands over to its refiner at 0.8 (True: the published one; or a folder).
    controlnet: a ControlNet steering the checkpoint (a key of CONTROLNETS, or a local diffusers ControlNetModel
    folder), with control the map it reads, [1, 3, H, W] in [0, 1] at the checkpoint's image size (a canny
    ControlNet: white edges on black) and control_scale its residuals' weight (diffusers' StableDiffusionControlNet-
    Pipeline with image=control, controlnet_conditioning_scale=control_scale)."""
    spec, cn_spec = CHECKPOINTS.get(name, {}), _controlnet_spec(name, controlnet, control, refiner)
    folder, variant = download(name), spec.get("variant")
    refiner_folder = download(name, refiner=True) if refiner is True else (Path(refiner) if refiner else None)
    cn_folder, cn_variant = (download(controlnet), cn_spec.get("variant")) if controlnet else (None, None)
    # load reads a ControlNet folder's weights in the checkpoint's variant; in another, it takes the weights file
    # (its config then comes from the base denoiser, as for any single file)
    steer = cn_folder if cn_variant == variant or cn_folder is None else _weights_file(cn_folder, cn_variant)[0]
    ours = load(folder, refiner=refiner_folder, device=device, dtype=dtype, variant=variant, skip=skip,
                controlnet=steer)
    base = ours.base if refiner_folder else ours
    z = base.noise(1, seed)                                                          # [1, C, h, w] float32
    size = size or base.image_size
    start = time.perf_counter()
    controls = {} if control is None else dict(control=control, control_scale=control_scale)
    kw = dict(steps=steps, guidance_scale=guidance_scale, progress=False, **controls)
    mine = ((ours.generate([prompt], seed=seed, **kw) if refiner_folder else base.generate([prompt], latents=z, **kw))
            + 1) / 2
    seconds = {"sdlearn": time.perf_counter() - start}
    del ours, base
    _free(device)

    theirs = _diffusers(folder, dtype, device, variant, skip, cn_folder, cn_variant)
    common = dict(num_inference_steps=steps, guidance_scale=guidance_scale, height=size, width=size)
    if control is not None:
        common.update(image=control, controlnet_conditioning_scale=control_scale)
    start = time.perf_counter()
    with torch.no_grad():
        if refiner_folder:
            latents = theirs([prompt], latents=z.to(device, dtype), denoising_end=0.8, output_type="latent",
                             **common).images
            seconds["diffusers"] = time.perf_counter() - start
            del theirs
            _free(device)
            theirs = _diffusers(refiner_folder, dtype, device, variant, ())
            start = time.perf_counter()
            image = theirs([prompt], image=latents, denoising_start=0.8, output_type="pt",
                           num_inference_steps=steps, guidance_scale=guidance_scale).images
        else:
            image = theirs([prompt], latents=z.to(device, dtype), output_type="pt", **common).images
    seconds["diffusers"] = seconds.get("diffusers", 0.0) + time.perf_counter() - start
    del theirs
    _free(device)
    return mine.cpu(), image.float().cpu(), seconds
