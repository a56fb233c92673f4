"""Scan: folders and glob patterns expanded by the program, on real (tiny) safetensors files written here."""

from __future__ import annotations

import os

import pytest

from merger_core.manifest import scan as scan_mod
from merger_core.errors import ScanError
from merger_core.manifest.scan import BROKEN_LINK_REASON, PICKLE_REASON, ScanResult, common_folder, escape, scan, scan_folder


def st(path) -> str:
    """Write a tiny real safetensors file (and its folders); returns its absolute path."""
    import torch
    from safetensors.torch import save_file

    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({"w": torch.zeros(2, dtype=torch.float16)}, path)
    return path


def blob(path, data=b"\x80\x02not a safetensors file") -> str:
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.fixture
def tree(tmp_path):
    """models/
         pony_v6.safetensors, ponyDiffusionV6XL.safetensors, Pony_XL_v6_final.SAFETENSORS, illustrious.safetensors,
         old.ckpt, old2.pt, old3.bin, old4.pth, notes.txt, .hidden.safetensors
         sdxl/noob_v6.safetensors, sdxl/deep/pony_v6_deep.safetensors, .cache/cached.safetensors
       other/anime.safetensors
    """
    m = tmp_path / "models"
    files = {
        "pony_v6": st(m / "pony_v6.safetensors"),
        "ponyDiff": st(m / "ponyDiffusionV6XL.safetensors"),
        "ponyUpper": st(m / "Pony_XL_v6_final.SAFETENSORS"),
        "illu": st(m / "illustrious.safetensors"),
        "hidden": st(m / ".hidden.safetensors"),
        "noob": st(m / "sdxl" / "noob_v6.safetensors"),
        "deep": st(m / "sdxl" / "deep" / "pony_v6_deep.safetensors"),
        "cached": st(m / ".cache" / "cached.safetensors"),
        "anime": st(tmp_path / "other" / "anime.safetensors"),
    }
    for name in ("old.ckpt", "old2.pt", "old3.bin", "old4.pth"):
        files[name] = blob(m / name)
    files["txt"] = blob(m / "notes.txt", b"hello")
    return tmp_path, files


def rel(result: ScanResult, root) -> list:
    return [os.path.relpath(p, root).replace(os.sep, "/") for p in result.matches]


# ---------------------------------------------------------------------------------------------------------------
# glob forms


def test_folder_means_safetensors_directly_inside(tree):
    root, f = tree
    r = scan([str(root / "models")])
    assert rel(r, root) == [
        "models/Pony_XL_v6_final.SAFETENSORS",
        "models/illustrious.safetensors",
        "models/ponyDiffusionV6XL.safetensors",
        "models/pony_v6.safetensors",
    ]
    assert all(os.path.isabs(p) for p in r.matches)
    assert r.matches == sorted(r.matches)
    assert r.patterns == [str(root / "models")]


def test_star_safetensors_relative_to_cwd(tree, monkeypatch):
    root, f = tree
    monkeypatch.chdir(root / "models")
    r = scan(["*.safetensors"])
    assert rel(r, root) == [
        "models/Pony_XL_v6_final.SAFETENSORS",
        "models/illustrious.safetensors",
        "models/ponyDiffusionV6XL.safetensors",
        "models/pony_v6.safetensors",
    ]
    # the cwd keyword gives the same result without changing folder
    monkeypatch.chdir(root)
    assert scan(["*.safetensors"], cwd=root / "models").matches == r.matches


def test_prefix_pattern_ignores_case(tree):
    root, f = tree
    r = scan([str(root / "models" / "pony*.safetensors")])
    assert rel(r, root) == [
        "models/Pony_XL_v6_final.SAFETENSORS",
        "models/ponyDiffusionV6XL.safetensors",
        "models/pony_v6.safetensors",
    ]
    r2 = scan([str(root / "models" / "pony*.safetensors")], case_sensitive=True)
    assert rel(r2, root) == ["models/ponyDiffusionV6XL.safetensors", "models/pony_v6.safetensors"]


def test_recursive_double_star(tree):
    root, f = tree
    r = scan([str(root / "models" / "**" / "*.safetensors")])
    # ** matches zero folders (top level) and any depth; hidden files and folders are not entered
    assert rel(r, root) == [
        "models/Pony_XL_v6_final.SAFETENSORS",
        "models/illustrious.safetensors",
        "models/ponyDiffusionV6XL.safetensors",
        "models/pony_v6.safetensors",
        "models/sdxl/deep/pony_v6_deep.safetensors",
        "models/sdxl/noob_v6.safetensors",
    ]


