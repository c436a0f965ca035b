"""``python -m shards report``: every figure and gallery present, valid HTML, PNGs that decode."""

from __future__ import annotations

import base64
import io
import shutil
from html.parser import HTMLParser

import pytest
from PIL import Image
from stats_fixture import write_dataset

from shards import report
from shards.__main__ import main as shards_cli

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Page(HTMLParser):
    """Collects ids, images and text, and checks that every element is closed in order."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: dict[str, str] = {}
        self.images: list[dict] = []
        self.text: list[str] = []
        self.doctype = False

    def handle_decl(self, decl):
        self.doctype = decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            if a["id"] in self.ids:
                self.errors.append(f"duplicate id {a['id']}")
            self.ids[a["id"]] = tag
        if tag == "img":
            self.images.append({**a, "section": next((s for s in reversed(self.stack) if s.startswith("section#")), None)})
        if tag not in VOID:
            self.stack.append(f"{tag}#{a['id']}" if tag == "section" and "id" in a else tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1].split("#")[0] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    return page


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    a = write_dataset(root / "a" / "ds")
    b = root / "b" / "ds"  # same folder name: the report must still tell them apart
    shutil.copytree(a, b)
    return [str(a), str(b)]


@pytest.fixture(scope="module")
def page(datasets, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "sub" / "report.html"
    assert shards_cli(["report", *datasets, "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    return text, parse(text)


def test_report_is_well_formed_html(page):
    _, p = page
    assert p.doctype
    assert p.errors == []
    assert p.stack == []  # every element closed
    assert p.ids["summary"] == "section"


def test_report_holds_every_figure_as_a_decodable_png(page):
    _, p = page
    for fig_id in report.FIGURES:
        assert p.ids[f"figure-{fig_id}"] == "section"
        (img,) = [i for i in p.images if i.get("id") == f"img-{fig_id}"]
        assert img["section"] == f"section#figure-{fig_id}"
        header, data = img["src"].split(",", 1)
        assert header == "data:image/png;base64"
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 150


def test_report_holds_both_galleries_of_each_dataset(page):
    _, p = page
    for i in range(2):
        samples = [im for im in p.images if im["section"] == f"section#gallery-samples-{i}"]
        # the four kept samples of the complete shards, each drawn with its layout
        assert sorted(im["alt"] for im in samples) == ["s0a (64x48)", "s0b (32x32)", "s1a (40x20)", "s1b (40x20)"]
        for im in samples:
            assert im["src"].startswith("data:image/jpeg;base64,")
        assert p.ids[f"gallery-failures-{i}"] == "section"
    text = " ".join(p.text)
    # descriptions and failure reasons are written out, escaped
    assert "1. cat: The cat sat on the mat. It was a beautiful animal." in text
    assert "f3 (failed at ground)" in text and "RuntimeError: CUDA out of memory" in text
    assert "OSError: cannot identify image file '…'" in text  # the reasons table
    assert "ds#2" in text  # two datasets named ds


def test_failure_gallery_spreads_over_reasons_and_shows_readable_sources(tmp_path):
    ds = write_dataset(tmp_path / "ds")
    index = report.stats.load_index(str(ds))
    items = report.failure_gallery(index, n=3)
    # one of each reason before a second decode failure
    assert [it.title for it in items] == ["f0 (failed at decode)", "f3 (failed at ground)", "f2 (filtered at filter)"]
    assert all(it.jpeg is None for it in items)  # the sources do not exist
    src = tmp_path / "17.jpg"
    Image.new("RGB", (50, 30), "blue").save(src)
    index.loc[index["key"] == "f0", "source"] = str(src)
    (first, *_) = report.failure_gallery(index, n=1)
    with Image.open(io.BytesIO(first.jpeg)) as im:
        assert im.size == (50, 30)


def test_report_help_and_direct_main(datasets, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        report.main(["--help"])
    assert e.value.code == 0 and "--max-samples" in capsys.readouterr().out
    out = tmp_path / "r.html"
    assert report.main([datasets[0], "--out", str(out), "--max-samples", "1", "--gallery", "1"]) == 0
    p = parse(out.read_text(encoding="utf-8"))
    assert p.errors == [] and len([i for i in p.images if i["section"] == "section#gallery-samples-0"]) == 1


def test_figures_survive_a_dataset_without_objects_or_failures(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    p = parse(report.render_html(report.load_datasets([str(empty)])))
    assert p.errors == []
    assert {i.get("id") for i in p.images} >= {f"img-{f}" for f in report.FIGURES}
    assert "nothing to show" in " ".join(p.text)


def test_report_survives_a_damaged_shard_and_names_it(tmp_path, capsys):
    ds = write_dataset(tmp_path / "ds")
    tar = ds / "000001.tar"
    tar.write_bytes(tar.read_bytes()[:700])  # cut inside the first member
    (ds / "000000.parquet").write_bytes(b"PAR1 not a parquet file")
    out = tmp_path / "r.html"
    assert shards_cli(["report", str(ds), "--out", str(out), "--gallery", "4"]) == 1  # written, and says so
    err = capsys.readouterr().err
    assert f"ds: 000001 left out: {tar}: holds 700 bytes but its stats file recorded 10240: damaged" in err
    assert err.splitlines()[-1] == f"error: 2 damaged shard(s) or sample(s) left out of {out} (listed above and in the report)"
    p = parse(out.read_text(encoding="utf-8"))
    assert p.errors == []
    text = " ".join(p.text)
    assert "2 damaged shard(s) or sample(s) left out" in text
    assert "parquet unreadable: " in text and f"{tar}: " in text
    tables = report.load_datasets([str(ds)])
    assert sorted(tables[0].skipped) == ["000000", "000001"]
    # what is left: shard 1's parquet rows (s1a, s1b, one failure) and shard 0's samples in the gallery
    assert sorted(tables[0].index["key"]) == ["f3", "s1a", "s1b"]
    assert [i.title.split(" ")[0] for i in report.sample_gallery(str(ds), 4)] == ["s0a", "s0b"]


def test_report_missing_dataset_is_one_error_line(tmp_path, capsys):
    missing = tmp_path / "gone"
    assert report.main([str(missing), "--out", str(tmp_path / "r.html")]) == 2
    assert capsys.readouterr().err == f"error: {missing}: no such dataset folder\n"
    assert not (tmp_path / "r.html").exists()


def test_report_out_is_a_folder_is_one_error_line(datasets, tmp_path, capsys):
    assert shards_cli(["report", datasets[0], "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: is a folder; give the path of the file to write\n"
