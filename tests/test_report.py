"""The static HTML report: sections, escaping, self-containment, atomic writes, and run directories."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from datacredit.data import ArrayDataset, CharDataset
from datacredit.errors import DataError, StoreError
from datacredit.report import Display, Examples, Report, as_examples, history_arrays, render_report, save_run
from datacredit.report.png import encode_png, image_png
from datacredit.scores import Scores

EVIL = '<script>alert("x")</script>'
N_TRAIN, N_QUERY, STEPS, BATCH = 60, 3, 12, 8


def synthetic(seed: int = 0) -> dict:
    """Digits-like data: 8x8 images in [0, 1], labels, scores, In-Run values, a history and flipped ids."""
    rng = np.random.default_rng(seed)
    train_ids = np.arange(100, 100 + N_TRAIN)
    query_ids = np.arange(900, 900 + N_QUERY)
    train = ArrayDataset(torch.rand(N_TRAIN, 64), torch.randint(0, 10, (N_TRAIN,)), ids=train_ids)
    queries = ArrayDataset(torch.rand(N_QUERY, 64), torch.randint(0, 10, (N_QUERY,)), ids=query_ids)
    flipped = train_ids[[3, 7, 11, 19]]
    values = rng.normal(size=N_TRAIN)
    values[np.isin(train_ids, flipped)] -= 5.0  # flipped examples hurt: lowest In-Run values
    history = [(s, rng.choice(train_ids, BATCH, replace=False), rng.normal(size=(BATCH, 1))) for s in range(STEPS)]
    scores = Scores(rng.normal(size=(N_TRAIN, N_QUERY)), train_ids, query_ids, "grad-cos", {"damping": 0.01})
    metrics = [{"method": "grad-dot", "lds": 0.11, "time_s": 0.4, "lds_ci_low": 0.08, "lds_ci_high": 0.14,
                "noise_ceiling": 0.5},
               {"method": "ekfac", "lds": 0.31, "time_s": 9.5, "noise_ceiling": 0.5},
               {"method": "no-lds-yet", "time_s": 2.0}]
    inrun = Scores(values[:, None], train_ids, [-1], "inrun-shapley-2", {"order": 2})
    return {"train": train, "queries": queries, "flipped": flipped, "inrun": inrun, "history": history,
            "scores": scores, "metrics": metrics}


def full_report(title: str = "digits report") -> Report:
    """A report with every kind of section, as the browser test renders it too."""
    d = synthetic()
    report = Report(title, "synthetic data")
    report.add_text("What this run did.\n\nA second paragraph.")
    report.add_table(d["metrics"], "Methods")
    report.add_lds_vs_time(d["metrics"])
    report.add_values(d["inrun"], name="In-Run Shapley")
    report.add_history(d["history"], top=3)
    report.add_mislabel_candidates(d["inrun"], items=d["train"], flipped_ids=d["flipped"], k=8,
                                   higher_is_suspicious=False)
    report.add_gallery(d["scores"], d["train"], d["queries"], k=3, display=Display("image", (8, 8)),
                       flipped_ids=d["flipped"])
    return report


def external_refs(html: str) -> list[str]:
    """Every src/href value that is not inline data or an anchor on the page."""
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", html, flags=re.IGNORECASE)
    return [r for r in refs if not (r.startswith("data:image/png;base64,") or r.startswith("#"))]


def test_report_has_every_section_and_is_self_contained(tmp_path):
    path = full_report().write(tmp_path / "out" / "report.html")
    html = path.read_text(encoding="utf-8")
    for heading in ("Methods", "LDS against time", "Values: In-Run Shapley", "In-Run value over training",
                    "Mislabel candidates", "Proponents and opponents: grad-cos", "How to read the scores"):
        assert f">{heading}</h2>" in html, heading
    assert html.count('src="data:image/png;base64,') == 3 + 3 * (1 + 6) + 8  # plots, gallery, mislabel thumbs
    assert external_refs(html) == []
    assert not re.search(r"https?://", html)
    assert "<script" not in html.lower() and "<link" not in html.lower()
    assert "Content-Security-Policy" in html
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # one file, no temp file left behind


def test_user_text_is_escaped_everywhere():
    d = synthetic()
    scores = Scores(d["scores"].values, d["scores"].train_ids, d["scores"].query_ids, f"m{EVIL}", {"k": EVIL})
    texts = {i: (f"text {i} {EVIL}", EVIL) for i in d["train"].ids.tolist()}
    queries = {i: f"query {EVIL}" for i in d["queries"].ids.tolist()}
    report = Report(EVIL, subtitle=EVIL)
    report.add_text(EVIL, title=EVIL)
    report.add_table([{EVIL: EVIL, "method": EVIL}], title=EVIL)
    report.add_lds_vs_time([{"method": EVIL, "lds": 0.2, "time_s": 1.0}, {"method": EVIL}])
    report.add_values(scores, name=EVIL)
    report.add_gallery(scores, texts, queries, k=2, display=Display("text"))
    report.add_mislabel_candidates(d["inrun"], items=texts, display=Display("text"), higher_is_suspicious=False,
                                   title=EVIL)
    report.add_notes([EVIL])
    html = report.html()
    assert "<script" not in html.lower()
    assert html.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;") >= 10
    assert external_refs(html) == []


def test_text_examples_from_a_char_dataset_are_decoded_and_escaped():
    data = CharDataset("<blink>tag</blink> & more text to chunk into pieces " * 4, seq_len=16)
    ids = data.ids
    scores = Scores(np.linspace(-1, 1, len(ids) * 2).reshape(len(ids), 2), ids, ids[:2], "lm")
    html = Report("text").add_gallery(scores, data, data.subset([0, 1]), k=2, display=Display("text")).html()
    assert "<blink>" not in html and "&lt;blink&gt;" in html
    assert html.count('<div class="query text">') == 2
    first = data.decode(data[0][0])
    assert f"<pre>{first.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')}</pre>" in html


def test_mislabel_candidates_rank_by_the_suspicious_end_and_mark_flips():
    d = synthetic()
    html = Report("m").add_mislabel_candidates(d["inrun"], items=d["train"], flipped_ids=d["flipped"], k=4,
                                               higher_is_suspicious=False).html()
    assert "4 of these 4 candidates are among the 4 examples" in html
    assert "AUROC over all 60 examples: 1 " in html
    assert html.count('<tr class="flag">') == 4
    # the other end: with self-influence semantics the HIGHEST values are suspicious
    vec, ids = d["inrun"].column(0), d["inrun"].train_ids
    html = Report("m").add_mislabel_candidates((ids, -vec), higher_is_suspicious=True, flipped_ids=d["flipped"],
                                               k=4).html()
    assert "4 of these 4 candidates" in html
    rows = re.findall(r"<tr(?: class=\"flag\")?><td class=\"num\">(\d+)</td><td class=\"num\">(\d+)</td>", html)
    assert [int(i) for _, i in rows] == [int(i) for i in ids[np.argsort(vec, kind="stable")[:4]]]
    with pytest.raises(DataError, match="which end is suspicious"):
        Report("m").add_mislabel_candidates((ids, vec), higher_is_suspicious=None)


def test_history_arrays_flatten_and_the_curves_end_at_the_summed_values():
    d = synthetic()
    arrays = history_arrays(d["history"])
    assert arrays["steps"].shape == arrays["ids"].shape == (STEPS * BATCH,)
    assert arrays["values"].shape == (STEPS * BATCH, 1)
    assert history_arrays(arrays)["values"].tolist() == arrays["values"].tolist()  # idempotent on arrays
    expected: dict[int, float] = {}
    for _, ids, values in d["history"]:
        for i, v in zip(ids.tolist(), values[:, 0].tolist()):
            expected[i] = expected.get(i, 0.0) + v
    best = max(expected, key=expected.get)
    html = Report("h").add_history(d["history"], top=1).html()
    assert f"<td class=\"num\">{best}</td><td><span class=\"pos\">{expected[best]:+.3g}</span>" in html
    with pytest.raises(DataError, match="keep_history"):
        history_arrays([])


def test_lds_plot_lists_rows_it_cannot_place():
    html = Report("t").add_lds_vs_time([{"method": "a", "lds": 0.1, "time_s": 1.0},
                                        {"method": "b", "lds": float("nan"), "time_s": 1.0},
                                        {"method": "c", "lds": 0.2, "time_s": 0.0}]).html()
    assert "left out (no finite lds or no positive time_s): b, c" in html
    assert html.count('class="plot"') == 1
    assert "nothing to plot" in Report("t").add_lds_vs_time([{"method": "x"}]).html()


def test_png_thumbnails_decode_to_the_pixels():
    from matplotlib.image import imread

    pixels = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    decoded = imread(io.BytesIO(encode_png(pixels)), format="png")  # floats in [0, 1]
    np.testing.assert_array_equal(np.round(decoded * 255).astype(np.uint8), pixels)
    rgb = np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    decoded = imread(io.BytesIO(encode_png(rgb)), format="png")
    np.testing.assert_array_equal(np.round(decoded[..., :3] * 255).astype(np.uint8), rgb)
    unit = np.linspace(0, 1, 64)
    decoded = imread(io.BytesIO(image_png(unit, (8, 8))), format="png")
    np.testing.assert_allclose(decoded, unit.reshape(8, 8), atol=1 / 255)
    with pytest.raises(DataError, match="image_shape"):
        image_png(np.zeros(63), (8, 8))


def test_write_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "report.html"
    path.write_text("old report")

    def broken_fsync(fd):
        raise OSError("disk full")

    import datacredit.store

    monkeypatch.setattr(datacredit.store.os, "fsync", broken_fsync)  # fails after the bytes went to the temp file
    with pytest.raises(OSError, match="disk full"):
        Report("new").add_text("new report").write(path)
    assert path.read_text() == "old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_write_leaves_the_old_file_when_rendering_fails(tmp_path, monkeypatch):
    path = tmp_path / "report.html"
    path.write_text("old report")
    report = Report("r").add_text("x")
    monkeypatch.setattr(Report, "html", lambda self: (_ for _ in ()).throw(RuntimeError("render failed")))
    with pytest.raises(RuntimeError, match="render failed"):
        report.write(path)
    assert path.read_text() == "old report"


def _save_full_run(run_dir: Path) -> dict:
    d = synthetic()
    save_run(run_dir, scores={"grad-cos": d["scores"]},
             values={"inrun": d["inrun"], "self-influence": (d["inrun"].train_ids, -d["inrun"].column(0))},
             metrics=d["metrics"], history=d["history"], train_items=as_examples(d["train"]),
             query_items=as_examples(d["queries"]), flipped_ids=d["flipped"],
             run={"title": f"run {EVIL}", "notes": "notes here", "suspicious": {"self-influence": "high"}})
    return d


def test_render_report_from_a_full_run_directory(tmp_path):
    _save_full_run(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "inrun_history.npz", "items.npz", "metrics.json", "run.json", "scores", "values"]
    out = render_report(tmp_path / "run")
    assert out == tmp_path / "run" / "report.html"
    html = out.read_text(encoding="utf-8")
    for heading in ("Methods", "LDS against time", "Values: inrun", "Values: self-influence",
                    "In-Run value over training", "Mislabel candidates: inrun", "Mislabel candidates: self-influence",
                    "Scores: grad-cos", "Proponents and opponents: grad-cos"):
        assert f">{heading}</h2>" in html, heading
    assert "What this run holds" not in html  # nothing missing
    assert "run &lt;script&gt;" in html and "<script" not in html
    # both ends were read correctly from run.json: all 4 flips found in each candidate list
    assert html.count("4 of these 20 candidates are among the 4 examples") == 2
    assert external_refs(html) == []


def _section(html: str, heading: str) -> str:
    start = html.index(f">{heading}</h2>")
    end = html.find("<h2", start)
    return html[start : end if end >= 0 else len(html)]


def test_values_headings_follow_what_the_values_mean(tmp_path):
    """In-Run values are signed as scores (positive = helped); self-influence is a suspicion score, whose highest
    values are not "helped most" (run.json says which end of each is suspicious)."""
    _save_full_run(tmp_path / "run")
    html = render_report(tmp_path / "run").read_text(encoding="utf-8")
    inrun, self_influence = _section(html, "Values: inrun"), _section(html, "Values: self-influence")
    assert "Highest (helped most)" in inrun and "Lowest (hurt most)" in inrun and "positive (helped)" in inrun
    assert "Highest (most suspicious)" in self_influence and "Lowest (least suspicious)" in self_influence
    assert "helped" not in self_influence and "hurt" not in self_influence
    direct = Report("r").add_values((np.arange(3), np.array([0.5, -1.0, 2.0])), higher_is_suspicious=True).html()
    assert "Highest (most suspicious)" in direct and "helped most" not in direct


def test_render_report_skips_missing_parts_with_a_note(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(synthetic()["metrics"]))
    (run / "items.npz").write_bytes(b"not a zip file")
    out = render_report(run, tmp_path / "elsewhere" / "r.html")
    html = out.read_text(encoding="utf-8")
    assert ">Methods</h2>" in html and ">LDS against time</h2>" in html
    assert "Proponents and opponents" not in html and "In-Run value over training" not in html
    for missing in ("values/: not present", "inrun_history.npz: not present", "scores/: not present",
                    "items.npz could not be read and was skipped"):
        assert missing in html, missing
    assert not (run / "report.html").exists()


def test_render_report_refuses_a_missing_or_unrelated_directory(tmp_path):
    with pytest.raises(StoreError, match="no such run directory"):
        render_report(tmp_path / "nope")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="not a run directory"):
        render_report(tmp_path / "other")


def test_render_report_reads_text_runs(tmp_path):
    texts = [f"line {i} <i>{i}</i>" for i in range(6)]
    ids = np.arange(6)
    scores = Scores(np.arange(12, dtype=float).reshape(6, 2) - 5, ids, np.array([0, 1]), "tracin")
    save_run(tmp_path, scores={"tracin": scores}, train_items=Examples(ids, texts, kind="text"),
             query_items=Examples(ids[:2], texts[:2], kind="text"), run={"kind": "text"})
    html = render_report(tmp_path).read_text(encoding="utf-8")
    assert "<pre>line 5 &lt;i&gt;5&lt;/i&gt;</pre>" in html and "<i>" not in html
    assert os.path.getsize(tmp_path / "report.html") == len(html.encode("utf-8"))


def test_save_run_rejects_unsafe_names(tmp_path):
    d = synthetic()
    with pytest.raises(DataError, match="directory name"):
        save_run(tmp_path, scores={"../escape": d["scores"]})


# -- a run directory with a broken part: that part is skipped with a note, the rest is rendered ----------------------
def _npz(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


def _edit_manifest(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc["artefacts"])
    path.write_text(json.dumps(doc))


def _bad_npy_header(run: Path) -> None:
    """A zip whose .npy header ends mid-dict: numpy's header parser raises tokenize.TokenError."""
    import zipfile

    with zipfile.ZipFile(run / "items.npz", "w") as z:
        z.writestr("train_ids.npy", b"\x93NUMPY\x01\x00\x06\x00{'de'\n")