def test_recursive_relative_pattern(tree, monkeypatch):
    root, f = tree
    monkeypatch.chdir(root)
    r = scan(["**/*.safetensors"])
    assert "other/anime.safetensors" in rel(r, root)
    assert "models/sdxl/deep/pony_v6_deep.safetensors" in rel(r, root)
    assert len(r.matches) == 7


def test_infix_pattern(tree):
    root, f = tree
    r = scan([str(root / "models" / "**" / "*pony*v6*.safetensors")])
    assert rel(r, root) == [
        "models/Pony_XL_v6_final.SAFETENSORS",
        "models/ponyDiffusionV6XL.safetensors",
        "models/pony_v6.safetensors",
        "models/sdxl/deep/pony_v6_deep.safetensors",
    ]


def test_wildcard_in_folder_part_and_question_mark_and_sets(tree):
    root, f = tree
    assert rel(scan([str(root / "*" / "anime.safetensors")]), root) == ["other/anime.safetensors"]
    assert rel(scan([str(root / "models" / "sd?l" / "*.safetensors")]), root) == ["models/sdxl/noob_v6.safetensors"]
    assert rel(scan([str(root / "models" / "[ip]*.safetensors")], case_sensitive=True), root) == [
        "models/illustrious.safetensors",
        "models/ponyDiffusionV6XL.safetensors",
        "models/pony_v6.safetensors",
    ]
    assert rel(scan([str(root / "models" / "[!p]*.safetensors")]), root) == ["models/illustrious.safetensors"]


def test_hidden_names_need_a_dot_pattern(tree):
    root, f = tree
    r = scan([str(root / "models" / ".*.safetensors")])
    assert rel(r, root) == ["models/.hidden.safetensors"]


def test_several_patterns_and_folders_in_one_call(tree):
    root, f = tree
    r = scan([str(root / "other"), str(root / "models" / "pony_*.safetensors"), str(root / "models" / "sdxl")])
    assert rel(r, root) == [
        "models/Pony_XL_v6_final.SAFETENSORS",
        "models/pony_v6.safetensors",
        "models/sdxl/noob_v6.safetensors",
        "other/anime.safetensors",
    ]
    # overlapping arguments give each file once
    r2 = scan([str(root / "models"), str(root / "models" / "*.safetensors"), f["pony_v6"]])
    assert r2.matches == scan([str(root / "models")]).matches
    assert r2.default_manifest_dir == str(root / "models")


def test_several_roots_default_manifest_dir_is_deepest_common_folder(tree):
    root, f = tree
    r = scan([str(root / "models" / "sdxl" / "**/"), str(root / "other")])
    assert r.default_manifest_dir == str(root)
    r = scan([str(root / "models" / "sdxl" / "**/")])
    assert rel(r, root) == ["models/sdxl/deep/pony_v6_deep.safetensors", "models/sdxl/noob_v6.safetensors"]
    assert r.default_manifest_dir == str(root / "models" / "sdxl")
    one = scan([f["deep"]])
    assert one.default_manifest_dir == os.path.dirname(f["deep"])
    assert one.default_manifest_path == os.path.join(os.path.dirname(f["deep"]), "manifest.json")


def test_common_folder_rule():
    a = os.path.abspath(os.path.join("x", "a", "m.safetensors"))
    b = os.path.abspath(os.path.join("x", "a", "b", "c", "n.safetensors"))
    assert common_folder([a, b]) == os.path.dirname(a)
    assert common_folder([b]) == os.path.dirname(b)
    assert common_folder([]) is None


def test_folder_recursion_forms(tree):
    root, f = tree
    expected = [
        "models/Pony_XL_v6_final.SAFETENSORS",
        "models/illustrious.safetensors",
        "models/ponyDiffusionV6XL.safetensors",
        "models/pony_v6.safetensors",
        "models/sdxl/deep/pony_v6_deep.safetensors",
        "models/sdxl/noob_v6.safetensors",
    ]
    assert rel(scan([str(root / "models") + "/**/"]), root) == expected
    assert rel(scan([str(root / "models") + "/**"]), root) == expected
    assert rel(scan([str(root / "models")], recursive=True), root) == expected
    assert rel(scan_folder(root / "models", recursive=True), root) == expected
    assert rel(scan_folder(root / "models", "**/*.safetensors"), root) == expected
    assert rel(scan_folder(root / "models", "**/pony*v6*.safetensors"), root) == [
        "models/Pony_XL_v6_final.SAFETENSORS",
        "models/ponyDiffusionV6XL.safetensors",
        "models/pony_v6.safetensors",
        "models/sdxl/deep/pony_v6_deep.safetensors",
    ]


