"""Options and inputs that used to slip through: union of single files, symlinked side
files, overflowing shapes, surprising weight semantics, and errors that must be
MergeErrors (clear message, no traceback)."""
import os

import pytest
import torch
from safetensors.torch import load_file

import fastsoup as fs
from fastsoup.merge import MergeError, cli
from fastsoup.merge.soup import _soup_options
from fastsoup.io.safetensors import HeaderError, parse_header
from tests.helpers import make_state, raw_safetensors, save_file_layout, save_sharded


def parse(blob):
    return parse_header(blob, len(blob), path="f.safetensors")


def test_union_of_single_files_with_different_names_is_one_file(tmp_path):
    a = save_file_layout(str(tmp_path / "x.safetensors"), {"p": torch.ones(3), "q": torch.ones(2)})
    b = save_file_layout(str(tmp_path / "y.safetensors"), {"p": torch.zeros(3), "r": torch.ones(4)})
    out = str(tmp_path / "soup.safetensors")
    report = fs.merge([a, b], out, keys="union", quiet=True, hash="none")
    got = load_file(out)
    assert sorted(got) == ["p", "q", "r"] and os.path.isfile(out)
    assert torch.equal(got["p"], torch.full((3,), 0.5)) and len(report.files) == 1


def test_side_files_follow_symlinks_into_a_hub_snapshots_blob_store(tmp_path):
    """A Hugging Face hub snapshot is made of links into its repository's ``blobs``
    folder: those are followed (copied as files); links to directories are not."""
    repo = tmp_path / "models--org--m0"
    store = repo / "blobs"
    store.mkdir(parents=True)
    (store / "cfg").write_text('{"hidden": 4}')
    (store / "dir").mkdir()
    (store / "dir" / "inner.txt").write_text("x")
    snap = repo / "snapshots" / "abc123"
    roots = [save_sharded(str(snap), make_state(0), 2),
             save_sharded(str(tmp_path / "m1"), make_state(1), 2)]
    os.symlink("../../blobs/cfg", os.path.join(roots[0], "config.json"))
    os.symlink("../../blobs/dir", os.path.join(roots[0], "linked_dir"))
    out = tmp_path / "out"
    report = fs.merge(roots, out, quiet=True, hash="none")
    assert (out / "config.json").read_text() == '{"hidden": 4}'
    assert not os.path.islink(out / "config.json")
    assert not (out / "linked_dir").exists()
    assert any("linked_dir" in w for w in report.warnings)
    assert "config.json" in report.copied_files


@pytest.mark.parametrize("shape", [[0, 2**70], [2**40, 2**40], [2**63]])
def test_shapes_overflowing_int64_are_hostile(shape):
    blob = raw_safetensors({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    with pytest.raises(HeaderError, match="overflows"):
        parse(blob)


def test_lone_surrogate_keys_are_rejected():
    text = b'{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    with pytest.raises(HeaderError, match="surrogate"):
        parse(raw_safetensors(None, b"\0" * 4, raw_header=text))
    text = b'{"__metadata__":{"k":"\\udfff"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    with pytest.raises(HeaderError, match="surrogate"):
        parse(raw_safetensors(None, b"\0" * 4, raw_header=text))


def test_union_without_normalize_warns(tmp_path, capsys):
    a = save_file_layout(str(tmp_path / "x.safetensors"), {"p": torch.ones(3), "q": torch.ones(2)})
    b = save_file_layout(str(tmp_path / "y.safetensors"), {"p": torch.zeros(3)})
    report = fs.merge([a, b], tmp_path / "s.safetensors", keys="union", normalize=False,
                      weights=[0.5, 0.5], quiet=True, hash="none")
    assert any("keys='union'" in w for w in report.warnings)  # named as in Python
    code = cli.main([a, b, "-o", str(tmp_path / "t.safetensors"), "--keys", "union",
                     "--no-normalize", "--weights", "0.5,0.5", "--hash", "none"])
    assert code == 0 and "warning: --keys union" in capsys.readouterr().err
    code = cli.main([a, b, "-o", str(tmp_path / "u.safetensors"), "--keys", "union",
                     "--no-normalize", "--weights", "0.5,0.5", "-q"])
    assert code == 0 and capsys.readouterr().err == ""  # -q silences warnings


def test_base_with_normalize_is_refused(tmp_path):
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(i)) for i in range(3)]
    with pytest.raises(MergeError, match="--normalize with --base"):
        fs.merge(paths[:2], tmp_path / "s.safetensors", base=paths[2], normalize=True,
                 quiet=True, hash="none")
    assert not os.path.exists(tmp_path / "s.safetensors")


def test_bad_options_are_merge_errors(tmp_path, capsys):
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(i)) for i in range(2)]
    out = tmp_path / "s.safetensors"
    with pytest.raises(MergeError, match="size"):
        fs.merge(paths, out, memory="1e400", quiet=True)
    with pytest.raises(MergeError, match="unknown output dtype"):
        fs.merge(paths, out, dtype="fp8", quiet=True)
    with pytest.raises(MergeError, match="dtype"):
        fs.merge(paths, out, dtype=torch.float16, quiet=True)
    code = cli.main([*paths, "-o", str(out), "--memory", "1e400", "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and "cannot parse size" in err
    with pytest.raises(MergeError, match="unknown output dtype 'F8'"):
        _soup_options({"dtype": "F8", "constituents": [{}]}, {})
    assert not out.exists()


def test_default_budget_is_small_on_the_cpu_and_larger_for_a_device():
    from fastsoup.merge.options import (DEFAULT_DEVICE_MEMORY, DEFAULT_MEMORY, MergeOptions)

    assert MergeOptions.validate().memory == DEFAULT_MEMORY == 32 * 2**20
    assert MergeOptions.validate(device="torch:cpu").memory == DEFAULT_DEVICE_MEMORY == 256 * 2**20
    assert MergeOptions.validate(device="torch:cpu", memory="8MiB").memory == 8 * 2**20