BROKEN = {  # name: (how to break a full run, a note the report must then show)
    "corrupt metrics.json": (lambda run: (run / "metrics.json").write_text("{"),
                             "metrics.json could not be read and was skipped: JSONDecodeError"),
    "metrics rows not dicts": (lambda run: (run / "metrics.json").write_text("[1, 2]"),
                               "metrics.json (methods table): could not be drawn and was skipped"),
    "bad zip": (lambda run: (run / "items.npz").write_bytes(b"PK\x03\x04 not really a zip"),
                "items.npz could not be read and was skipped: BadZipFile"),
    "bad npy header": (_bad_npy_header, "items.npz could not be read and was skipped: TokenError"),
    "history without ids": (lambda run: _npz(run / "inrun_history.npz", steps=np.arange(3)),
                            "inrun_history.npz: could not be drawn and was skipped"),
    "history with text steps": (lambda run: _npz(run / "inrun_history.npz", steps=np.array(["a", "b"]),
                                                 ids=np.array([100, 101]), values=np.zeros((2, 1))),
                                "inrun_history.npz: could not be drawn and was skipped: ValueError"),
    "manifest entry without bytes": (
        lambda run: _edit_manifest(run / "scores" / "grad-cos" / "manifest.json",
                                   lambda a: [e.pop("bytes") for e in a.values()]),
        "scores/grad-cos could not be read and was skipped"),
    "manifest with a bad dtype": (
        lambda run: _edit_manifest(run / "values" / "inrun" / "manifest.json",
                                   lambda a: a["values"].update(dtype="not-a-dtype")),
        "values/inrun could not be read and was skipped"),
    "invalid run.json settings": (
        lambda run: (run / "run.json").write_text(json.dumps({"image_shape": "ab", "gallery_k": "x", "kind": "video",
                                                              "suspicious": {"inrun": "middle"}})),
        "run.json: invalid 'image_shape' ('ab') ignored; using [8, 8]"),
    "lone surrogates in run.json and metrics.json": (
        lambda run: ((run / "run.json").write_text(json.dumps({"title": "t\ud800", "notes": "n\udfff"})),
                     (run / "metrics.json").write_text(json.dumps([{"method": "m\ud800", "lds": 0.1, "time_s": 1}]))),
        None),
}
# each render breaks several parts at once (a render takes seconds); the sections listed must still be there
GROUPS = {
    "a": (["corrupt metrics.json", "bad zip", "history without ids", "manifest entry without bytes"],
          ["Values: inrun", "Values: self-influence"]),
    "b": (["metrics rows not dicts", "bad npy header", "history with text steps", "manifest with a bad dtype"],
          ["Values: self-influence", "Scores: grad-cos"]),
    "c": (["invalid run.json settings"], ["Methods", "Proponents and opponents: grad-cos"]),
    "d": (["lone surrogates in run.json and metrics.json"], ["Methods", "LDS against time", "Values: inrun"]),
}