def test_file_filter_for_folder_arguments(tree):
    root, f = tree
    r = scan([str(root / "models"), str(root / "models" / "sdxl")], file_filter="*v6*.safetensors")
    assert rel(r, root) == [
        "models/Pony_XL_v6_final.SAFETENSORS",
        "models/ponyDiffusionV6XL.safetensors",
        "models/pony_v6.safetensors",
        "models/sdxl/noob_v6.safetensors",
    ]


def test_home_folder_is_expanded(tree, monkeypatch):
    root, f = tree
    monkeypatch.setenv("HOME", str(root))
    monkeypatch.setenv("USERPROFILE", str(root))
    assert rel(scan(["~/other/*.safetensors"]), root) == ["other/anime.safetensors"]


# ---------------------------------------------------------------------------------------------------------------
# filtering while walking


def test_each_folder_is_read_once_and_nothing_is_globbed(tree, monkeypatch):
    root, f = tree
    calls = []
    real_scandir = os.scandir

    def counting_scandir(path="."):
        calls.append(os.path.normpath(os.fspath(path)))
        return real_scandir(path)

    def no_glob(*a, **k):
        raise AssertionError("scan must not call glob")

    monkeypatch.setattr(scan_mod.os, "scandir", counting_scandir)
    monkeypatch.setattr(scan_mod.glob, "glob", no_glob)
    monkeypatch.setattr(scan_mod.glob, "iglob", no_glob)
    r = scan([str(root / "models" / "**" / "*.safetensors"), str(root / "models" / "**" / "pony*.safetensors")])
    assert len(r.matches) == 6
    # models, models/sdxl, models/sdxl/deep: each listed once although two patterns walk them (.cache is hidden)
    assert sorted(calls) == sorted(
        os.path.normpath(str(p)) for p in (root / "models", root / "models" / "sdxl", root / "models" / "sdxl" / "deep")
    )


# ---------------------------------------------------------------------------------------------------------------
# no matches


def test_pattern_that_matches_nothing_names_the_pattern(tree):
    root, f = tree
    pattern = str(root / "models" / "zeta*.safetensors")
    with pytest.raises(ScanError) as e:
        scan([str(root / "other"), pattern])
    assert repr(pattern) in str(e.value)
    assert "other" not in str(e.value).replace(pattern, "")


def test_every_failing_pattern_is_named(tree):
    root, f = tree
    p1, p2 = str(root / "nope" / "*.safetensors"), str(root / "models" / "q*.safetensors")
    with pytest.raises(ScanError) as e:
        scan([p1, str(root / "other"), p2])
    msg = str(e.value)
    assert repr(p1) in msg and repr(p2) in msg
    assert f"folder {root / 'nope'} does not exist" in msg


def test_allow_empty_returns_empty_result(tree):
    root, f = tree
    r = scan([str(root / "models" / "zeta*.safetensors")], allow_empty=True)
    assert r.matches == [] and r.default_manifest_dir is None


def test_empty_argument_list_is_an_error():
    with pytest.raises(ScanError, match="nothing to scan"):
        scan([])


