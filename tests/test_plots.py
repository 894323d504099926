"""The figures each family's run and the aggregator write (src/plots/): every PNG opens, is larger than a thumbnail
and is not one colour, and the data behind it is the run's or the table's (masked self-pairs, CKA ones on the
diagonal, bars at the summary's values, one labelled row per class)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from src.plots import base, cka_heatmap, flip_heatmap
from src.plots import aft, kdep, multi_teacher as mt, zeroshot as zs, zoo
from src.plots.flips import masked_self_pairs
from src.tracking import aggregate as agg


def looks_like_a_figure(path, min_side: int = 200) -> Image.Image:
    """The PNG at `path` opens, is at least min_side pixels each way and holds more than a handful of colours."""
    with Image.open(path) as im:
        im.verify()
    im = Image.open(path).convert("RGB")
    assert min(im.size) >= min_side, im.size
    colours = im.getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 20, f"{path}: {len(colours)} colours"
    return im


def _capture(monkeypatch):
    """Figures that image_grid would save, kept open for inspection (saved as well)."""
    figs = []

    def keep(fig, path):
        figs.append(fig)
        fig.savefig(path)
        return path

    monkeypatch.setattr(base, "save", keep)
    return figs


# ------------------------------------------------------------------------------------------------- flips


def test_flips_heatmap_masks_self_pairs(tmp_path):
    m = np.arange(16, dtype=float).reshape(4, 4)
    shown = masked_self_pairs(m)
    assert np.isnan(np.diag(shown)).all() and not np.isnan(m).any()  # a copy: the matrix on disk keeps its 0s
    off = ~np.eye(4, dtype=bool)
    assert np.array_equal(shown[off], m[off])
    fig, ax = base.plt.subplots()
    im = base.heatmap(ax, shown, list("abcd"), annotate=True)
    arr = im.get_array()
    assert arr.mask[np.eye(4, dtype=bool)].all() and not arr.mask[off].any()
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert [texts[(i, i)] for i in range(4)] == ["-"] * 4 and texts[(0, 1)] == "1.0"
    base.plt.close(fig)
    looks_like_a_figure(flip_heatmap(m, list("abcd"), tmp_path / "h.png"))


def test_cka_heatmap_and_console_lines(tmp_path):
    from src.experiments.flips import cka_lines
    from src.metrics import cka_matrix

    g = torch.Generator().manual_seed(0)
    base_feats = torch.randn(100, 8, generator=g)
    feats = [base_feats, base_feats @ torch.randn(8, 8, generator=g), torch.randn(100, 8, generator=g)]
    mats = {k: cka_matrix(feats, k).double().numpy() for k in ("linear", "rbf")}
    for m in mats.values():
        assert np.allclose(np.diag(m), 1.0, atol=1e-5) and np.allclose(m, m.T, atol=1e-6)
        assert m[0, 1] > m[0, 2]  # a linear map of the same features is more similar than independent ones
    looks_like_a_figure(cka_heatmap({"linear": mats["linear"], "RBF": mats["rbf"]}, ["a", "b", "c"],
                                    tmp_path / "cka.png", samples=100))
    lines = cka_lines(["a", "b", "c"], {"cka_linear": mats["linear"]})
    assert lines[0] == "cka linear of the penultimate features:" and len(lines) == 5
    assert lines[1].split() == ["model", "[1]", "[2]", "[3]"]
    assert lines[2].split() == ["[1]", "a", *[f"{v:.3f}" for v in mats["linear"][0]]]
    many = cka_lines([f"m{i}" for i in range(13)], {"cka_linear": np.eye(13)})
    assert len(many) == 1 and "over 156 pairs: min 0.000" in many[0]


# ------------------------------------------------------------------------------------------ multi-teacher


def _mt_summary(mode="soup", seed=0, after=97.4, stages=None):
    return {"status": "ok", "family": "multi_teacher", "mode": mode, "method": "kl_dp", "method_choice": "kl_dp",
            "student": "mlp_wide", "teachers": ["mlp_small", "lenet"], "seed": seed, "zoo_seed": seed,
            "student_acc_before": 93.5, "student_acc_after": after, "transfer_delta": after - 93.5,
            "vs_mlp_small/teacher_acc": 95.0, "vs_lenet/teacher_acc": 98.1, "vs_ensemble/teacher_acc": 98.6,
            "stages": stages if stages is not None else [
                {"stage": 1, "teacher": "mlp_small", "student_acc_after": 95.2},
                {"stage": 2, "teacher": "lenet", "student_acc_after": 97.0}]}


def test_multi_teacher_run_figure_shows_the_summary(tmp_path):
    s = _mt_summary()
    bars = mt.run_bars(s)
    assert [(b[0], b[1]) for b in bars] == [
        ("student before", 93.5), ("soup member: mlp_small", 95.2), ("soup member: lenet", 97.0),
        ("final (soup)", 97.4), ("best single teacher: lenet", 97.0), ("teacher mlp_small", 95.0),
        ("teacher lenet", 98.1), ("ensemble of teachers", 98.6)]
    assert mt.best_single_transfer(s) == ("lenet", 97.0)
    par = _mt_summary("parallel", stages=[{"stage": 1, "teacher": "mlp_small+lenet", "student_acc_after": 97.4}])
    assert mt.best_single_transfer(par) is None and len(mt.run_bars(par)) == 5
    fig, ax = base.plt.subplots()
    drawn = mt._panel(ax, bars, "t")
    assert [r.get_height() for r in drawn] == pytest.approx([b[1] for b in bars])
    base.plt.close(fig)
    looks_like_a_figure(mt.run_figure(s, tmp_path / "mt.png"))
    from src.experiments.multi_teacher import versus_line

    assert versus_line(s) == ("vs. single teachers: best teacher lenet 98.10%; best single-teacher transfer (lenet) "
                              "97.00% -> soup +0.40 points")
    assert "not in this run" in versus_line(par)


def _write_run(d, summary, cfg=None):
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(summary))
    if cfg is not None:
        (d / ".hydra").mkdir()
        (d / ".hydra" / "config.yaml").write_text(json.dumps(cfg))


def _transfer(teacher, acc, seed, method="kl_dp"):
    return {"status": "ok", "family": "transfer", "method": "KLDP", "method_choice": method, "teacher": teacher,
            "student": "mlp_wide", "seed": seed, "zoo_seed": seed, "teacher_acc": 97.0, "student_acc_before": 93.5,
            "student_acc_after": acc, "transfer_delta": acc - 93.5, "knowledge_gain": 1.0, "knowledge_loss": 0.5}


def test_aggregate_multi_teacher_figure_against_the_best_single_teacher(tmp_path):
    root = tmp_path / "runs"
    for seed, (seq, par, singles) in enumerate([(98.0, 97.0, (95.5, 97.5)), (98.4, 97.6, (96.0, 97.9))]):
        _write_run(root / f"seq{seed}", _mt_summary("sequential", seed, seq))
        _write_run(root / f"par{seed}", _mt_summary("parallel", seed, par))
        for t, acc in zip(("mlp_small", "lenet"), singles):
            _write_run(root / f"t{seed}{t}", _transfer(t, acc, seed))
    runs, problems = agg.load_runs([root])
    assert not problems
    tables = agg.aggregate(runs)
    groups = agg.multi_teacher_groups([r for r in runs if r["family"] == "multi_teacher"],
                                      [r for r in runs if r["family"] == "transfer"])
    (title, bars), = groups.items()
    assert title == "mlp_small, lenet -> mlp_wide"
    got = {b[0]: (b[1], b[2]) for b in bars}
    for row in tables["multi_teacher"]:  # the final bars are the table's values
        assert got[f"{row['mode']} ({row['method']})"] == pytest.approx(
            (row["student_acc_after"]["mean"], row["student_acc_after"]["std"]))
    assert got["best single teacher (kl_dp)"][0] == pytest.approx((97.5 + 97.9) / 2)  # per seed the best teacher
    assert got["student before"] == pytest.approx((93.5, 0.0)) and got["ensemble of teachers"][0] == 98.6
    assert "multi_teacher" not in agg.figures_for(tables, [], tmp_path / "no_runs")  # tables alone: no figure
    agg.write(tables, problems, tmp_path / "out", runs)
    looks_like_a_figure(tmp_path / "out" / "figures" / "multi_teacher.png")
    assert "![multi_teacher](figures/multi_teacher.png)" in (tmp_path / "out" / "results.md").read_text()


# ------------------------------------------------------------------------------------ AFT, KDEP, zero-shot


def test_aggregate_figures_for_aft_kdep_and_zeroshot(tmp_path):
    root = tmp_path / "runs"
    for seed in (0, 1):
        for k, m in enumerate(("aft", "aft_kd", "aft_btune", "aft_init")):
            _write_run(root / f"aft{seed}{m}", {
                "status": "ok", "family": "aft", "seed": seed, "method": m, "method_choice": m, "student": "s",
                "features": [] if m == "aft_init" else ["f1", "f2"], "student_acc_after": 96.0 - k + seed,
                "transfer_delta": 2.0 - k + seed})
        _write_run(root / f"kdep{seed}", {
            "status": "ok", "family": "kdep", "seed": seed, "teacher": "t", "student": "s",
            "inits": ["kdep", "scratch", "supervised"],
            "downstream": {"digits_val": {"kdep": 90.0 + seed, "scratch": 85.0, "supervised": 88.0},
                           "seg": {"task": "segmentation", "kdep/miou": 40.0, "scratch/miou": 35.0 + seed,
                                   "supervised/miou": 38.0}}})  # a dense entry as KDEP writes it: <init>/<metric>
        _write_run(root / f"zs{seed}", {
            "status": "ok", "family": "zeroshot", "seed": seed, "teacher": "t", "student": "s", "teacher_acc": 97.0,
            "baselines": ["kd_at", "scratch"], "zeroshot_acc": 60.0 + 4 * seed, "kd_at_acc": 80.0,
            "scratch_acc": 55.0, "mte_zeroshot": 0.3, "mte_kd_at": 0.4, "mte_scratch": 0.5 + 0.1 * seed})
    runs, problems = agg.load_runs([root])
    tables = agg.aggregate(runs)
    bars = aft.method_bars(tables["aft"])
    assert [b[0] for b in bars] == ["aft", "aft_kd", "aft_btune", "aft_init (STL)", "start (pretrained student)"]
    assert [b[1] for b in bars] == pytest.approx([96.5, 95.5, 94.5, 93.5, 94.0])  # start: after - delta
    ps = kdep.panels(tables["kdep"])
    assert list(ps) == [("digits_val", "acc"), ("seg", "mIoU")]
    assert [(r["init"], r["value"]["mean"]) for r in ps[("seg", "mIoU")]] == [
        ("kdep", 40.0), ("scratch", 35.5), ("supervised", 38.0)]
    figs = agg.figures_for(tables, runs, tmp_path / "figs")
    assert sorted(figs) == ["aft", "kdep", "zeroshot"]
    for p in figs.values():
        looks_like_a_figure(p)
    agg.write(tables, problems, tmp_path / "out", runs)
    md = (tmp_path / "out" / "results.md").read_text()
    for name in ("aft", "kdep", "zeroshot"):
        assert f"![{name}](figures/{name}.png)" in md


def test_fidelity_sweep_gets_its_own_table_and_figure_only(tmp_path):
    root = tmp_path / "runs"
    for seed in (0, 1):
        for k, (teacher, mixup) in enumerate([("lenet", 0.0), ("lenet", 1.0)]):
            cfg = {"teacher": teacher, "student": {"arch": "lenet", "name": "lenet"}, "distill_data": "train",
                   "method": {"mixup_alpha": mixup}, "trainer": {"seed": seed}}
            s = {**_transfer(teacher, 96.0 + k, seed), "agreement_after": 95.0 + seed, "kl_teacher_student": 0.1}
            _write_run(root / f"f{seed}{k}", s, cfg)
    runs, problems = agg.load_runs([root])
    tables = agg.aggregate(runs)
    assert list(tables) == ["fidelity"] and len(tables["fidelity"]) == 2
    agg.write(tables, problems, tmp_path / "out", runs)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "## fidelity" in md and "![fidelity](figures/fidelity.png)" in md and "transfer_methods" not in md
    assert sorted(p.name for p in (tmp_path / "out" / "figures").iterdir()) == ["fidelity.png"]
    looks_like_a_figure(tmp_path / "out" / "figures" / "fidelity.png")
    _write_run(root / "plain", _transfer("mlp_small", 97.0, 0))  # a transfer run beside the sweep keeps its tables
    runs, _ = agg.load_runs([root])
    tables = agg.aggregate(runs)
    assert tables["transfer_methods"][0]["pairs"] == 1 and len(tables["fidelity"]) == 2


# --------------------------------------------------------------------------------- zero-shot run, GAN grid


def test_transition_grid_and_pseudo_images(tmp_path):
    rng = np.random.default_rng(0)
    curves = {n: {"student": rng.uniform(0, 1, (10, 27)), "teacher": rng.uniform(0, 1, (10, 27)), "mte": 0.2 + k / 10,
                  "images": 3} for k, n in enumerate(("zeroshot", "kd_at", "scratch"))}
    looks_like_a_figure(zs.transition_grid(curves, tmp_path / "grid.png", "lenet", 5))
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    p = zs.pseudo_image_grid(x, [k % 10 for k in range(32)], [0.5] * 32, [str(k) for k in range(10)], 4,
                             tmp_path / "pseudo.png", "wrn_16_2@" + "/very/long" * 10 + "/teacher.safetensors")
    looks_like_a_figure(p)


def test_gan_samples_have_one_labelled_row_per_class(tmp_path, monkeypatch):
    figs = _capture(monkeypatch)
    names = ["airplane", "automobile", "bird"]
    path = zoo.class_rows(torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(0)), names, 4,
                          tmp_path / "gan.png", title="samples")
    (fig,) = figs
    axes = np.array(fig.axes).reshape(3, 4)
    assert [a.get_ylabel() for a in axes[:, 0]] == names and all(a.get_ylabel() == "" for a in axes[:, 1:].flat)
    assert all(len(a.images) == 1 for a in axes.flat)
    base.plt.close(fig)
    looks_like_a_figure(path, min_side=150)


def test_zoo_sample_grid_labels_rows_with_the_dataset_classes(tmp_path, monkeypatch):
    from src.experiments.zoo import sample_grid
    from src.models.gan import CondGenerator, GANSource

    torch.manual_seed(0)
    g = CondGenerator(img_size=8, channels=1, num_classes=10)
    figs = _capture(monkeypatch)
    sample_grid(GANSource(g), tmp_path / "gan.png", per_class=3, class_names=[f"digit {k}" for k in range(10)])
    (fig,) = figs
    assert [fig.axes[3 * k].get_ylabel() for k in range(10)] == [f"digit {k}" for k in range(10)]
    assert g.training  # the grid is drawn in eval mode and the generator's mode is put back
    base.plt.close(fig)
