"""Inputs that declare no base are compared by their weights: fine-tunes of one base stay
close, unrelated models get one warning (SPEC §5: averaging only makes sense for fine-tunes
of the same base)."""
import pytest
import torch
from safetensors.torch import save_file

import fastsoup as fs


def _model(seed, scale=1.0, like=None):
    g = torch.Generator().manual_seed(seed)
    if like is not None:
        return {k: v + scale * torch.randn(v.shape, generator=g).to(v.dtype) for k, v in like.items()}
    return {"down.weight": torch.randn(96, 64, generator=g), "up.weight": torch.randn(64, 96, generator=g),
            "bias": torch.randn(64, generator=g), "norm.weight": torch.ones(64, dtype=torch.bfloat16)}


def _merge(tmp_path, states):
    paths = []
    for i, st in enumerate(states):
        p = str(tmp_path / f"m{i}.safetensors")
        save_file(st, p)
        paths.append(p)
    return fs.merge(paths, str(tmp_path / "soup.safetensors"), quiet=True)


def _distance_warnings(report):
    return [w for w in report.warnings if "do not look like fine-tunes" in w]


def test_fine_tunes_of_one_base_merge_without_a_warning(tmp_path):
    base = _model(0)
    report = _merge(tmp_path, [_model(1, 0.05, base), _model(2, 0.05, base), base])
    assert _distance_warnings(report) == []


def test_unrelated_models_get_one_warning_naming_the_pair(tmp_path):
    base = _model(0)
    report = _merge(tmp_path, [base, _model(1, 0.05, base), _model(7)])
    found = _distance_warnings(report)
    assert len(found) == 1 and ("inputs 1 and 3" in found[0] or "inputs 2 and 3" in found[0])


@pytest.mark.parametrize("n_big", [5, 30])  # 30: the first candidates hold too few
def test_the_probe_reads_the_largest_matrices_every_input_holds(tmp_path, monkeypatch, n_big):
    """The distance probe takes the largest matrices (ties by name) that every input holds,
    also when the largest of all are missing from an input and many sizes tie."""
    from fastsoup.merge import fingerprint, formats, plan as planning

    states = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        st = {f"m{j:03d}.weight": torch.randn(4, 4 + j % 3, generator=g) for j in range(60)}
        st.update({f"big{j:02d}.weight": torch.randn(8, 8, generator=g) for j in range(n_big)})
        if i == 2:  # the largest: missing here, so never probed
            for j in range(n_big):
                del st[f"big{j:02d}.weight"]
        states.append(st)
    paths = []
    for i, st in enumerate(states):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file(st, paths[-1])
    plan = planning.build_plan([formats.resolve(p) for p in paths], keys="union")
    probed = []

    def probe(wf, key, count):
        probed.append(key)
        return torch.ones(count).numpy()

    monkeypatch.setattr(fingerprint, "_probe", probe)
    fingerprint.distance_warning(plan)
    held = [t for t in plan.tensors() if len(t.sources) == 3]
    expect = sorted(held, key=lambda t: (-t.numel, t.qualified))[:fingerprint.PROBE_TENSORS]
    assert probed == [t.key for t in expect for _ in range(3)]
    assert all(k.startswith("m") and int(k[1:4]) % 3 == 2 for k in probed)  # the 4×6 ones