def test_scan_folder_errors(tree):
    root, f = tree
    with pytest.raises(ScanError, match="does not exist"):
        scan_folder(root / "missing")
    with pytest.raises(ScanError, match="is not a folder"):
        scan_folder(f["pony_v6"])
    with pytest.raises(ScanError, match="inside the folder"):
        scan_folder(root / "models", "../other/*.safetensors")
    with pytest.raises(ScanError, match="inside the folder"):
        scan_folder(root / "models", str(root / "other" / "*.safetensors"))
    with pytest.raises(ScanError, match="no .safetensors file matches"):
        scan_folder(root / "models", "zeta*.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# skipped files


def test_pickle_files_are_skipped_with_reason(tree):
    root, f = tree
    r = scan([str(root / "models")])
    skipped = dict(r.skipped)
    for name in ("old.ckpt", "old2.pt", "old3.bin", "old4.pth"):
        assert skipped[f[name]] == PICKLE_REASON
    assert "pickle" in PICKLE_REASON and "code" in PICKLE_REASON
    assert f["txt"] not in skipped  # unrelated files are ignored, not reported
    assert not any(p.endswith((".ckpt", ".pt", ".bin", ".pth")) for p in r.matches)


def test_pickle_file_that_would_match_is_reported(tmp_path):
    st(tmp_path / "ponyv6.safetensors")
    ckpt = blob(tmp_path / "pony_old.ckpt")
    blob(tmp_path / "other.ckpt")
    r = scan([str(tmp_path / "pony*.safetensors")])
    assert [p for p, _ in r.skipped] == [ckpt]


def test_pattern_matching_only_pickle_files_is_an_error_with_reason(tree):
    root, f = tree
    with pytest.raises(ScanError) as e:
        scan([str(root / "models" / "old*")])
    assert "old.ckpt" in str(e.value) and "pickle" in str(e.value)
    with pytest.raises(ScanError, match="pickle"):
        scan([f["old.ckpt"]])


def test_literal_non_safetensors_file_is_skipped(tree):
    root, f = tree
    r = scan([f["txt"], str(root / "other")], allow_empty=True)
    assert dict(r.skipped)[f["txt"]].startswith("not a .safetensors file")
    with pytest.raises(ScanError, match="not a .safetensors file"):
        scan([f["txt"]])


# ---------------------------------------------------------------------------------------------------------------
# links


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links here")
def test_symlinked_duplicates_counted_once(tmp_path):
    real = st(tmp_path / "store" / "model.safetensors")
    os.makedirs(tmp_path / "a")
    os.symlink(real, tmp_path / "a" / "alias.safetensors")
    os.symlink(tmp_path / "store", tmp_path / "linkdir")
    r = scan([str(tmp_path / "**" / "*.safetensors")])
    assert r.matches == [real]  # the real file is kept over the links
    # the linked folder is the same folder as store/, so it is walked once; the file link is a duplicate
    assert r.duplicates == [(str(tmp_path / "a" / "alias.safetensors"), real)]
    r1 = scan([str(tmp_path / "linkdir" / "*.safetensors"), str(tmp_path / "store")])
    assert r1.matches == [real]
    assert r1.duplicates == [(str(tmp_path / "linkdir" / "model.safetensors"), real)]
    # only the link matches: the link is listed (not its target)
    r2 = scan([str(tmp_path / "a")])
    assert r2.matches == [str(tmp_path / "a" / "alias.safetensors")]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links here")
def test_symlink_loop_does_not_hang(tmp_path):
    st(tmp_path / "m" / "x.safetensors")
    os.symlink(tmp_path / "m", tmp_path / "m" / "loop")
    r = scan([str(tmp_path / "m" / "**" / "*.safetensors")])
    assert r.matches == [str(tmp_path / "m" / "x.safetensors")]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links here")
def test_broken_symlink_is_skipped(tmp_path):
    st(tmp_path / "good.safetensors")
    os.symlink(tmp_path / "gone.safetensors", tmp_path / "broken.safetensors")
    r = scan([str(tmp_path)])
    assert r.matches == [str(tmp_path / "good.safetensors")]
    assert r.skipped == [(str(tmp_path / "broken.safetensors"), BROKEN_LINK_REASON)]


def test_hard_links_counted_once(tmp_path):
    real = st(tmp_path / "a.safetensors")
    try:
        os.link(real, tmp_path / "b.safetensors")
    except OSError:
        pytest.skip("no hard links on this file system")
    r = scan([str(tmp_path)])
    assert r.matches == [real]
    assert r.duplicates == [(str(tmp_path / "b.safetensors"), real)]


# ---------------------------------------------------------------------------------------------------------------
# literal names with glob characters


def test_existing_path_with_brackets_is_taken_literally(tmp_path):
    bracket = st(tmp_path / "model [v2].safetensors")
    st(tmp_path / "model v.safetensors")  # what [v2] would match as a character set
    st(tmp_path / "model 2.safetensors")
    r = scan([bracket])
    assert r.matches == [bracket]


def test_escaping_brackets_in_a_pattern(tmp_path):
    bracket = st(tmp_path / "model [v2].safetensors")
    v = st(tmp_path / "model v.safetensors")
    assert escape(str(tmp_path / "model [v2].safetensors")).endswith("model [[]v2].safetensors")
    assert scan([str(tmp_path / "model [[]v2]*.safetensors")]).matches == [bracket]
    assert scan([escape(bracket)]).matches == [bracket]
    # unescaped and not an existing path: a character set, plus the name that equals the part exactly
    r = scan([str(tmp_path / "model [v2]*.safetensors")])
    assert r.matches == [v]
    st(tmp_path / "sub" / "x.safetensors")
    assert scan([str(tmp_path / "*" / "model [v2].safetensors")], allow_empty=True).matches == []


def test_folder_name_with_brackets_inside_a_pattern(tmp_path):
    m = st(tmp_path / "SDXL [pony]" / "a_v6.safetensors")
    st(tmp_path / "SDXL [pony]" / "b.safetensors")
    assert scan([str(tmp_path / "SDXL [pony]" / "*v6*.safetensors")]).matches == [m]
    assert scan([str(tmp_path / "SDXL [[]pony]" / "*v6*.safetensors")]).matches == [m]


def test_no_match_hint_mentions_escaping_for_brackets(tmp_path):
    st(tmp_path / "x.safetensors")
    with pytest.raises(ScanError, match=r"\[\[\]"):
        scan([str(tmp_path / "y [v2].safetensors")])