@pytest.mark.parametrize("group", GROUPS)
def test_render_report_skips_broken_parts_with_a_note(tmp_path, group):
    broken, kept = GROUPS[group]
    run = tmp_path / "run"
    _save_full_run(run)
    for name in broken:
        BROKEN[name][0](run)
    html = render_report(run).read_text(encoding="utf-8")
    for heading in kept:
        assert f">{heading}</h2>" in html, heading
    for name in broken:
        note = BROKEN[name][1]
        if note is not None:
            assert note.replace("'", "&#x27;") in html, note
            assert ">What this run holds</h2>" in html


def test_render_report_survives_lone_surrogates_in_text_items(tmp_path):
    ids = np.arange(4)
    scores = Scores(np.arange(8, dtype=float).reshape(4, 2) - 3, ids, np.array([0, 1]), "tracin")
    save_run(tmp_path, scores={"tracin": scores}, run={"kind": "text"})
    _npz(tmp_path / "items.npz", train_ids=ids, train_data=np.array(["bad \ud800 text"] * 4), query_ids=ids[:2],
         query_data=np.array(["q \udfff"] * 2))
    html = render_report(tmp_path).read_text(encoding="utf-8")
    assert "<pre>bad ? text</pre>" in html  # the surrogate that UTF-8 cannot hold is replaced, the rest is kept


