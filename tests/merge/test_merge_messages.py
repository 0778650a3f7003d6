"""Bad input gets one clear message per cause, named as the caller spells options; the
command line follows Unix conventions (issue 10)."""
import json
import os

import pytest
import torch

import fastsoup as fs
from fastsoup.merge import MergeError, PlanError, cli, soup_add
from tests.helpers import make_state, save_diffusers, save_file_layout

SPEC = {f"block.{i}.weight": ((4, 4), torch.float32) for i in range(40)}


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def soup_with_manifest(tmp_path, edit):
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(i)) for i in range(2)]
    soup = tmp_path / "soup"
    os.makedirs(soup)
    # a directory "soup" with only a sidecar: the manifest read is the sidecar's
    fs.merge(paths, tmp_path / "s.safetensors", quiet=True, hash="none")
    m = json.loads((tmp_path / "s.fastsoup.json").read_text())
    edit(m)
    text = json.dumps(m).replace('"DEEP"', "[" * 100000 + "]" * 100000)
    (tmp_path / "s.fastsoup.json").write_text(text)
    # the embedded manifest wins; drop it so the edited sidecar is what is read
    from safetensors.torch import load_file, save_file
    save_file(load_file(str(tmp_path / "s.safetensors")), str(tmp_path / "s.safetensors"))
    return tmp_path / "s.safetensors", paths


def _set(path, value):
    def edit(m):
        obj = m
        for p in path[:-1]:
            obj = obj[p]
        obj[path[-1]] = value
    return edit


def _delete(path):
    def edit(m):
        obj = m
        for p in path[:-1]:
            obj = obj[p]
        del obj[path[-1]]
    return edit


def _deep(m):
    m["constituents"][0]["weight"] = "DEEP"  # replaced by 100000 nested lists


MANIFESTS = {
    "weight abc": (_set(["constituents", 0, "weight"], "abc"), r"constituents\[0\]\.weight: expected a finite number"),
    "weight null": (_set(["constituents", 1, "weight"], None), r"constituents\[1\]\.weight: expected a finite number"),
    "constituents {}": (_set(["constituents"], {}), r"constituents: expected a non-empty list"),
    "constituents []": (_set(["constituents"], []), r"constituents: expected a non-empty list"),
    "constituents str": (_set(["constituents"], "x"), r"constituents: expected a non-empty list"),
    "missing path": (_delete(["constituents", 0, "path"]), r"constituents\[0\]\.path: missing"),
    "missing size": (_delete(["constituents", 1, "size_bytes"]), r"constituents\[1\]\.size_bytes: missing"),
    "base x": (_set(["base"], "x"), r"base: expected an object"),
    "file name ..": (_set(["constituents", 0, "files", 0, "name"], "../../etc/passwd"),
                     r"constituents\[0\]\.files\[0\]\.name: expected a relative file name"),
    "sha not hex": (_set(["constituents", 0, "files", 0, "sha256"], "zz"), r"files\[0\]\.sha256"),
    "deep nesting": (_deep, r"cannot read the soup manifest \(nested too deeply\)"),
}


@pytest.mark.parametrize("case", sorted(MANIFESTS))
def test_malformed_manifests_are_a_merge_error_with_the_fields_path(tmp_path, case):
    edit, message = MANIFESTS[case]
    soup, paths = soup_with_manifest(tmp_path, edit)
    with pytest.raises(MergeError, match=message):
        soup_add(soup, paths[0], tmp_path / "o.safetensors", quiet=True)


def test_weights_overflowing_fp32_and_mappings_not_keyed_by_input(tmp_path):
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(i)) for i in range(2)]
    out = tmp_path / "o.safetensors"
    with pytest.raises(PlanError, match="overflows the fp32 accumulator.*accumulate='fp64'"):
        fs.merge(paths, out, [1e39, 1], normalize=False, quiet=True)
    rep = fs.merge(paths, out, [1e39, -1e39 + 1], normalize=False, accumulate="fp64",
                   quiet=True, hash="none")
    assert rep.coefficients[0] == 1e39
    with pytest.raises(MergeError, match="keyed by the inputs' paths, got the key 0"):
        fs.merge(paths, tmp_path / "p.safetensors", weights={0: 1, 1: 1}, quiet=True)
    rep = fs.merge(paths, tmp_path / "q.safetensors", weights={paths[1]: 3, paths[0]: 1},
                   quiet=True, hash="none")
    assert rep.weights == [1.0, 3.0]


