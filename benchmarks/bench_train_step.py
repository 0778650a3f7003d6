"""A whole training step: what the fused loss changes end to end, honestly.

Forward + loss + backward of a diffusers ``UNet2DConditionModel`` with random weights
and the loss block written the diffusers way vs fastsoup's ``agc_loss`` (top-k
exclusion) and plain ``per_sample_mse``. On a GPU (``full``): the Stable Diffusion 1.5
UNet configuration in bf16, batch 8 of 64×64 latents, 77×768 text states. On CPU: a tiny
UNet of the same family. Needs diffusers (skipped without it).

    pytest benchmarks/bench_train_step.py --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F

import fastsoup as fs
from harness import DEVICE, SIZE, measure

diffusers = pytest.importorskip("diffusers")

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
TINY = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=4,
            norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))

if SIZE == "full":
    CONFIG, BATCH, LATENT, TOKENS, DTYPE = SD15, 8, 64, 77, torch.bfloat16
else:
    CONFIG, BATCH, LATENT, TOKENS, DTYPE = TINY, 2 if SIZE == "smoke" else 4, 16, 8, torch.float32


def diffusers_loss(model_pred, target):
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


# one sample of the batch excluded at every size (a fraction under 1/BATCH excludes none)
EXCLUDE = 1 / BATCH


def fastsoup_agc(model_pred, target):
    return fs.agc_loss(model_pred, target, exclude_fraction=EXCLUDE)[0]


def fastsoup_mse(model_pred, target):
    return fs.per_sample_mse(model_pred, target).mean()


LOSSES = {"eager": diffusers_loss, "fastsoup-mse": fastsoup_mse, "fastsoup-agc": fastsoup_agc}
LABELS = {  # what each row's loss block is; report.py prints it next to the impl name
    "eager": "diffusers' `F.mse_loss(pred.float(), target.float())`",
    "fastsoup-mse": "`fs.per_sample_mse(pred, target).mean()`",
    "fastsoup-agc": f"`fs.agc_loss(pred, target, exclude_fraction={EXCLUDE:g})` (top-k exclusion: "
                    f"1 of {BATCH} samples)",
}

_model = {}


def _unet():
    if "m" not in _model:
        torch.manual_seed(0)
        unet = diffusers.UNet2DConditionModel(**CONFIG).to(DEVICE, DTYPE)
        unet.train()
        _model["m"] = unet
    return _model["m"]


@pytest.mark.parametrize("impl", list(LOSSES))
def test_unet_training_step(benchmark, impl):
    benchmark.group = f"train step UNet2DCondition {'sd15' if CONFIG is SD15 else 'tiny'} b{BATCH}"
    unet = _unet()
    g = torch.Generator(device="cpu").manual_seed(1)
    latents = torch.randn(BATCH, 4, LATENT, LATENT, generator=g).to(DEVICE, DTYPE)
    noise = torch.randn(BATCH, 4, LATENT, LATENT, generator=g).to(DEVICE, DTYPE)
    text = torch.randn(BATCH, TOKENS, CONFIG["cross_attention_dim"], generator=g).to(DEVICE, DTYPE)
    timesteps = torch.randint(0, 1000, (BATCH,), generator=g).to(DEVICE)
    loss_fn = LOSSES[impl]

    def step():
        unet.zero_grad(set_to_none=True)
        pred = unet(latents + noise, timesteps, encoder_hidden_states=text).sample
        loss_fn(pred, noise).backward()

    rounds = {"full": 10, "small": 3, "smoke": 1}[SIZE]
    measure(benchmark, step, rounds=rounds, warmup=2, impl=impl,
            role="baseline" if impl == "eager" else "", label=LABELS[impl],
            params=sum(p.numel() for p in unet.parameters()), batch=BATCH)