def test_per_example_values_are_a_scores_an_ids_vector_pair_or_a_bare_vector():
    from datacredit.report.sections import per_example

    ids, vec = np.array([7, 3, 5]), np.array([0.5, -1.0, 2.0])
    got, got_ids, _, notes = per_example((ids, vec))
    np.testing.assert_array_equal(got, vec)
    np.testing.assert_array_equal(got_ids, ids)
    assert notes == []
    _, positions, _, notes = per_example(vec)
    np.testing.assert_array_equal(positions, np.arange(3))
    assert "positions" in notes[0]
    _, pair_ids, _, _ = per_example((ids, vec[:, None]))  # (n, 1) as save_run keeps values
    np.testing.assert_array_equal(pair_ids, ids)
    two, two_ids, _, _ = per_example((0.5, 0.25))  # two numbers are a vector of two values, not a pair
    np.testing.assert_array_equal(two, [0.5, 0.25])
    np.testing.assert_array_equal(two_ids, [0, 1])
    with pytest.raises(DataError, match="3 values but ids"):
        per_example((np.arange(2), vec))
    html = Report("r").add_values((ids, vec)).html()
    assert re.search(r"<td class=\"num\">1</td><td class=\"num\">5</td>", html)  # rank 1 is id 5 (value 2.0)


def test_display_groups_how_examples_are_drawn():
    assert Display(image_shape=[4, 4]).image_shape == (4, 4)
    with pytest.raises(DataError, match="kind"):
        Display("video")
    d = synthetic()
    small = Report("g").add_gallery(d["scores"], d["train"], d["queries"], k=1, display=Display(image_shape=(4, 16)))
    default = Report("g").add_gallery(d["scores"], d["train"], d["queries"], k=1)
    assert small.html() != default.html()  # another shape draws other thumbnails