def test_a_single_path_is_not_a_list_of_inputs(tmp_path):
    a = save_file_layout(str(tmp_path / "a.safetensors"), make_state(0))
    with pytest.raises(MergeError, match="inputs must be a list of paths.*fs.merge\\(\\["):
        fs.merge(a, tmp_path / "o.safetensors")


def test_overwrite_is_named_as_the_caller_sets_it(tmp_path, capsys):
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(i)) for i in range(2)]
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"x")
    with pytest.raises(MergeError, match=r"pass overwrite=True to replace it"):
        fs.merge(paths, out, quiet=True)
    code, _, err = run([*paths, "-o", out], capsys)
    assert code == 1 and "pass --overwrite to replace it" in err


def test_one_line_per_cause(tmp_path, capsys):
    a = save_file_layout(str(tmp_path / "a.safetensors"), make_state(0, SPEC))
    b = save_file_layout(str(tmp_path / "b.safetensors"), make_state(1, SPEC))
    code, _, err = run([a, b, "--weights", "1,-1", "-o", tmp_path / "o.safetensors"], capsys)
    assert code == 1 and err.count("weights sum to 0") == 1 and "[40 tensors:" in err
    assert "--no-normalize" in err
    # bf16 + fp32: one warning, silenced by -q, in full in --json
    # a bf16 fine-tune of a (unrelated weights would add the base-distance warning)
    tuned = {k: (v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(2)))
             .to(torch.bfloat16) for k, v in make_state(0, SPEC).items()}
    c = save_file_layout(str(tmp_path / "c.safetensors"), tuned)
    code, _, err = run([a, c, "-o", tmp_path / "d.safetensors", "--hash", "none"], capsys)
    assert code == 0 and err.count("dtypes differ") == 1 and "--dtype bf16" in err
    code, _, err = run([a, c, "-o", tmp_path / "e.safetensors", "-q"], capsys)
    assert code == 0 and err == ""
    code, out, err = run([a, c, "-o", tmp_path / "f.safetensors", "--json"], capsys)
    rep = json.loads(out)
    assert code == 0 and err == "" and len(rep["warnings"]) == 1
    assert rep["diagnostics"][0]["count"] == 40 and len(rep["diagnostics"][0]["keys"]) == 40


def test_a_pipeline_with_a_single_model_suggests_the_component(tmp_path, capsys):
    root = save_diffusers(str(tmp_path / "pipe0"), {"unet": make_state(0), "vae": make_state(3)})
    unet = save_file_layout(str(tmp_path / "unet.safetensors"), make_state(1))
    code, out, err = run([root, unet, "-o", tmp_path / "o", "--json"], capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("  - ")]
    assert code == 1 and len(lines) == 2  # missing from input 2; missing from input 1
    assert f"did you mean {os.path.join(root, 'unet')}?" in err
    assert len(json.loads(out)["problems"]) == 3 * len(make_state(0))


def test_two_architectures_are_a_few_lines(tmp_path, capsys):
    a = save_file_layout(str(tmp_path / "a.safetensors"), make_state(0, SPEC))
    other = {f"layer{i}.w": ((3,), torch.float32) for i in range(30)}
    other.update({k: ((5, 4), torch.float32) for k in list(SPEC)[:10]})
    b = save_file_layout(str(tmp_path / "b.safetensors"), make_state(1, other))
    code, _, err = run([a, b, "-o", tmp_path / "o.safetensors"], capsys)
    assert code == 1 and len([ln for ln in err.splitlines() if ln.startswith("  - ")]) == 3
    assert "different architectures?" in err


def test_help_version_and_space_separated_weights(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert info.value.code == 0 and "``" not in text and ":func:" not in text
    for usage in ("fastsoup-merge INPUT INPUT...", "fastsoup-merge add SOUP NEW",
                  "fastsoup-merge remove SOUP OLD", "examples:"):
        assert usage in text
    for argv, main in ((["--version"], cli.main), (["--version"], __import__("fastsoup.cli").cli.main)):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0 and "0." in capsys.readouterr().out
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(i)) for i in range(2)]
    code, out, _ = run(["--weights", "0.7", "0.3", *paths, "-o", tmp_path / "o.safetensors",
                        "--json"], capsys)
    assert code == 0 and json.loads(out)["weights"] == [0.7, 0.3]
    code, out, _ = run([*paths, "--weights", "3", "1", "-o", tmp_path / "p.safetensors", "--json",
                        "--metadata", "modelspec.title=Soup"], capsys)
    assert code == 0 and json.loads(out)["coefficients"] == [0.75, 0.25]
    from safetensors import safe_open
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.title"] == "Soup"

