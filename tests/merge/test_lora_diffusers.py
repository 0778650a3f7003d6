"""A LoRA soup loads with diffusers' LoRA loader and gives the output of the adapters' mean
delta (issue #14's acceptance check): three adapters of ranks 2, 3 and 4 on the attention
projections of a tiny UNet2DConditionModel are souped by fastsoup-merge (an exact rank-9
adapter), loaded with ``UNet2DConditionModel.load_lora_adapter`` (what a pipeline's
``load_lora_weights`` calls for its UNet), and compared with the base UNet whose weights
carry ``mean_i B_i A_i``."""
import os

import pytest
import torch

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")
from safetensors.torch import load_file, save_file  # noqa: E402

import fastsoup as fs  # noqa: E402

CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
              block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
              attention_head_dim=8, norm_num_groups=8)


def test_lora_soup_loads_in_diffusers_and_gives_the_mean_delta(tmp_path):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**CONFIG).eval()
    targets = [n for n, _ in unet.named_modules() if n.endswith(("attn1.to_q", "attn2.to_k"))]
    assert targets
    adapters, paths = [], []
    for i, rank in enumerate((2, 3, 4)):
        state = {}
        for name in targets:
            layer = unet.get_submodule(name)
            state[f"unet.{name}.lora_A.weight"] = torch.randn(rank, layer.in_features) * 0.1
            state[f"unet.{name}.lora_B.weight"] = torch.randn(layer.out_features, rank) * 0.1
        adapters.append(state)
        paths.append(str(tmp_path / f"lora{i}.safetensors"))
        save_file(state, paths[-1])
    soup_path = str(tmp_path / "soup.safetensors")
    fs.merge(paths, soup_path, quiet=True)
    soup = load_file(soup_path)
    assert soup[f"unet.{targets[0]}.lora_A.weight"].shape[0] == 2 + 3 + 4   # exact: ranks add

    expected = diffusers.UNet2DConditionModel(**CONFIG).eval()
    expected.load_state_dict(unet.state_dict())
    with torch.no_grad():
        for name in targets:
            delta = sum(a[f"unet.{name}.lora_B.weight"] @ a[f"unet.{name}.lora_A.weight"]
                        for a in adapters) / len(adapters)
            expected.get_submodule(name).weight += delta
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32)
    unet.load_lora_adapter(soup, prefix="unet", adapter_name="soup")
    with torch.no_grad():
        got, want = unet(x, t, cond).sample, expected(x, t, cond).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
